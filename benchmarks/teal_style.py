"""A TEAL-style split-K sparse GEMV, written from the published design, as a side-by-side baseline.

Design facts (FasterDecoding/TEAL, kernels/sparse_gemv.py): one program per [BLOCK_M rows of K,
BLOCK_N columns] tile of W^T with no loop, rows masked by |x| > t, partial sums atomically added
into the output, which a separate launch zeroes first; fp16 output; one launch per projection
(q/k/v share one). Benchmark-only code: not part of actsparse.kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _splitk_kernel(y_ptr, w_ptr, x_ptr, t, K, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    x = tl.load(x_ptr + rm, mask=rm < K, other=0.0, eviction_policy="evict_last")
    keep = tl.abs(x) > t
    w = tl.load(w_ptr + rm[:, None] * N + rn[None, :], mask=keep[:, None] & (rn < N)[None, :], other=0.0,
                eviction_policy="evict_first")
    acc = tl.sum(w.to(tl.float32) * x.to(tl.float32)[:, None], 0)
    tl.atomic_add(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)


def teal_style_gemv(x: torch.Tensor, wt: torch.Tensor, t: float, block_m: int = 128, block_n: int = 64,
                    num_warps: int = 4) -> torch.Tensor:
    """Return y [1, N] = x_s @ wt for x [1, K] fp16, wt [K, N]: zeroing launch + split-K atomics."""
    k, n = wt.shape
    y = torch.zeros(1, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_m))
    _splitk_kernel[grid](y, wt, x, t, k, n, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y
