"""Hugging Face `generate` on the decode engine's preset shapes: the stock baseline the dense engine is measured
against (random weights, batch 1, greedy, static KV cache, `torch.compile` of the decode step with CUDA graphs).

  python benchmarks/hf_generate.py --presets qwen3-8b,gemma2-9b --out DIR [--layers N] [--steps 48] [--no-compile]

Prints a table and writes DIR/hf_generate.json (meta and one row per preset; a preset that fails, e.g. does not
compile, gets a row with its error). `benchmarks/bench_kernels.py --hf-baseline` adds the same figure beside the
engine's dense tokens/s in its decode table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import inspect
import json
import os
import pathlib
import statistics
import sys
import time
import traceback
from dataclasses import fields
from typing import Callable

import torch
from transformers import LogitsProcessor

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from actsparse.engine.config import PRESETS, LlamaConfig, unsupported_reason  # noqa: E402

# The transformers model_type each preset's published model is: the engine's config keeps shapes and the family's
# spec, not the family itself (Phi-3 and Granite are the Llama block with other weight layouts or multipliers).
PRESET_FAMILY = {"llama3-8b": "llama", "llama3-70b": "llama", "llama2-7b": "llama", "tiny": "llama",
                 "qwen2.5-7b": "qwen2", "qwen3-8b": "qwen3", "phi3-mini": "phi3", "granite3-8b": "granite",
                 "gemma2-9b": "gemma2", "gemma3-12b": "gemma3_text", "qwen3-30b-a3b": "qwen3_moe",
                 "mixtral-8x7b": "mixtral", "qwen1.5-moe-a2.7b": "qwen2_moe"}
HF_FAMILIES = ("llama", "qwen2", "qwen3", "phi3", "granite", "gemma2", "gemma3_text", "mixtral", "qwen2_moe",
               "qwen3_moe")
# Granite 3.0 8B's published multipliers: the engine folds them into its weights, transformers applies them each
# step (scalar multiplies, so they cost HF what the real model costs it).
GRANITE3_MULTIPLIERS = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
                            logits_scaling=16.0)
MAX_POSITIONS = 8192  # any length past prompt + steps: it sizes no tensor the baseline allocates


def log(*a) -> None:
    print(*a, flush=True)


def _family_of(cfg: LlamaConfig) -> str:
    """The transformers family an engine config reads as when no preset name says (Phi-3 and Granite shapes read as
    Llama: pass family= for those)."""
    if cfg.moe:
        return ("mixtral" if cfg.router == "mixtral" else "qwen2_moe" if cfg.shared_expert_intermediate_size
                else "qwen3_moe")
    if cfg.act == "gelu_tanh":
        return "gemma2" if cfg.attn_softcap or not cfg.qk_norm else "gemma3_text"
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def _resolve(preset: str | LlamaConfig, family: str | None) -> tuple[LlamaConfig, str, str]:
    """(engine config, transformers family, a name for messages) of a preset name or an engine config."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown engine preset {preset!r}; expected one of {', '.join(PRESETS)}")
        cfg, fam, name = PRESETS[preset], family or PRESET_FAMILY[preset], preset
    elif isinstance(preset, LlamaConfig):
        cfg, fam, name = preset, family or _family_of(preset), "this engine config"
    else:
        raise TypeError(f"preset must be an engine preset name or an actsparse LlamaConfig, got "
                        f"{type(preset).__name__}")
    if fam not in HF_FAMILIES:
        raise ValueError(f"unknown transformers family {fam!r}; expected one of {', '.join(HF_FAMILIES)}")
    return cfg, fam, name


