"""The bundled reference models load offline, generate, tokenize exactly like their raw tokenizer,
and reach the perplexity their model cards state."""
from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import actsparse as asp

MODELS_DIR = Path(asp.__file__).resolve().parent / "assets" / "models"
NAMES = ("tiny-llama", "tiny-gelu")
CARD_SUBSET_TOKENS = 16_384  # scripts/train_reference_models.py: the card's "first N tokens" column
PROMPT = "The PostgreSQL server uses a configuration file to"


@pytest.fixture(scope="module", params=NAMES)
def bundled(request):
    """(name, model, tokenizer) for each bundled model, loaded by name on CPU."""
    torch.manual_seed(0)
    model, tok = asp.load_model(request.param)
    return request.param, model, tok


def card_numbers(name: str) -> dict[str, float]:
    """Perplexities stated in the model card's table: full eval, first-N eval, and the unigram row."""
    text = (MODELS_DIR / name / "README.md").read_text()
    row = re.search(rf"^\| \*\*{re.escape(name)}\*\* \| \*\*([\d.]+)\*\* \| ([\d.]+) \|$", text, re.M)
    uni = re.search(r"^\| unigram of the same tokenizer[^|]*\| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert row and uni, f"model card of {name} lacks its perplexity table"
    assert f"first {CARD_SUBSET_TOKENS:,} tokens" in text
    return {"ppl": float(row[1]), "ppl_subset": float(row[2]), "unigram": float(uni[1])}


def test_bundled_model_loads_by_name_on_cpu_in_under_5s(bundled):
    name, model, tok = bundled
    # the fixture paid for importing torch/transformers and their model classes; this times the load
    t0 = time.perf_counter()
    again, _ = asp.load_model(name)
    load_s = time.perf_counter() - t0
    assert load_s < 5.0, f"{name} took {load_s:.2f}s to load"
    assert type(again) is type(model)
    p = next(model.parameters())
    assert p.device.type == "cpu" and p.dtype == torch.float32
    assert not model.training
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1


def test_bundled_model_loads_with_plain_transformers_to_the_same_weights(bundled):
    from transformers import AutoModelForCausalLM

    name, model, _ = bundled
    plain = AutoModelForCausalLM.from_pretrained(MODELS_DIR / name, dtype=torch.float32)
    assert type(plain) is type(model)
    theirs = plain.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, theirs[k]), k


def test_architectures_are_what_the_issue_promises(bundled):
    name, model, _ = bundled
    cfg = model.config
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert cfg.num_hidden_layers >= 4
    if name == "tiny-llama":
        assert type(model).__name__ == "LlamaForCausalLM"
        assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
        assert cfg.hidden_act == "silu" and hasattr(model.model.layers[0].mlp, "gate_proj")  # SwiGLU
        assert all(m.bias is None for m in linears)
        assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    else:
        assert type(model).__name__ == "GPTNeoXForCausalLM"
        assert cfg.hidden_act == "gelu"
        body = [m for m in linears if m is not model.get_output_embeddings()]
        assert all(m.bias is not None for m in body)  # biases on every linear layer of the blocks
        assert model.gpt_neox.layers[0].mlp.dense_h_to_4h.out_features == cfg.intermediate_size


def test_both_model_folders_fit_in_24_mb():
    total = sum(f.stat().st_size for n in NAMES for f in (MODELS_DIR / n).iterdir() if f.is_file())
    assert total <= 24_000_000, f"bundled models take {total / 1e6:.2f} MB"


def test_autotokenizer_gives_the_raw_tokenizer_ids_on_bundled_text(bundled):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    name, _, _ = bundled
    folder = MODELS_DIR / name
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(folder)
    docs = list(asp.text_data("bundled:eval").documents) + list(asp.text_data("bundled:calib").documents[:40])
    docs.append("Odd  spacing\ttabs,\n\n\nunicode: naïve café — “quotes” 🙂 and <|endoftext|> as text")
    for doc in docs:
        want = raw.encode(doc, add_special_tokens=False).ids
        assert hf(doc, add_special_tokens=False)["input_ids"] == want
        assert hf(doc)["input_ids"] == want  # no BOS/EOS is added by default
    # byte-level BPE: decoding gives the text back exactly
    for doc in docs[:20]:
        assert hf.decode(hf(doc)["input_ids"]) == doc


def test_greedy_generation_from_a_real_prompt_is_not_degenerate(bundled):
    name, model, tok = bundled
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) >= 16
    assert len(set(new)) >= 8, f"{name} repeats itself: {tok.decode(new)!r}"
    assert tok.pad_token_id not in new
    text = tok.decode(new)
    assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.8, text


def test_model_prefers_real_text_to_the_same_tokens_shuffled(bundled):
    name, model, tok = bundled
    doc = asp.text_data("bundled:eval").documents[3]
    ids = torch.tensor(tok(doc)["input_ids"][:256])[None]  # [1, T]
    rng = random.Random(0)
    perm = list(range(ids.shape[1]))
    rng.shuffle(perm)
    shuffled = ids[:, perm]

    def nll(x):
        with torch.no_grad():
            logits = model(x).logits  # [1, T, V]
        return float(F.cross_entropy(logits[0, :-1], x[0, 1:]))

    real, shuf = nll(ids), nll(shuffled)
    assert real < shuf - 1.5, f"{name}: real text nll {real:.2f}, shuffled {shuf:.2f}"


def test_perplexity_on_bundled_eval_matches_the_model_card(bundled):
    name, model, tok = bundled
    card = card_numbers(name)
    ppl = asp.perplexity(model, tok, asp.text_data("bundled:eval"), seq_len=512, max_tokens=CARD_SUBSET_TOKENS)
    assert ppl == pytest.approx(card["ppl_subset"], rel=0.02)
    # the card's full-eval number is well below the unigram baseline of the same tokenizer
    assert card["ppl"] < 0.25 * card["unigram"]
    if name == "tiny-llama":
        assert card["ppl"] < 40
