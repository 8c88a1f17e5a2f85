#!/usr/bin/env python3
"""Train the bundled reference models `tiny-llama` and `tiny-gelu` (seeded, reproducible).

Stages (`all` runs them in order on one machine):
  prepare   CPU.  .corpus/train.txt (scripts/build_corpus.py) -> byte-level BPE tokenizer (8192 ids)
            -> uint16 token streams: train (minus a held-out validation slice of train documents),
            val, and bundled:eval; plus unigram counts; written to .corpus/tokens/ (~18 MB, all
            that the GPU stage reads).
  train     GPU.  For each model: build it from its config; train it with AdamW + warmup/cosine
            under bf16 autocast (torch.compile when it works) for each candidate schedule length
            in RECIPE["epochs"] (same initial weights and data order each time); keep the weights
            with the lowest validation perplexity; evaluate bundled:eval perplexity; then
            `save_pretrained` in bf16 to --out/<name>/ with <name>.metrics.json beside it.
  finalize  CPU.  Re-save each trained model with this machine's transformers, add the tokenizer
            files, measure perplexity on bundled:eval with `actsparse.perplexity` (float32, CPU), the
            add-one unigram perplexity of the same tokenizer, and write the model card README.md.

Token streams follow `actsparse.perplexity`: each document's ids, then EOS, concatenated.

Usage (what produced the committed models):
  python scripts/build_corpus.py
  python scripts/train_reference_models.py prepare
  bash scripts/device_train_reference.sh            # on the GPU machine: `train` for both models
  python scripts/train_reference_models.py finalize --trained <dir with the trained folders>
CPU check of the GPU path:  ... train --device cpu --steps 3 --smoke --probe --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / ".corpus"
TEXT = REPO / "actsparse" / "assets" / "text"
MODELS = REPO / "actsparse" / "assets" / "models"
DOC_SEP = "<|doc|>"
EOS, PAD = "<|endoftext|>", "<|pad|>"
VOCAB = 8192
SEQ_LEN = 512
CARD_SUBSET_TOKENS = 16_384  # the test re-measures perplexity on this prefix of bundled:eval

# The two architectures, as transformers builds them. Sizes fit both models in 24 MB of bf16 weights
# with a tied 8192 x 256 embedding each; 6 layers; head_dim 64 (what the Triton kernels like).
ARCHS: dict[str, dict] = {
    "tiny-llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=512, hidden_act="silu", max_position_embeddings=1024,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=True, initializer_range=0.02,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    ),
    "tiny-gelu": dict(
        architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox",
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
        intermediate_size=640, hidden_act="gelu", max_position_embeddings=1024, layer_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        use_parallel_residual=True, attention_bias=True, tie_word_embeddings=True, initializer_range=0.02,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    ),
}

# Training recipe shared by both models (per-model overrides below).
RECIPE = dict(seed=0, batch_size=64, seq_len=SEQ_LEN, epochs=(4.0, 6.0, 8.0, 11.0), lr=2e-3, min_lr_frac=0.1, warmup=200,
              weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, eval_every_frac=0.05)
RECIPE_OVERRIDES: dict[str, dict] = {"tiny-llama": {}, "tiny-gelu": {}}


def log(*a) -> None:
    print(*a, flush=True)


def read_docs(path: Path) -> list[str]:
    """Return the documents of a corpus file in the bundled format (split on `<|doc|>` lines)."""
    text = path.read_text(encoding="utf-8")
    return [d.strip() for d in text.split(DOC_SEP) if d.strip()]


def stream(tok, docs: list[str]) -> np.ndarray:
    """Return uint16 ids: each document's tokens followed by EOS, as actsparse.perplexity builds them."""
    eos = tok.token_to_id(EOS)
    out: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        out.extend(enc.ids)
        out.append(eos)
    return np.asarray(out, dtype=np.uint16)


