"""Run each fused sparse op a few times at Llama-3-8B shapes so Nsight Compute can profile one launch.

Meant to run under ncu on the GPU machine (one call, the report lands in $OUT):

    ncu --kernel-name regex:gather_kernel --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis python3 benchmarks/profile_kernels.py --op pair --sparsity 0.9

--impl picks the kernel (gather, masked or auto; the configs are the tuned ones of `kernels/configs.py`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_kernels  # noqa: E402,F401  (makes actsparse.kernels importable from the source tree, as there)

from actsparse.calibration.quantile import AbsThresholds  # noqa: E402
from actsparse.kernels import ref, sparse_gated_mlp, sparse_gemv  # noqa: E402

D, KV, INTER = 4096, 1024, 14336


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", choices=["qkv", "o", "pair", "down"], default="pair")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--impl", default="auto", choices=["auto", "gather", "masked"])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    dt, dev = torch.bfloat16, "cuda"
    k = INTER if args.op == "down" else D
    n = {"qkv": D + 2 * KV, "o": D, "pair": INTER, "down": D}[args.op]
    x = torch.randn(1, k, device=dev, dtype=dt)
    g = (torch.rand(k, device=dev) + 0.5).to(dt)
    w = (torch.randn(k, n, device=dev) / k**0.5).to(dt)
    w2 = (torch.randn(k, n, device=dev) / k**0.5).to(dt)
    xin = ref.rmsnorm_ref(x, g) if args.op in ("qkv", "pair") else x
    t = AbsThresholds(xin)(args.sparsity)
    for _ in range(args.reps):
        if args.op == "pair":
            y = sparse_gated_mlp(x, w, w2, torch.tensor([t, t], device=dev), norm_weight=g, impl=args.impl)
        elif args.op == "qkv":
            y = sparse_gemv(x, w, torch.tensor([t, t, t], device=dev), norm_weight=g, segments=(D, D + KV),
                            impl=args.impl)
        else:
            y = sparse_gemv(x, w, torch.tensor([t], device=dev), residual=x[:, :n], impl=args.impl)
    torch.cuda.synchronize()
    print(f"{args.op} impl={args.impl} sparsity={args.sparsity}: out {tuple(y.shape)}, finite {bool(y.isfinite().all())}")


if __name__ == "__main__":
    main()
