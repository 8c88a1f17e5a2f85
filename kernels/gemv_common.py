"""Triton and host helpers both sparse-GEMV kernels share: RMSNorm factor, threshold / shift / N:M selection,
the epilogue (bias, act or act(gate)·up with act silu or gelu-tanh, residual, the consumer's selection, cast),
the launch arguments and the split-K workspace. Kernels: `masked_gemv.py` and `gather_gemv.py`; the public ops: `sparse_gemv.py`."""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .configs import MAX_TILES, atomic_accumulator, tile_counters


@triton.jit
def row_rstd(x_rows, mask_b, K, eps, NORM_BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
    """1 / RMS of each batch row of x [BLOCK_B, K] (RMSNorm's factor); x is L2-resident, read in wide loads."""
    ss = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k0 in range(0, K, NORM_BLOCK):
        offs = k0 + tl.arange(0, NORM_BLOCK)
        xv = tl.load(x_rows + offs[None, :], mask=mask_b[:, None] & (offs < K)[None, :], other=0.0)
        xv = xv.to(tl.float32)
        ss += tl.sum(xv * xv, axis=1)
    return tl.rsqrt(ss / K + eps)


@triton.jit
def token_rstd(x_ptr, K, eps, NORM_BLOCK: tl.constexpr):
    """`row_rstd` of a single token's row x [K] (batch 1), as a scalar."""
    return tl.sum(row_rstd(x_ptr + tl.zeros([1], dtype=tl.int32)[:, None], tl.full([1], 1, tl.int1), K, eps,
                           NORM_BLOCK, 1), axis=0)


@triton.jit
def _nm_keep(a, NM_N: tl.constexpr, NM_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Top-NM_N of |score| inside each group of NM_M consecutive channels (ties: lower index wins)."""
    a3 = tl.reshape(a, (BLOCK_B, BLOCK_K // NM_M, NM_M))
    ai = a3[:, :, :, None]  # the candidate
    aj = a3[:, :, None, :]  # the others in its group
    idx = tl.arange(0, NM_M)
    before = (idx[None, :] < idx[:, None])[None, None, :, :]  # j < i
    beats = (aj > ai) | ((aj == ai) & before)
    rank = tl.sum(beats.to(tl.int32), axis=3)
    return tl.reshape(rank < NM_N, (BLOCK_B, BLOCK_K))


@triton.jit
def selected(x, t, m, mask_k, mask_b, HAS_SHIFT: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr,
          BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """x_s [BLOCK_B, BLOCK_K] (fp32) and the batch-union row mask [BLOCK_K] from loaded x, threshold t and shift m."""
    if HAS_SHIFT:
        x = x - m[None, :]
    valid = mask_b[:, None] & mask_k[None, :]
    if NM_N > 0:
        keep = _nm_keep(tl.abs(x), NM_N, NM_M, BLOCK_B, BLOCK_K) & valid
    else:
        keep = (tl.abs(x) > t[None, :]) & valid
    xs = tl.where(keep, x, 0.0)
    rows = tl.max(keep.to(tl.int32), axis=0).to(tl.int8)  # int8, not i1: it is carried across loop iterations
    return xs, rows


@triton.jit
def sel_operands(t_row, m_row, offs_k, mask_k, stride_tk, HAS_SHIFT: tl.constexpr, NM_N: tl.constexpr):
    """Load one K chunk's threshold and shift (zeros for the unused one)."""
    m = tl.zeros(offs_k.shape, dtype=tl.float32)
    t = tl.zeros(offs_k.shape, dtype=tl.float32)
    if HAS_SHIFT:
        m = tl.load(m_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    if NM_N == 0:
        t = tl.load(t_row + offs_k * stride_tk, mask=mask_k, other=0.0)
    return t, m


@triton.jit
def select_chunk(x, t_row, m_row, offs_k, mask_k, mask_b, stride_tk,
            HAS_SHIFT: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr,
            BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sparsified input chunk x_s [BLOCK_B, BLOCK_K] (fp32) and the batch-union row mask [BLOCK_K]."""
    t, m = sel_operands(t_row, m_row, offs_k, mask_k, stride_tk, HAS_SHIFT, NM_N)
    return selected(x, t, m, mask_k, mask_b, HAS_SHIFT, NM_N, NM_M, BLOCK_B, BLOCK_K)


@triton.jit
def accumulate(acc, xs, w, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """acc += x_s @ w: tensor cores (acc [B, N]) or CUDA-core FMAs (acc [B, K, N], reduced over K at the end)."""
    if USE_DOT:
        if IEEE:
            acc = tl.dot(xs, w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xs.to(w.dtype), w, acc)
    else:
        # Reduce over K once after the loop, not every chunk: no cross-thread traffic inside it.
        acc += xs[:, :, None] * w.to(tl.float32)[None, :, :]
    return acc


ACTS = {"none": 0, "silu": 1, "gelu_tanh": 2}  # the kernels' ACT values for `activate`


@triton.jit
def activate(x, ACT: tl.constexpr):
    """act(x) in fp32: ACT 1 silu, 2 gelu-tanh, 0.5·x·(1 + tanh(u)) = x·sigmoid(2u), u = √(2/π)·(x + 0.044715·x³)."""
    if ACT == 2:
        z = 1.5957691216057308 * (x + 0.044715 * x * x * x)
    else:
        z = x
    return x * tl.sigmoid(z)


@triton.jit
def epilogue(out, out2, bias_ptr, stride_bs, res_ptr, stride_rb, y_ptr, stride_yb, offs_b, offs_n, mask_n,
              mask_out, HAS_BIAS: tl.constexpr, PAIR: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
              to_ptr, mo_ptr, stride_to, OUT_SEL: tl.constexpr, OUT_SHIFT: tl.constexpr):
    """bias, act (ACT > 0) or act(gate)·up (PAIR), residual, the consumer's selection (OUT_SEL: y = (y − m)⊙
    1[|y − m| > t] per column, so the next GEMV reads its input already selected), cast and store of one
    [BLOCK_B, BLOCK_N] tile."""
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if PAIR:
        if HAS_BIAS:
            out2 += tl.load(bias_ptr + stride_bs + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = activate(out, ACT) * out2
    elif ACT > 0:
        out = activate(out, ACT)
    if HAS_RES:
        res = tl.load(res_ptr + offs_b[:, None] * stride_rb + offs_n[None, :], mask=mask_out, other=0.0)
        out += res.to(tl.float32)
    if OUT_SEL:
        if OUT_SHIFT:
            out -= tl.load(mo_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        t_out = tl.load(to_ptr + offs_n * stride_to, mask=mask_n, other=0.0)
        out = tl.where(tl.abs(out) > t_out[None, :], out, 0.0)
    tl.store(y_ptr + offs_b[:, None] * stride_yb + offs_n[None, :], out.to(y_ptr.dtype.element_ty), mask=mask_out)


def out_dtype(wt: torch.Tensor, residual=None) -> torch.dtype:
    """A GEMV's output dtype: the residual's where it adds one (the stream may be kept in fp32), else the
    weights' (an fp32 stream's normalised input still yields model-dtype activations)."""
    return residual.dtype if residual is not None else wt.dtype


def wshape(wt: torch.Tensor) -> tuple[int, int]:
    """(in_features K, out_features N) of a transposed weight [K, N] or a packed one [N / W, K, W]."""
    if wt.dim() == 3:
        return wt.shape[1], wt.shape[0] * wt.shape[2]
    return wt.shape[0], wt.shape[1]


def fit_block_n(block_n: int, bounds: Sequence[int]) -> int:
    """Largest block_n ≤ the configured one that divides every segment boundary (min 16)."""
    while block_n > 16 and any(b % block_n for b in bounds):
        block_n //= 2
    if any(b % block_n for b in bounds):
        raise ValueError(f"segment boundaries {list(bounds)} must be multiples of 16")
    return block_n


def launch_args(x, wt, w2, thresh, shift, bias, residual, norm_weight, act, bounds, nm_n, nm_m, y, block_b):
    """The arguments both sparse-GEMV kernels take alike: the leading pointers (an unused one points at y and is
    never read: its constexpr flag is off), the q/k/v segment boundaries, the strides and the feature flags."""
    k, n = wshape(wt)
    dummy = y
    ptrs = (x, norm_weight if norm_weight is not None else dummy, thresh, shift if shift is not None else dummy,
            wt, w2 if w2 is not None else wt, bias if bias is not None else dummy,
            residual if residual is not None else dummy, y)
    n01 = (bounds[0] if len(bounds) > 0 else n, bounds[1] if len(bounds) > 1 else n)
    strides = (x.stride(0), thresh.stride(0), thresh.stride(1), shift.stride(0) if shift is not None else 0,
               wt.stride(-2), bias.stride(0) if (bias is not None and bias.dim() == 2) else 0,
               residual.stride(0) if residual is not None else 0, y.stride(0))
    # One or two wide loads per row for the norm prologue, within a register budget.
    norm_block = min(triton.next_power_of_2(k), max(1024, 4096 // block_b))
    flags = dict(NORM=norm_weight is not None, NORM_BLOCK=norm_block, HAS_SHIFT=shift is not None,
                 PAIR=w2 is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=act, NM_N=nm_n,
                 NM_M=max(nm_m, 1))
    return ptrs, n01, strides, flags


def split_workspace(split: int, nacc: int, b: int, n: int, tiles: int, y: torch.Tensor,
                    atomic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 split-K partials [split × nacc, b, n] (nacc: partials per program and column), or with `atomic` the
    device's self-zeroing accumulators, and the arrival counters of `tiles` output tiles; y twice when
    split == 1 (SPLIT is off and neither is touched)."""
    if split <= 1:
        return y, y
    if tiles > MAX_TILES:
        raise ValueError(f"too many output tiles ({tiles}) for split-K; use a larger block_n")
    if atomic:
        return atomic_accumulator(y.device), tile_counters(y.device)
    return torch.empty(split * nacc * b * n, device=y.device, dtype=torch.float32), tile_counters(y.device)