# ----------------------------------------------------------------------------------------------- prepare
def train_tokenizer(docs: list[str], vocab_size: int):
    """Return a byte-level BPE `tokenizers.Tokenizer` trained on docs (ids 0,1 = EOS, PAD)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def prepare(args) -> None:
    """Tokenizer + token streams into .corpus/."""
    from tokenizers import Tokenizer

    corpus = Path(args.corpus)
    tokdir = corpus / "tokens"  # everything the GPU run needs (carried there), nothing else
    tokdir.mkdir(parents=True, exist_ok=True)
    docs = read_docs(corpus / "train.txt")
    # validation slice: whole train documents, held out of training, to watch for overfitting
    order = list(range(len(docs)))
    random.Random(args.seed).shuffle(order)
    val_ids, used = set(), 0
    for i in order:
        if used >= args.val_bytes:
            break
        val_ids.add(i)
        used += len(docs[i].encode())
    train_docs = [d for i, d in enumerate(docs) if i not in val_ids]
    val_docs = [d for i, d in enumerate(docs) if i in val_ids]
    t0 = time.time()
    # the tokenizer sees the whole train split (train + val slice): val only guards the LM's fit
    tok = train_tokenizer(docs, args.vocab_size)
    tok.save(str(tokdir / "tokenizer.json"))
    tok = Tokenizer.from_file(str(tokdir / "tokenizer.json"))
    log(f"tokenizer: {tok.get_vocab_size()} ids in {time.time() - t0:.0f}s")
    eval_docs = read_docs(TEXT / "eval.txt")
    info = {"seed": args.seed, "vocab_size": tok.get_vocab_size(), "documents": {}}
    for name, d in (("train", train_docs), ("val", val_docs), ("eval", eval_docs),
                    ("train_full", docs)):
        ids = stream(tok, d)
        if name != "train_full":
            np.save(tokdir / f"{name}.npy", ids)
        info["documents"][name] = len(d)
        info[f"{name}_tokens"] = int(ids.size)
        if name == "train_full":
            # unigram baseline counts over the whole train split (what the model card reports)
            np.save(tokdir / "unigram_counts.npy", np.bincount(ids, minlength=tok.get_vocab_size()))
        log(f"{name}: {len(d)} documents, {ids.size:,} tokens, {sum(len(x.encode()) for x in d) / ids.size:.2f} bytes/token")
    (tokdir / "prepare.json").write_text(json.dumps(info, indent=1))


# ----------------------------------------------------------------------------------------------- train
def build_model(name: str):
    """Return a freshly initialised model for a reference architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(ARCHS[name])
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    return AutoModelForCausalLM.from_config(config)


