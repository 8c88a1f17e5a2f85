"""Write a random-weight Hugging Face model folder at an engine preset's real shapes, for sweeps on a machine that
cannot download models (the GPU device machine): config.json and safetensors from `benchmarks/hf_generate.py`'s
`hf_config_for` (the family's own transformers config, checked to read back as the preset), and the bundled
tiny-llama tokenizer (ids below the preset's vocabulary, so any of its rows can be looked up).

    python scripts/device/random_model.py --preset qwen3-8b --layers 8 --out /tmp/random-qwen3 [--device cuda]

The weights are random: the work a sweep does on them (calibration, fits, perplexity, decode speed) is real and
takes what the real model's takes per layer; the perplexities mean nothing. The tokenizer must give the same ids
through `AutoTokenizer.from_pretrained(out)` as from its bundled folder (transformers 5 picks a tokenizer class
from model_type and may rebuild the pre-tokenizer): checked, and the folder is refused otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "actsparse" / "assets" / "models" / "tiny-llama"
SAMPLE = ("Sparse activations skip the weight rows of inputs near zero. Ünïcödé, tabs\tand  double spaces, "
          "numbers 3.14159 and 2026-12-08, code: def f(x): return x * 2\n")


def build(preset, out: Path, *, layers: int | None = None, device: str = "cpu", seed: int = 0,
          family: str | None = None) -> str:
    """Write the folder for a preset name (or an engine LlamaConfig, with `family` where its shapes read as
    another family); return a one-line summary. Raises ValueError when the tokenizer does not round-trip or does
    not fit the vocabulary."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.hf_generate import hf_config_for

    t0 = time.time()
    cfg = hf_config_for(preset, n_layers=layers, family=family)
    name = preset if isinstance(preset, str) else cfg.model_type
    src = AutoTokenizer.from_pretrained(TOKENIZER)
    if len(src) > cfg.vocab_size:
        raise ValueError(f"the bundled tokenizer has {len(src)} tokens, more than {name}'s vocabulary "
                         f"{cfg.vocab_size}")
    out.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    cfg.pad_token_id = src.pad_token_id
    cfg.bos_token_id = cfg.eos_token_id = src.eos_token_id
    cfg.save_pretrained(out)
    back = AutoTokenizer.from_pretrained(out)
    want, got = src(SAMPLE)["input_ids"], back(SAMPLE)["input_ids"]
    if want != got:
        raise ValueError(f"the tokenizer copied into {out} ({type(back).__name__}) gives other ids than the bundled "
                         f"one ({type(src).__name__}): {got[:12]}… vs {want[:12]}…")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    return (f"{name} ({cfg.model_type}, {cfg.num_hidden_layers} layers): {n / 1e9:.2f} B random parameters, "
            f"tokenizer {type(back).__name__} ({len(back)} tokens, ids as bundled) in {out} ({time.time() - t0:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, help="an engine preset (actsparse.engine.config.PRESETS)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset (same shapes per layer)")
    ap.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda is faster)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        print(build(a.preset, a.out, layers=a.layers, device=a.device, seed=a.seed), flush=True)
    except ValueError as e:
        print(f"random_model: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
