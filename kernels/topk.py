"""Per-token Top-K selection as thresholds: the level under which a token's n_zero smallest scores lie, written
where the next sparse op reads its thresholds (one launch, no host sync, graph-safe).

A Top-K rule (`topk_token`: keep each token's C − n_zero largest |x|, or |x_i|·w_i with WINA's column norms w)
is a threshold rule whose threshold changes every token: T = the n_zero-th smallest score, and |x| > T keeps
exactly the others (ties at the cut dropped, as the torch rule does). The sparse kernels select |x| > t, so this
op computes T per selection row and stores it into the op's threshold tensor: a scalar per row, or with weights
t_i per channel, the largest float with fl(t_i·w_i) ≤ T (∞ where w_i = 0: such a channel is never kept), so
|x_i| > t_i is exactly fl(|x_i|·w_i) > T, the torch rule's float32 test. On a normalised input the op computes
RMSNorm's factor itself (other blocks, other order): the last bit of it can move a channel at the cut.

One program per selection row holds the token's scores in registers (C ≤ 16,384: a Llama-3-70B MLP is 28,672,
refused here) and finds T by bisection on their bit patterns (non-negative floats order as their int32 bits):
31 halvings of [0, bits(∞)], each one count of the scores above the midpoint. The input is what the next op
selects on: x itself, RMSNorm(x)·g (the op normalises the residual stream), or act(gate)·up from a gate/up pair's
raw sums (the gated down). Batch 1: the kernels share one threshold per row across a batch, and each token
has its own T.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .gemv_common import ACTS, activate
from .pdl import pdl_args, pdl_prologue

MAX_K = 16384  # a token's scores in one program's registers
# Warps of the one program of a row longer than 4,096 scores (an MLP's down); shorter rows take 4. H100, 3e6068a
# (`--topk-anatomy`): down's 14,336 scores 20.4 µs on 16 warps, 22.3 on 8; three counts a halving step (16 steps,
# not 31) took 38.1 / 28.1 µs (8 / 16 warps) and q|k|v 10.9 against 9.1: not kept.
WARPS_LARGE = 16


@triton.jit
def _topk_kernel(x_ptr, g_ptr, w_ptr, n_ptr, out_ptr, K, stride_xm, stride_ws, stride_os, eps,
                 NORM: tl.constexpr, GATED: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr,
                 PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    s = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        rstd = tl.rsqrt(tl.sum(v * v, axis=0) / K + eps)
        v = v * rstd * tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GATED > 0:
        v = activate(v, GATED) * tl.load(x_ptr + stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    score = tl.abs(v)
    if HAS_W:
        w = tl.load(w_ptr + s * stride_ws + offs, mask=mask, other=0.0).to(tl.float32)
        score = score * w
    bits = tl.where(mask, score.to(tl.int32, bitcast=True), -1)  # padding is never above a level
    keep_n = K - tl.load(n_ptr + s)
    # The smallest level T with at most keep_n scores above it is the n_zero-th smallest score's bits.
    lo = 0
    hi = 0x7F800000  # +inf
    for _ in tl.static_range(31):
        mid = lo + (hi - lo) // 2
        above = tl.sum((bits > mid).to(tl.int32), axis=0)
        fits = above <= keep_n
        hi = tl.where(fits, mid, hi)
        lo = tl.where(fits, lo, mid + 1)
    t = lo.to(tl.float32, bitcast=True)
    if HAS_W:
        # |x_i| > t_i exactly where fl(|x_i|·w_i) > T: the rounded quotient, moved by one step of its bits
        # where the product on either side of it says so (a division is off by at most half a step)
        live = w > 0
        ws = tl.where(live, w, 1.0)
        q = tl.div_rn(t, ws)  # correctly rounded (a plain / compiles to an approximate division): one step fixes it
        qb = q.to(tl.int32, bitcast=True)
        qb = tl.where(q * ws > t, qb - 1, qb)
        nb = qb + 1
        qb = tl.where(nb.to(tl.float32, bitcast=True) * ws <= t, nb, qb)
        tl.store(out_ptr + s * stride_os + offs, tl.where(live, qb.to(tl.float32, bitcast=True), float("inf")),
                 mask=mask)
    else:
        tl.store(out_ptr + s, t)


def _check(x: torch.Tensor, n_zero: torch.Tensor, out: torch.Tensor, norm_weight, score_w, gated) -> int:
    """K of a valid call; raise ValueError naming what is wrong otherwise."""
    if gated is not None and gated not in ACTS or gated == "none":
        raise ValueError(f"gated must be None, 'silu' or 'gelu_tanh', got {gated!r}")
    want = 3 if gated else 2
    if x.dim() != want or x.shape[-2] != 1 or (gated and x.shape[0] != 2):
        shape = "[2, 1, K] (a gate/up pair's raw sums)" if gated else "[1, K]"
        raise ValueError(f"x must be {shape}: per-token Top-K runs one token at a time (each token has its own "
                         f"level and the kernels share one threshold per row across a batch); got shape "
                         f"{tuple(x.shape)}")
    k = x.shape[-1]
    if k > MAX_K:
        raise ValueError(f"per-token Top-K holds a token's scores in registers: at most {MAX_K} channels, got {k}")
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous in K")
    if gated and norm_weight is not None:
        raise ValueError("norm_weight and gated exclude each other: the gated input is act(gate)·up, not a norm")
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"norm_weight must be [K={k}], got shape {tuple(norm_weight.shape)}")
    if n_zero.dim() != 1 or n_zero.dtype != torch.int32:
        raise ValueError(f"n_zero must be int32 [S] (entries zeroed per token, one per selection row), got "
                         f"{n_zero.dtype} of shape {tuple(n_zero.shape)}")
    s = n_zero.shape[0]
    if score_w is not None:
        if tuple(score_w.shape) != (s, k) or score_w.dtype != torch.float32:
            raise ValueError(f"score_w must be float32 [S={s}, K={k}], got {score_w.dtype} of shape "
                             f"{tuple(score_w.shape)}")
        if tuple(out.shape) != (s, k):
            raise ValueError(f"with score_w the thresholds are per channel: out must be [S={s}, K={k}], got "
                             f"{tuple(out.shape)}")
    elif tuple(out.shape) != (s,):
        raise ValueError(f"out must be float32 [S={s}] (one threshold per selection row), got {tuple(out.shape)}")
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor, got {out.dtype}")
    return k


def topk_thresholds(x: torch.Tensor, n_zero: torch.Tensor, out: torch.Tensor, *,
                    norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                    score_w: Optional[torch.Tensor] = None, gated: Optional[str] = None) -> torch.Tensor:
    """Write into `out` each selection row's per-token Top-K level and return it.

    x: [1, K] (or [2, 1, K], a gate/up pair's raw sums, with `gated` = the MLP's act: the input is act(gate)·up);
    with `norm_weight` [K] the input is RMSNorm(x)·g (eps). n_zero: int32 [S], how many entries row s zeroes.
    out: float32 [S] = the n_zero[s]-th smallest |input| (0 where n_zero ≤ 0), or with score_w (float32 [S, K],
    the score |input|·w) [S, K] = that level / w (∞ where w = 0)."""
    _check(x, n_zero, out, norm_weight, score_w, gated)
    torch.ops.actsparse.topk_thresholds(x, n_zero, out, norm_weight, float(eps), score_w, gated or "none")
    return out


@torch.library.custom_op("actsparse::topk_thresholds", mutates_args=("out",))
def _topk_op(x: torch.Tensor, n_zero: torch.Tensor, out: torch.Tensor, norm_weight: Optional[torch.Tensor],
             eps: float, score_w: Optional[torch.Tensor], gated: str) -> None:
    k = x.shape[-1]
    _topk_kernel[(n_zero.shape[0],)](
        x, norm_weight if norm_weight is not None else x, score_w if score_w is not None else out, n_zero, out, k,
        x.stride(0) if gated != "none" else 0, score_w.stride(0) if score_w is not None else 0,
        out.stride(0), eps, NORM=norm_weight is not None, GATED=ACTS[gated], HAS_W=score_w is not None,
        BLOCK=triton.next_power_of_2(k), num_warps=WARPS_LARGE if k > 4096 else 4, **pdl_args(x.device))