def n_params(model) -> int:
    """Return the number of distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def stream_ppl(model, ids: np.ndarray, seq_len: int, device: str, batch: int = 32, autocast: bool = False) -> float:
    """Return exp(mean NLL) over disjoint seq_len windows of ids (trailing partial window dropped)."""
    n = ids.size // seq_len
    x_all = torch.from_numpy(ids[: n * seq_len].astype(np.int64)).view(n, seq_len)  # [n, T]
    nll, count = 0.0, 0
    model.eval()
    for b in range(0, n, batch):
        x = x_all[b:b + batch].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast and device.startswith("cuda")):
            logits = model(input_ids=x, use_cache=False).logits  # [B, T, V]
        lp = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        nll += float(lp)
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def lr_at(step: int, total: int, r: dict) -> float:
    """Linear warmup, then cosine from lr down to min_lr_frac * lr."""
    if step < r["warmup"]:
        return r["lr"] * (step + 1) / r["warmup"]
    t = (step - r["warmup"]) / max(1, total - r["warmup"])
    return r["lr"] * (r["min_lr_frac"] + (1 - r["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_one(name: str, args, data: dict[str, np.ndarray], deadline: float) -> dict:
    """Train one reference model; save it to args.out/<name>; return its metrics.

    The corpus is small, so the schedule length matters: every candidate length in
    RECIPE["epochs"] is trained from the same initial weights and data order (one compiled model,
    reloaded), and the run with the lowest validation perplexity is kept.
    """
    r = dict(RECIPE, **RECIPE_OVERRIDES[name])
    if args.smoke:  # a CPU check of the whole path, not a model
        r.update(batch_size=4, warmup=5)
        data = {k: (v if k == "train" else v[: 4 * SEQ_LEN]) for k, v in data.items()}
    dev = args.device
    use_cuda = dev.startswith("cuda")
    torch.manual_seed(r["seed"])
    np.random.seed(r["seed"])
    random.seed(r["seed"])
    model = build_model(name).to(dev)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = n_params(model)
    train_ids = torch.from_numpy(data["train"].astype(np.int64)).to(dev)  # [N] the whole stream on device
    n_train = train_ids.numel()
    tps = r["batch_size"] * r["seq_len"]  # tokens per step
    if args.steps:
        schedules = [args.steps]
    else:
        schedules = [int(round(e * n_train / tps)) for e in sorted(r["epochs"])]
    log(f"== {name}: {params:,} params, {n_train:,} train tokens, {tps} tokens/step, candidate schedules "
        + ", ".join(f"{t} steps ({t * tps / n_train:.1f} epochs)" for t in schedules))

    def make_opt():
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": r["weight_decay"]},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=r["lr"], betas=(r["beta1"], r["beta2"]), eps=1e-8, fused=use_cuda)

    gen = torch.Generator()
    offs = torch.arange(r["seq_len"] + 1, device=dev)

    def batch():
        # uniformly random windows of the stream (CPU generator: the same order on any device)
        starts = torch.randint(0, n_train - r["seq_len"] - 1, (r["batch_size"], 1), generator=gen)
        xy = train_ids[starts.to(dev) + offs]  # [B, T+1]
        return xy[:, :-1], xy[:, 1:]

    probe = use_cuda or args.probe  # --probe runs the compile + timing path on CPU too (to test it)
    fwd = torch.compile(model) if (probe and not args.no_compile) else model

    def sync():
        if use_cuda:
            torch.cuda.synchronize()

    def loss_fn(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda):
            logits = fwd(input_ids=x, use_cache=False).logits  # [B, T, V]
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def restart():
        model.load_state_dict(init_state)
        gen.manual_seed(r["seed"])
        model.train()
        return make_opt()

    # Compile and time a few steps: the measured step time decides which schedules fit the budget.
    if probe:
        t_compile = time.time()
        for attempt in range(2):
            opt = restart()
            try:
                for i in range(12):
                    if i == 2:
                        sync()
                        t_probe = time.time()
                    x, y = batch()
                    loss_fn(x, y).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                break
            except Exception as e:  # a compile failure must not cost the run: fall back to eager
                if fwd is model:
                    raise
                log(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); training eagerly")
                fwd = model
        sync()
        step_s = (time.time() - t_probe) / 10
        log(f"compile+probe {time.time() - t_compile:.1f}s; {step_s * 1e3:.1f} ms/step, {tps / step_s / 1e6:.2f} M tok/s")
        budget = min(args.budget_s, deadline - time.time() - 40)
        kept, need = [], 0.0
        for t in schedules:
            if need + t * step_s * 1.1 <= budget or not kept:
                kept.append(t)
                need += t * step_s * 1.1
        if kept != schedules:
            log(f"time budget {budget:.0f}s: training schedules {kept} of {schedules}")
        schedules = kept
        if schedules[0] * step_s > budget:
            schedules = [max(100, int(budget / step_s))]
            log(f"even the shortest schedule exceeds the budget: cut to {schedules[0]} steps")
        del opt

    runs = []
    for total in schedules:
        opt = restart()
        val_every = max(1, int(total * r["eval_every_frac"]))
        best_ppl, best_step, best_state, curve = float("inf"), -1, None, []
        t0 = time.time()
        for step in range(total):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, r)
            x, y = batch()
            loss = loss_fn(x, y)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % val_every == 0 or step + 1 == total:
                vppl = stream_ppl(model, data["val"], r["seq_len"], dev, autocast=True)
                model.train()
                tl = float(loss.detach())
                curve.append({"step": step + 1, "train_loss": round(tl, 4), "val_ppl": round(vppl, 3),
                              "lr": lr_at(step, total, r), "grad_norm": round(float(gn), 3),
                              "time_s": round(time.time() - t0, 1)})
                log(f"{name} [{total}] step {step + 1:5d} loss {tl:.4f} val_ppl {vppl:8.3f} "
                    f"lr {lr_at(step, total, r):.2e} gn {float(gn):.2f} {time.time() - t0:6.1f}s")
                if vppl < best_ppl:
                    best_ppl, best_step = vppl, step + 1
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        sync()
        runs.append({"steps": total, "epochs": round(total * tps / n_train, 2), "best_val_ppl": round(best_ppl, 3),
                     "best_step": best_step, "train_time_s": round(time.time() - t0, 1), "curve": curve,
                     "state": best_state})
        log(f"== {name} [{total} steps]: best val ppl {best_ppl:.3f} at step {best_step}, {time.time() - t0:.0f}s")
        del opt
    chosen = min(runs, key=lambda x: x["best_val_ppl"])
    model.load_state_dict(chosen["state"])
    model.eval()
    # what was trained, in float32 (no autocast), on the bundled eval split
    eval_ppl = stream_ppl(model, data["eval"], SEQ_LEN, dev, autocast=False)
    val_ppl = stream_ppl(model, data["val"], SEQ_LEN, dev, autocast=False)
    out = Path(args.out) / name
    model.to(torch.bfloat16).save_pretrained(out)
    dev_name = torch.cuda.get_device_name() if use_cuda else platform.processor() or "cpu"
    metrics = {
        "name": name, "params": params, "steps": chosen["steps"], "best_step": chosen["best_step"],
        "tokens_seen": chosen["best_step"] * tps, "train_tokens": n_train,
        "epochs_seen": round(chosen["best_step"] * tps / n_train, 2),
        "train_time_s": chosen["train_time_s"], "all_candidates_time_s": round(sum(x["train_time_s"] for x in runs), 1),
        "device": dev_name, "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "compiled": fwd is not model, "recipe": dict(r, steps=chosen["steps"]),
        "eval_ppl_fp32_device": round(eval_ppl, 4), "val_ppl_fp32_device": round(val_ppl, 4),
        "candidates": [{k: v for k, v in x.items() if k != "state"} for x in runs],
    }
    (Path(args.out) / f"{name}.metrics.json").write_text(json.dumps(metrics, indent=1))
    log(f"== {name}: chose {chosen['steps']} steps (best val ppl {chosen['best_val_ppl']:.3f} at step "
        f"{chosen['best_step']}); bundled:eval ppl {eval_ppl:.3f} (fp32)")
    del model, fwd, runs
    if use_cuda:
        torch.cuda.empty_cache()
    return metrics


def train(args) -> None:
    """Train every requested model on .corpus/ token streams."""
    t_start = time.time()
    deadline = t_start + args.deadline_s
    tokdir = Path(args.corpus) / "tokens"
    data = {k: np.load(tokdir / f"{k}.npy") for k in ("train", "val", "eval")}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    names = args.models.split(",")
    for i, name in enumerate(names):
        if name not in ARCHS:
            sys.exit(f"unknown model {name!r}; expected one of {', '.join(ARCHS)}")
        train_one(name, args, data, deadline=t_start + (deadline - t_start) * (i + 1) / len(names)
                  if not args.steps else deadline)
    log(f"all done in {time.time() - t_start:.0f}s")


# ----------------------------------------------------------------------------------------------- finalize
def unigram_ppl(counts: np.ndarray, eval_ids: np.ndarray, seq_len: int) -> float:
    """Return the add-one-smoothed unigram perplexity on the tokens actsparse.perplexity scores."""
    p = (counts.astype(np.float64) + 1) / (counts.sum() + counts.size)
    n = eval_ids.size // seq_len
    targets = eval_ids[: n * seq_len].reshape(n, seq_len)[:, 1:]  # what each window predicts
    return float(np.exp(-np.log(p[targets.astype(np.int64)]).mean()))


def write_tokenizer(dest: Path, tokenizer_json: Path) -> None:
    """Save the tokenizer so AutoTokenizer loads it unchanged (no class rebuilt from model_type)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=EOS, bos_token=EOS,
                                  pad_token=PAD, unk_token=None, model_max_length=ARCH_MAX_LEN,
                                  clean_up_tokenization_spaces=False)
    tok.save_pretrained(dest)
    # transformers 5 maps model_type -> tokenizer class (LlamaTokenizer, GPTNeoXTokenizer) and would
    # rebuild the pre-tokenizer from vocab + merges; naming the generic fast class keeps tokenizer.json
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


