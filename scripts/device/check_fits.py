"""Fits that run forward passes, on the CPU and on the GPU from the same statistics: do they agree, and how long
do they take? (Run on a CUDA machine: `PYTHONPATH=. python scripts/device/check_fits.py --out $OUT`.)

For each method variant the model is fitted twice from one calibration (made on the CPU, float32): once with the
model on the CPU, once with it on the GPU (float32, so only the order of floating-point sums differs). Every rule
tensor is compared (max relative difference) and both fit times are printed; a table goes to <out>/fits.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import actsparse as asp

VARIANTS = [("scap", {"mode": "kde", "roles": ("down",)}), ("scap", {"mode": "median"}),
            ("ffn_threshold", {}), ("teal", {"allocation": "greedy"}), ("rsparse", {}), ("countdown", {"mode": "d"})]


def _fit(method: str, params: dict, stats, model) -> tuple[dict, float]:
    t0 = time.perf_counter()
    plan = asp.fit(method, stats, sparsity=0.5, model=model, **params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return plan.rules, time.perf_counter() - t0


def _diff(a: dict, b: dict) -> float:
    """Max relative difference over every tensor of every rule (inf when the rule sets differ)."""
    if set(a) != set(b):
        return float("inf")
    worst = 0.0
    for k in a:
        for name, t in a[k].tensors.items():
            u, v = t.double().cpu(), b[k].tensors[name].double().cpu()
            worst = max(worst, float((u - v).abs().max() / v.abs().max().clamp(min=1e-12)))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--out", default="build/check_fits")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = asp.load_model(a.model, dtype="float32")
    stats = asp.calibrate(model, tok, "bundled:calib", tokens=4096, seq_len=256, progress=False)
    gpu = model.to("cuda") if torch.cuda.is_available() else None
    lines = [f"# Fits on CPU vs GPU ({a.model}, target 0.5, {torch.cuda.get_device_name() if gpu is not None else 'no GPU'})",
             "", "| method | params | CPU fit s | GPU fit s | max rel diff of rule tensors |", "|---|---|---|---|---|"]
    for method, params in VARIANTS:
        cpu_model, _ = asp.load_model(a.model, dtype="float32")
        try:
            r_cpu, t_cpu = _fit(method, params, stats, cpu_model)
            r_gpu, t_gpu = _fit(method, params, stats, gpu) if gpu is not None else (r_cpu, float("nan"))
            row = f"| {method} | {params} | {t_cpu:.1f} | {t_gpu:.1f} | {_diff(r_gpu, r_cpu):.2e} |"
        except Exception as e:  # report and go on: one variant must not hide the others
            row = f"| {method} | {params} | error | error | {type(e).__name__}: {str(e)[:120]} |"
        print(row, flush=True)
        lines.append(row)
    (out / "fits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
