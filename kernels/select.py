"""The selection pass: x_s = (x̂ − m)⊙1[|x̂ − m| > t] per column segment, written once for the GEMV that follows.

Why a separate pass (the v5 path of `sparse_gemv` / `sparse_gated_mlp`): the Nsight profile of the
one-launch kernel (BENCHMARKS.md, Session 3) showed it bound by L1 load instructions, not DRAM. Each
program loaded x, the RMSNorm weight, the thresholds (and shifts) of every K chunk one element per
thread, replicated across the threads of the weight tile, and recomputed the RMSNorm factor over the
whole row. This pass does that work once per decode step: one small launch reads x, normalises it,
applies each segment's threshold (or N:M rule) and shift, and writes x_s [S, B, K] in x's dtype
(the rounding point the references use: x_s is cast to the weight dtype before the product). The
GEMV then loads one vector per chunk and skips the rows where x_s is zero for every token.

Grid: (K chunks, segments, batch rows); every program computes its row's RMSNorm factor (x is a few
KiB and L2-resident), so no program waits on another.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import new_output
from .pdl import launch_kwargs, pdl_prologue
from .sparse_gemv import _raw_chunk, _row_rstd, _sel_chunk

SELECT_BLOCK_K = 1024  # channels a program selects (4 programs a segment for a 4096-wide row)


@triton.jit
def _select_kernel(x_ptr, g_ptr, t_ptr, m_ptr, xs_ptr, B, K,
                   stride_xb, stride_ts, stride_tk, stride_ms, stride_ss, stride_sb, eps,
                   NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr, NM_N: tl.constexpr,
                   NM_M: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    pid_k = tl.program_id(0)
    seg = tl.program_id(1)
    offs_b = tl.program_id(2) + tl.arange(0, 1)
    mask_b = offs_b < B
    x_rows = x_ptr + offs_b[:, None] * stride_xb
    rstd = tl.zeros([1], dtype=tl.float32)
    if NORM:
        rstd = _row_rstd(x_rows, mask_b, K, eps, NORM_BLOCK, 1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    t_row = t_ptr + seg * stride_ts
    m_row = m_ptr + seg * stride_ms
    xv, xv2, gv, t, m, t2, m2 = _raw_chunk(x_rows, x_rows, g_ptr, t_row, m_row, t_row, m_row, offs_k, mask_k, mask_b,
                                           stride_tk, NORM, HAS_SHIFT, False, NM_N, False)
    xs, rows, xs2, rows2 = _sel_chunk(xv, xv2, gv, t, m, t2, m2, rstd, mask_k, mask_b, NORM, HAS_SHIFT, False, NM_N,
                                      NM_M, False, 1, BLOCK_K)
    out = xs_ptr + seg * stride_ss + offs_b[:, None] * stride_sb + offs_k[None, :]
    tl.store(out, xs.to(xs_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_k[None, :])


def select(x: torch.Tensor, thresh: torch.Tensor, shift: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
           eps: float, nm_n: int, nm_m: int) -> torch.Tensor:
    """Return x_s [S, B, K] in x's dtype: one selected copy of x per threshold row (arguments validated by the ops).

    thresh: float32 [S, K] (stride 0 along K for one value a segment); shift: float32 [S, K] or None;
    norm_weight: [K] or None (RMSNorm of x first); nm_n > 0: keep the top nm_n of every nm_m channels.
    """
    b, k = x.shape
    nseg = thresh.shape[0]
    xs = new_output((nseg, b, k), x.device, x.dtype)
    block_k = min(SELECT_BLOCK_K, triton.next_power_of_2(k))
    if nm_n > 0:
        block_k = max(block_k, nm_m)
    dummy = xs
    _select_kernel[(triton.cdiv(k, block_k), nseg, b)](
        x, norm_weight if norm_weight is not None else dummy, thresh, shift if shift is not None else dummy, xs, b, k,
        x.stride(0), thresh.stride(0), thresh.stride(1), shift.stride(0) if shift is not None else 0,
        xs.stride(0), xs.stride(1), eps,
        NORM=norm_weight is not None, NORM_BLOCK=min(triton.next_power_of_2(k), 4096), HAS_SHIFT=shift is not None,
        NM_N=nm_n, NM_M=max(nm_m, 1), BLOCK_K=block_k, num_warps=4, **launch_kwargs(x.device),
    )
    return xs