ARCH_MAX_LEN = 1024


def describe(name: str, cfg: dict) -> str:
    """Return the one-paragraph architecture description for the card."""
    if cfg["model_type"] == "llama":
        return (f"`LlamaForCausalLM`: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
                f"{cfg['num_attention_heads']} query heads / {cfg['num_key_value_heads']} key-value heads "
                f"(grouped-query attention, head_dim {cfg['hidden_size'] // cfg['num_attention_heads']}), "
                f"SwiGLU MLP with intermediate size {cfg['intermediate_size']}, RMSNorm, RoPE "
                f"(theta {cfg['rope_parameters']['rope_theta']:g}), no biases, tied input/output embedding, "
                f"vocabulary {cfg['vocab_size']}, context {cfg['max_position_embeddings']}.")
    return (f"`GPTNeoXForCausalLM`: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
            f"{cfg['num_attention_heads']} heads (head_dim {cfg['hidden_size'] // cfg['num_attention_heads']}), "
            f"two-layer MLP `dense_4h_to_h(gelu(dense_h_to_4h(x)))` with intermediate size "
            f"{cfg['intermediate_size']} and biases on every linear layer, LayerNorm, parallel residual, "
            f"partial RoPE ({cfg['rope_parameters']['partial_rotary_factor']:g} of each head), tied "
            f"input/output embedding, vocabulary {cfg['vocab_size']}, context {cfg['max_position_embeddings']}.")