def hf_config_for(preset: str | LlamaConfig, *, n_layers: int | None = None, family: str | None = None):
    """Return the transformers config whose model has exactly the engine preset's shapes and family spec
    (`LlamaConfig.from_hf` of it gives the preset back; checked, refused with the differing fields otherwise)."""
    import transformers as tr

    cfg, fam, name = _resolve(preset, family)
    if n_layers:
        cfg = cfg.with_layers(n_layers)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor != 1.0:
        rope = {"rope_type": "linear", "factor": cfg.rope_factor, "rope_theta": cfg.rope_theta}
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                  rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
                  max_position_embeddings=MAX_POSITIONS, pad_token_id=0, bos_token_id=0, eos_token_id=None)
    if fam in ("qwen2", "phi3", "granite", "qwen2_moe") and cfg.head_dim * cfg.n_heads != cfg.hidden_size:
        # these classes take head_dim = hidden_size / heads, whatever the config says
        raise ValueError(f"a {fam} model's head_dim is hidden_size / heads = {cfg.hidden_size // cfg.n_heads}; "
                         f"{name} has head_dim {cfg.head_dim}: pick a family with its own head_dim (llama, qwen3)")
    local = cfg.local_layers or (False,) * cfg.n_layers
    layer_types = ["sliding_attention" if loc else "full_attention" for loc in local]
    if fam == "llama":
        hf = tr.LlamaConfig(**common, head_dim=cfg.head_dim, rope_parameters=rope)
    elif fam == "qwen2":
        hf = tr.Qwen2Config(**common, rope_parameters=rope, use_sliding_window=False)
    elif fam == "qwen3":
        hf = tr.Qwen3Config(**common, head_dim=cfg.head_dim, rope_parameters=rope, use_sliding_window=False)
    elif fam == "phi3":
        hf = tr.Phi3Config(**common, rope_parameters=rope, sliding_window=None,
                           original_max_position_embeddings=MAX_POSITIONS)
    elif fam == "granite":
        hf = tr.GraniteConfig(**common, rope_parameters=rope, **GRANITE3_MULTIPLIERS)
    elif fam == "mixtral":  # its intermediate_size is each expert's
        hf = tr.MixtralConfig(**{**common, "intermediate_size": cfg.moe_intermediate_size}, head_dim=cfg.head_dim,
                              rope_parameters=rope, sliding_window=cfg.sliding_window or None,
                              num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k)
    elif fam == "qwen2_moe":
        hf = tr.Qwen2MoeConfig(**common, rope_parameters=rope, use_sliding_window=False, qkv_bias=cfg.qkv_bias,
                               num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                               moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                               shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                               decoder_sparse_step=1, mlp_only_layers=[])
    elif fam == "qwen3_moe":
        hf = tr.Qwen3MoeConfig(**common, head_dim=cfg.head_dim, rope_parameters=rope, use_sliding_window=False,
                               num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                               moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                               decoder_sparse_step=1, mlp_only_layers=[])
    else:
        scalar = cfg.attn_scale**-2 if cfg.attn_scale else float(cfg.head_dim)
        scalar = round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar
        gemma = dict(**common, head_dim=cfg.head_dim, hidden_activation="gelu_pytorch_tanh",
                     query_pre_attn_scalar=scalar, sliding_window=cfg.sliding_window or None, layer_types=layer_types,
                     final_logit_softcapping=cfg.final_softcap or None)
        if fam == "gemma2":
            # Soft-capped scores are part of the model and only eager attention applies them: up to transformers
            # 5.20 Gemma 2's default SDPA silently drops them (5.21 on refuses SDPA for it).
            attn = {"attn_implementation": "eager"} if cfg.attn_softcap else {}
            hf = tr.Gemma2Config(**gemma, rope_parameters=rope, attn_logit_softcapping=cfg.attn_softcap or None,
                                 **attn)
        else:
            local_rope = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
            hf = tr.Gemma3TextConfig(**gemma, attn_logit_softcapping=None,
                                     rope_parameters={"full_attention": rope, "sliding_attention": local_rope})
    why = unsupported_reason(hf)
    if why:
        raise ValueError(f"the {fam} config built for {name} is one the engine refuses: {why}")
    back = LlamaConfig.from_hf(hf)
    if back != cfg:
        diff = {f.name: (getattr(cfg, f.name), getattr(back, f.name)) for f in fields(LlamaConfig)
                if getattr(cfg, f.name) != getattr(back, f.name)}
        raise ValueError(f"no {fam} transformers config has exactly {name}'s spec; (wanted, built) per field: {diff}")
    return hf


