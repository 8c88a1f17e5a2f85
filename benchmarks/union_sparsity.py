"""How many weight rows a batch of decode tokens can skip together, on trained checkpoints (CPU).

At batch B an input-sparse kernel reads a weight row unless every token of the batch zeroes that input
channel: the rows skipped are the *union* sparsity, not the per-token one. With independent masks a
per-token sparsity s leaves s^B of the rows skippable (50% → 6% at batch 4), which is what the decode
benchmark's random weights show. Trained models have correlated masks (some channels are near zero for
most tokens); this script measures how much that helps, on real text:

  python3 benchmarks/union_sparsity.py [--models tiny-llama,tiny-gelu] [--tokens 8192] [--no-append]

Per model: every sparsifiable site's input is recorded on the bundled eval text (windows of --seq-len
tokens); TEAL-style per-site thresholds are calibrated on the bundled calibration text for a per-token
target s; then for batch B the tokens at one position of B different windows form one decode batch, and
the script reports (parameter-weighted over the sites, as the kernels' bytes are):
  - per-token sparsity on the eval text (the target, re-measured),
  - rows skipped by the batch union,
  - the independent-mask expectation s^B,
  - union calibration: the per-token sparsity a site pays when its threshold is set so that the union
    skips s (thresholds on max over the batch, as the decode benchmark's
    `engine_thresholds.calibrate_thresholds(union=True)` does).
Prints a table and appends it to benchmarks/BENCHMARKS.md (date, CPU, commit).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import pathlib
import platform
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actsparse.calibration.quantile import AbsThresholds  # noqa: E402
from actsparse.data.text import text_data, token_stream, token_windows  # noqa: E402
from actsparse.models.load import load_model  # noqa: E402
from actsparse.models.sites import find_blocks  # noqa: E402

SPARSITIES = (0.25, 0.4, 0.5, 0.65, 0.8)
BATCHES = (1, 2, 4, 8, 16)


@torch.no_grad()
def record_inputs(model, tok, data: str, tokens: int, seq_len: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Return site name -> |input| [windows, seq_len, K] (float32) on `tokens` tokens of `data`, and each site's
    parameter count. Sites that read one tensor (q/k/v, gate/up) are recorded separately: their thresholds differ."""
    windows = token_windows(token_stream(tok, text_data(data), max_tokens=tokens), seq_len)
    sites = {s.name: s for b in find_blocks(model) for s in b.sites.values()}
    got: dict[str, list[torch.Tensor]] = {n: [] for n in sites}
    hooks = [s.module.register_forward_pre_hook(lambda m, args, n=n: got[n].append(args[0].detach().abs().float()))
             for n, s in sites.items()]
    try:
        for i in range(0, windows.shape[0], 8):
            model(windows[i:i + 8])
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}, {n: s.n_params for n, s in sites.items()}


def batch_max(a: torch.Tensor, b: int) -> torch.Tensor:
    """[W, T, K] -> [W // b, T, K]: the largest |x| over b different windows at each position (one decode batch)."""
    w = a.shape[0] // b * b
    return a[:w].reshape(w // b, b, *a.shape[1:]).amax(dim=1)


def measure(calib: dict, evals: dict, params: dict) -> list[dict]:
    """Parameter-weighted per-token sparsity, union rows skipped and union-calibrated per-token sparsity for every
    (target, batch); each batch's maxima and each distribution's sort are computed once (AbsThresholds)."""
    total = sum(params.values())
    q_tok = {n: AbsThresholds(a) for n, a in calib.items()}  # per-token thresholds: quantiles of |x|
    acc: dict[tuple[float, int], dict[str, float]] = {
        (s, b): {"token_sparsity": 0.0, "rows_skipped": 0.0, "union_calibrated_token_sparsity": 0.0}
        for s in SPARSITIES for b in BATCHES}
    for n, a in evals.items():
        w = params[n] / total
        th = {s: q_tok[n](s) for s in SPARSITIES}
        for b in BATCHES:
            u = batch_max(a, b)
            q_union = AbsThresholds(batch_max(calib[n], b))  # thresholds that make the union skip s (calibration text)
            for s in SPARSITIES:
                r = acc[(s, b)]
                r["token_sparsity"] += w * float((a <= th[s]).float().mean())
                r["rows_skipped"] += w * float((u <= th[s]).float().mean())
                r["union_calibrated_token_sparsity"] += w * float((a <= q_union(s)).float().mean())
    return [{"sparsity": s, "batch": b, "independent": s ** b, **acc[(s, b)]} for s in SPARSITIES for b in BATCHES]


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return sha + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny-llama,tiny-gelu")
    ap.add_argument("--tokens", type=int, default=8192, help="eval tokens (and as many calibration tokens)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--no-append", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    torch.manual_seed(0)
    cpu = f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"\n## Batch-union sparsity on the bundled checkpoints: `benchmarks/union_sparsity.py` ({date}, {cpu}, "
           f"commit {commit()})\n",
           f"Per-site TEAL thresholds calibrated on `bundled:calib` for each per-token target; measured on "
           f"`bundled:eval` ({args.tokens} tokens, windows of {args.seq_len}); a batch = the tokens at one position "
           "of B different windows. Parameter-weighted over every site (q, k, v, o, gate, up, down / the "
           "model's own). 'independent' = target^B (uncorrelated masks, as random weights give); 'union-calibrated "
           "token sparsity' = what each token pays when thresholds are set so that the union skips the target.\n"]
    for name in args.models.split(","):
        model, tok = load_model(name, dtype="float32", device="cpu")
        calib, params = record_inputs(model, tok, "bundled:calib", args.tokens, args.seq_len)
        evals, _ = record_inputs(model, tok, "bundled:eval", args.tokens, args.seq_len)
        rows = measure(calib, evals, params)
        out.append(f"\n**{name}** ({len(params)} sites, {sum(params.values()) / 1e6:.1f} M parameters)\n")
        out.append("| target | batch | token sparsity | rows skipped (union) | independent | "
                   "union-calibrated token sparsity |")
        out.append("|---|---|---|---|---|---|")
        for r in rows:
            out.append(f"| {r['sparsity']:.2f} | {r['batch']} | {r['token_sparsity']:.3f} | {r['rows_skipped']:.3f} | "
                       f"{r['independent']:.3f} | {r['union_calibrated_token_sparsity']:.3f} |")
        del model, calib, evals
    text = "\n".join(out) + "\n"
    print(text)
    if not args.no_append:
        with open(ROOT / "benchmarks" / "BENCHMARKS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