def finalize(args) -> None:
    """Turn trained folders into committed model folders with tokenizer, measured numbers and card."""
    sys.path.insert(0, str(REPO))
    import transformers
    from transformers import AutoModelForCausalLM

    import actsparse as asp

    corpus = Path(args.corpus)
    trained = Path(args.trained)
    counts = np.load(corpus / "tokens" / "unigram_counts.npy")
    eval_ids = np.load(corpus / "tokens" / "eval.npy")
    prep = json.loads((corpus / "tokens" / "prepare.json").read_text())
    manifest = json.loads((corpus / "manifest.json").read_text())
    uni = unigram_ppl(counts, eval_ids, SEQ_LEN)
    uni_sub = unigram_ppl(counts, eval_ids[:CARD_SUBSET_TOKENS], SEQ_LEN)
    log(f"unigram ppl on bundled:eval: {uni:.2f} (first {CARD_SUBSET_TOKENS} tokens: {uni_sub:.2f})")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for name in args.models.split(","):
        src, dest = trained / name, Path(args.dest) / name
        metrics = json.loads((trained / f"{name}.metrics.json").read_text())
        old = dest / "eval_results.json"
        reused = json.loads(old.read_text()) if (args.reuse_results and old.exists()) else None
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        if dest.exists():
            shutil.rmtree(dest)
        model.save_pretrained(dest)
        write_tokenizer(dest, corpus / "tokens" / "tokenizer.json")
        shutil.copy(trained / f"{name}.metrics.json", dest / "training_metrics.json")
        cfg = json.loads((dest / "config.json").read_text())
        if reused is not None:  # same weights (the safetensors are byte-identical): only the card changes
            (dest / "eval_results.json").write_text(json.dumps(reused, indent=1) + "\n")
            (dest / "README.md").write_text(card(name, cfg, metrics, reused, prep, manifest, 0))
            size = sum(f.stat().st_size for f in dest.iterdir())
            (dest / "README.md").write_text(card(name, cfg, metrics, reused, prep, manifest, size))
            log(f"{name}: rewrote the card with the stored results ({size / 1e6:.2f} MB)")
            continue
        m, tok = asp.load_model(str(dest), dtype="float32", device="cpu")
        t0 = time.time()
        ppl = asp.perplexity(m, tok, asp.text_data("bundled:eval"), seq_len=SEQ_LEN)
        ppl_sub = asp.perplexity(m, tok, asp.text_data("bundled:eval"), seq_len=SEQ_LEN,
                                 max_tokens=CARD_SUBSET_TOKENS)
        log(f"{name}: bundled:eval ppl {ppl:.3f} (first {CARD_SUBSET_TOKENS} tokens {ppl_sub:.3f}) "
            f"in {time.time() - t0:.0f}s; device fp32 said {metrics['eval_ppl_fp32_device']:.3f}")
        results = {"ppl_bundled_eval": round(ppl, 3), f"ppl_bundled_eval_first_{CARD_SUBSET_TOKENS}": round(ppl_sub, 3),
                   "unigram_ppl_bundled_eval": round(uni, 3),
                   f"unigram_ppl_bundled_eval_first_{CARD_SUBSET_TOKENS}": round(uni_sub, 3),
                   "measured_with": f"transformers {transformers.__version__}, torch {torch.__version__}"}
        (dest / "eval_results.json").write_text(json.dumps(results, indent=1) + "\n")
        (dest / "README.md").write_text(card(name, cfg, metrics, results, prep, manifest, 0))
        size = sum(f.stat().st_size for f in dest.iterdir())  # the card's own size barely changes with it
        (dest / "README.md").write_text(card(name, cfg, metrics, results, prep, manifest, size))
        for f in dest.iterdir():
            f.chmod(0o644)
        log(f"{name}: wrote {dest} ({size / 1e6:.2f} MB)")