class _StepClock(LogitsProcessor):
    """A logits processor that stamps the time each new token's logits are ready (CUDA events: no sync)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stamps: list = []

    def start(self):
        self.stamps = []
        return self._now()

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def __call__(self, input_ids, scores):
        self.stamps.append(self._now())
        return scores

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def hf_generate_speed(preset: str | LlamaConfig, *, n_layers: int | None = None, steps: int = 48,
                      prompt_len: int = 16, compile: bool = True, device: str = "cuda",
                      dtype: torch.dtype = torch.bfloat16, reps: int = 3, warmup: int = 2, fullgraph: bool = True,
                      family: str | None = None, seed: int = 0, progress: Callable = log) -> dict:
    """Time `model.generate` (random weights, batch 1, greedy, `steps` new tokens, static cache, the decode step
    compiled) and return its figures: tok_s (decode steps only, as the engine's decode counts them), tok_s_call (new
    tokens over the whole call, prefill included), step times, compile time, and the generated tokens."""
    import transformers as tr
    from transformers import LogitsProcessorList, StaticCache

    if steps < 2 or prompt_len < 1:
        raise ValueError(f"need steps ≥ 2 (the first token comes from the prefill) and prompt_len ≥ 1; got steps "
                         f"{steps}, prompt_len {prompt_len}")
    config = hf_config_for(preset, n_layers=n_layers, family=family)
    dev = torch.device(device)
    t0 = time.time()
    torch.manual_seed(seed)
    with torch.device(dev):
        model = tr.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = None, 0, 0
    gen.cache_implementation = None  # the cache is ours (below); generate refuses a cache and an implementation
    progress(f"  {type(model).__name__}, {config.num_hidden_layers} layers, attention "
             f"{model.config._attn_implementation}, built on {device} in {time.time() - t0:.1f}s")

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, config.vocab_size, (1, prompt_len), generator=g).to(dev)
    # One cache for every call, reset in place: its tensors keep their addresses, so the CUDA graphs recorded
    # while warming up replay in the timed calls instead of being recorded again per call.
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + steps)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    clock = _StepClock(dev)
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
              logits_processor=LogitsProcessorList([clock]), **{cache_kw: cache})
    if compile:
        kw["compile_config"] = tr.CompileConfig(fullgraph=fullgraph, mode="reduce-overhead")
    else:
        kw["disable_compile"] = True

    def call() -> tuple[torch.Tensor, float, object]:
        cache.reset()
        sync()
        start, t = clock.start(), time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, **kw)
        sync()
        return out, time.perf_counter() - t, start

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    try:
        t0 = time.time()
        for _ in range(warmup):
            call()
        warm_s = time.time() - t0
        compiled = getattr(model, "_compiled_call", None) is not None
        progress(f"  {warmup} warm-up calls{' (compiling)' if compile else ''}: {warm_s:.1f}s; decode step "
                 f"compiled: {compiled}")
        runs = []
        for _ in range(reps):
            out, wall, start = call()
            new = out.shape[1] - prompt_len
            if new != steps or len(clock.stamps) != steps:
                raise RuntimeError(f"generate made {new} new tokens ({len(clock.stamps)} steps) for {steps} asked")
            step_ms = [clock.ms(a, b) for a, b in zip(clock.stamps, clock.stamps[1:])]
            runs.append({"call": steps / wall, "decode": 1e3 * len(step_ms) / sum(step_ms),
                         "first_token_ms": clock.ms(start, clock.stamps[0]), "step_ms": step_ms})
    finally:
        kw.clear()
        del model, cache
        gc.collect()
        if compile:
            torch._dynamo.reset()  # frees the compiled step's graphs and their memory pool
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    mid = sorted(runs, key=lambda r: r["decode"])[len(runs) // 2]
    res = {"tok_s": round(statistics.median(r["decode"] for r in runs), 1),
           "tok_s_call": round(statistics.median(r["call"] for r in runs), 1),
           "step_ms": round(1e3 / mid["decode"], 3), "step_ms_median": round(statistics.median(mid["step_ms"]), 3),
           "step_ms_max": round(max(mid["step_ms"]), 3), "first_token_ms": round(mid["first_token_ms"], 2),
           "warmup_s": round(warm_s, 1), "compiled": compiled,
           "compile": f"reduce-overhead{' fullgraph' if fullgraph else ''}" if compile else "off",
           "attn": config._attn_implementation or "sdpa", "family": config.model_type,
           "layers": config.num_hidden_layers, "new_tokens": int(out.shape[1] - prompt_len), "tokens": out.tolist()}
    progress(f"  {res['tok_s']:.1f} tok/s decode steps ({res['step_ms']:.2f} ms/step, median "
             f"{res['step_ms_median']:.2f}, max {res['step_ms_max']:.2f}), {res['tok_s_call']:.1f} tok/s whole call "
             f"(first token after {res['first_token_ms']:.1f} ms)")
    return res


def hf_generate_tok_s(preset: str | LlamaConfig, *, n_layers: int | None = None, steps: int = 48,
                      prompt_len: int = 16, compile: bool = True, device: str = "cuda",
                      dtype: torch.dtype = torch.bfloat16) -> float:
    """Return the median over 3 timed `generate` calls of new tokens per second of the whole call (prefill
    included; `hf_generate_speed` has the decode-steps-only figure too)."""
    return hf_generate_speed(preset, n_layers=n_layers, steps=steps, prompt_len=prompt_len, compile=compile,
                             device=device, dtype=dtype)["tok_s_call"]


def baseline_row(preset: str, **kw) -> dict:
    """One table row for a preset: its figures, or its error (the run goes on with the next preset)."""
    try:
        got = hf_generate_speed(preset, **kw)
        got.pop("tokens")
        return {"model": preset, **got}
    except Exception as e:  # a model that does not build or compile is a result, not the end of the run
        traceback.print_exc()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"model": preset, "tok_s": None, "error": f"{type(e).__name__}: {str(e).strip()[:2000]}"}


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    out = ["| model | family | layers | attention | compile | tok/s (decode steps) | tok/s (whole call) | "
           "ms/step | warm-up s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['model']} | | | | | error: {r['error'].splitlines()[0][:200]} | | | |")
            continue
        out.append(f"| {r['model']} | {r['family']} | {r['layers']} | {r['attn']} | {r['compile']} | "
                   f"{r['tok_s']:.1f} | {r['tok_s_call']:.1f} | {r['step_ms']:.2f} | {r['warmup_s']:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", required=True, help=f"engine presets, comma-separated ({', '.join(PRESETS)})")
    ap.add_argument("--out", type=pathlib.Path, required=True, help="folder for hf_generate.json")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers than the model has (0: all)")
    ap.add_argument("--steps", type=int, default=48, help="new tokens per call (default: %(default)s)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--no-compile", action="store_true", help="eager decode steps (static cache still)")
    ap.add_argument("--no-fullgraph", action="store_true", help="let torch.compile break the step into graphs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    bad = [p for p in presets if p not in PRESETS]
    if bad:
        ap.error(f"unknown engine preset(s) {', '.join(bad)}; expected some of {', '.join(PRESETS)}")
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    import transformers

    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "commit": os.environ.get("COMMIT", "unknown"), "torch": torch.__version__,
            "transformers": transformers.__version__, "dtype": str(dtype).removeprefix("torch."), "batch": 1,
            "steps": args.steps, "prompt_len": args.prompt_len,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    log(f"device {meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in presets:
        log(f"[hf-generate {p}]")
        rows.append(baseline_row(p, n_layers=args.layers or None, steps=args.steps, prompt_len=args.prompt_len,
                                 compile=not args.no_compile, fullgraph=not args.no_fullgraph, device=args.device,
                                 dtype=dtype))
        (args.out / "hf_generate.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    log(table(rows))


if __name__ == "__main__":
    main()