def card(name: str, cfg: dict, m: dict, res: dict, prep: dict, manifest: dict, size: int) -> str:
    """Return the model card (README.md) text."""
    r = m["recipe"]
    pkgs = ", ".join(f"{p} {v['version']}" for p, v in manifest["packages"].items())
    sub = CARD_SUBSET_TOKENS
    cands = ", ".join(f"{c['epochs']:g} epochs ({c['steps']} steps, val ppl {c['best_val_ppl']:.2f})"
                      for c in m["candidates"])
    return f"""---
license: apache-2.0
language: en
library_name: transformers
pipeline_tag: text-generation
---
# {name}

A small reference causal language model bundled with actsparse so that activation-sparsity
statistics, thresholds and perplexities are measured on a *trained* model offline. It is trained
from scratch by `scripts/train_reference_models.py` on English technical prose from Debian's
documentation packages ({pkgs}); see `actsparse/assets/text/README.md`.

| | |
|---|---|
| architecture | {describe(name, cfg)} |
| parameters | {m['params']:,} (tied embedding counted once; {cfg['vocab_size'] * cfg['hidden_size']:,} of them in the embedding) |
| weights | `model.safetensors`, bfloat16; folder size {size / 1e6:.2f} MB |
| tokenizer | byte-level BPE, {cfg['vocab_size']} ids, trained with `tokenizers` on the train split; `<|endoftext|>` = 0 (EOS, also BOS), `<|pad|>` = 1; no BOS is added |
| training data | train split of the bundled corpus: {m['train_tokens']:,} tokens ({prep['documents']['train']} documents), a held-out validation slice of {prep['val_tokens']:,} tokens ({prep['documents']['val']} train documents) |
| tokens seen | {m['tokens_seen']:,} ({m['epochs_seen']} epochs) |
| steps | {m['best_step']} of a {m['steps']}-step cosine schedule, batch {r['batch_size']} x {r['seq_len']} tokens; the schedule was chosen by validation perplexity among {cands} (each from the same initial weights and data order), and within it the step with the best validation perplexity |
| optimiser | AdamW (beta {r['beta1']}, {r['beta2']}; weight decay {r['weight_decay']} on matrices), peak LR {r['lr']:g}, {r['warmup']} warmup steps, cosine to {r['min_lr_frac']:g} x peak, grad clip {r['grad_clip']}, bf16 autocast{', torch.compile' if m['compiled'] else ''}, seed {r['seed']} |
| training time | {m['train_time_s']:.0f} s for the chosen schedule, {m['all_candidates_time_s']:.0f} s for all candidates (compile excluded), on one {m['device']} (torch {m['torch']}, transformers {m['transformers']}) |

## Held-out perplexity (`bundled:eval`, seq_len 512, disjoint windows, all tokens scored)

| model | bundled:eval (all {prep['eval_tokens']:,} tokens) | first {sub:,} tokens |
|---|---|---|
| **{name}** | **{res['ppl_bundled_eval']:.2f}** | {res[f'ppl_bundled_eval_first_{sub}']:.2f} |
| unigram of the same tokenizer (add-one, counts from the train split) | {res['unigram_ppl_bundled_eval']:.2f} | {res[f'unigram_ppl_bundled_eval_first_{sub}']:.2f} |

Measured with `actsparse.perplexity(model, tok, actsparse.text_data("bundled:eval"), seq_len=512)`
on CPU in float32 ({res['measured_with']}): documents joined with EOS into one stream, cut into
disjoint 512-token windows (the trailing partial window dropped), exp of the mean NLL of the 511
predicted tokens of every window. The "first {sub:,} tokens" column passes `max_tokens={sub}`
(what `tests/test_reference_models.py` re-checks). On the training GPU the same protocol, with the
float32 weights before the bfloat16 export, gave {m['eval_ppl_fp32_device']:.2f}. The unigram row
fits add-one-smoothed token frequencies on the whole train split ({prep['train_full_tokens']:,}
tokens) and scores the same predicted tokens.

## Use

```python
import actsparse as asp
model, tok = asp.load_model("{name}")        # or AutoModelForCausalLM.from_pretrained(<this folder>)
```

The model knows technical documentation (PostgreSQL, Python, Rust, CMake, Erlang, ...), nothing
else; it is a measuring instrument for sparsity research, not an assistant. `training_metrics.json`
holds the full recipe and the validation curve of every candidate schedule; `eval_results.json` the
numbers above.

## Reproduce

```bash
python scripts/build_corpus.py                              # Debian docs -> .corpus/train.txt, bundled texts
python scripts/train_reference_models.py prepare            # tokenizer + token streams -> .corpus/tokens/
bash scripts/device_train_reference.sh                      # on one GPU: both models, ~6 min with compile
python scripts/train_reference_models.py finalize --trained <trained folders>   # tokenizer, numbers, card
```

`python scripts/train_reference_models.py all` runs every stage on one machine. Seeds fix the
initial weights and the data order; GPU kernels are not bitwise deterministic, so a retrained model
matches these numbers to within noise, not to the bit.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("prepare", "train", "finalize", "all"))
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=VOCAB)
    ap.add_argument("--val-bytes", type=int, default=600_000)
    ap.add_argument("--models", default="tiny-llama,tiny-gelu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="override the schedule length (smoke tests)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="max training-loop seconds per model")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="wall-clock limit for all models")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny batch and eval slices: check the path on CPU")
    ap.add_argument("--probe", action="store_true", help="compile and time steps before training, also on CPU")
    ap.add_argument("--out", default=str(REPO / "build" / "reference_models"), help="trained folders (train)")
    ap.add_argument("--trained", default=str(REPO / "build" / "reference_models"), help="input of finalize")
    ap.add_argument("--dest", default=str(MODELS))
    ap.add_argument("--reuse-results", action="store_true",
                    help="finalize: keep the perplexities in <dest>/<name>/eval_results.json, rewrite only the card")
    args = ap.parse_args()
    if args.stage in ("prepare", "all"):
        prepare(args)
    if args.stage in ("train", "all"):
        train(args)
    if args.stage in ("finalize", "all"):
        if args.stage == "all":
            args.trained = args.out
        finalize(args)


if __name__ == "__main__":
    main()
