"""Output-sparse second projection for CATS / COUNTDOWN: h = a ⊙ act(W·x̂) where |a| > t, else 0.

CATS: `a` = act(W_g·x̂) comes from the gate projection (`sparse_gemv(..., act="silu")`, or "gelu_tanh") and W is
the up projection (act "none"). M-COUNTDOWN swaps them: `a` = W_u·x̂ is the up projection's output and W the gate,
whose kept rows take the activation here (act "silu" / "gelu_tanh"). W is kept in its natural [I, K] row-major
layout, so an intermediate channel whose |a| is under the threshold skips one contiguous row of K weights. h carries exact zeros where the mask is off, so the down
projection reads it with threshold 0 (`sparse_gemv(h, W_d^T, 0)`) and skips the same rows of W_d^T:
the mask itself never goes to memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import (FMA_MAX_BATCH, MAX_ACC, MAX_TILES, ONESHOT_MAX_BATCH, OneshotConfig, atomic_accumulator,
                      batch_bucket, choose_impl, choose_split, new_output, tile_counters)
from .gemv_common import ACTS, accumulate, activate, row_rstd, split_workspace, token_rstd
from .pdl import pdl_args, pdl_prologue


@triton.jit
def _gather_up_kernel(
    x_ptr, g_ptr, a_ptr, t_ptr, w_ptr, y_ptr, ws_ptr, cnt_ptr,
    B, K, N, K_SPLIT,
    stride_xb, stride_ab, stride_tn, stride_wn, stride_yb,
    eps,
    NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, ACT: tl.constexpr = 0, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    ar_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_b[:, None] * stride_xb
    valid = mask_b[:, None] & mask_n[None, :]

    a = tl.load(a_ptr + offs_b[:, None] * stride_ab + offs_n[None, :], mask=valid, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs_n * stride_tn, mask=mask_n, other=0.0)
    keep = (tl.abs(a) > t[None, :]) & valid
    rows = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_N] union over the batch

    rstd = tl.zeros([BLOCK_B], dtype=tl.float32)
    if NORM:
        rstd = row_rstd(x_rows, mask_b, K, eps, NORM_BLOCK, BLOCK_B)

    if USE_DOT:
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_B, BLOCK_K, BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + ar_k
        mask_k = offs_k < k_hi
        # [BLOCK_K, BLOCK_N] tile of W_u^T read from W_u [N, K]: each kept column is a contiguous row.
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=rows[None, :] & mask_k[:, None], other=0.0, eviction_policy="evict_first")
        xv = tl.load(x_rows + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0,
                     eviction_policy="evict_last").to(tl.float32)
        if NORM:
            gv = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            xv = xv * rstd[:, None] * gv[None, :]
        acc = accumulate(acc, xv, w, USE_DOT, IEEE)
    if USE_DOT:
        up = acc
    else:
        up = tl.sum(acc, axis=1)

    if SPLIT:  # same protocol as sparse_gemv: partials, one counter increment, the last program finishes
        n_split = tl.num_programs(1)
        ws_tile = offs_b[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * B * N + ws_tile, up, mask=valid)
        tl.debug_barrier()
        tile = pid_b * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == n_split - 1:
            tl.store(cnt_ptr + tile, 0)
            up = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
            for s in range(0, n_split):
                up += tl.load(ws_ptr + s * B * N + ws_tile, mask=valid, other=0.0, cache_modifier=".cg")
            if ACT > 0:   # COUNTDOWN: the gathered gate rows take the activation
                up = activate(up, ACT)
            h = tl.where(keep, a * up, 0.0)
            tl.store(y_ptr + offs_b[:, None] * stride_yb + offs_n[None, :], h.to(y_ptr.dtype.element_ty), mask=valid)
    else:
        if ACT > 0:   # COUNTDOWN: the gathered gate rows take the activation
            up = activate(up, ACT)
        h = tl.where(keep, a * up, 0.0)
        tl.store(y_ptr + offs_b[:, None] * stride_yb + offs_n[None, :], h.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _oneshot_up_kernel(
    x_ptr, g_ptr, a_ptr, t_ptr, w_ptr, y_ptr, acc_ptr, cnt_ptr,
    B, K, N,
    stride_xb, stride_ab, stride_tn, stride_wn, stride_yb,
    eps,
    NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, ACT: tl.constexpr = 0, PDL: tl.constexpr = False):
    """One program per [BLOCK_N kept-or-not rows of W_u × BLOCK_K columns] tile: the rows whose |a| is under the
    threshold for the whole batch are never read; fp32 atomic sums, the last program of a strip writes h."""
    pdl_prologue(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    valid = mask_b[:, None] & mask_n[None, :]
    a = tl.load(a_ptr + offs_b[:, None] * stride_ab + offs_n[None, :], mask=valid, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs_n * stride_tn, mask=mask_n, other=0.0)
    keep = (tl.abs(a) > t[None, :]) & valid
    rows = tl.max(keep.to(tl.int32), axis=0)  # [BLOCK_N] union over the batch
    x_rows = x_ptr + offs_b[:, None] * stride_xb
    xv = tl.load(x_rows + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0,
                 eviction_policy="evict_last").to(tl.float32)
    if NORM:
        gv = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        xv = xv * row_rstd(x_rows, mask_b, K, eps, NORM_BLOCK, BLOCK_B)[:, None] * gv[None, :]
    # [BLOCK_N, BLOCK_K] tile of W_u [N, K]: each kept row is BLOCK_K contiguous weights.
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=(rows[:, None] != 0) & mask_k[None, :],
                other=0.0, eviction_policy="evict_first")
    if USE_DOT:
        if IEEE:
            part = tl.dot(xv, tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            part = tl.dot(xv.to(w.dtype), tl.trans(w))
    else:
        part = tl.sum(xv[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)  # [BLOCK_B, BLOCK_N]
    tile = offs_b[:, None] * N + offs_n[None, :]
    if tl.max(rows, axis=0) > 0:  # no kept row: nothing to add
        tl.atomic_add(acc_ptr + tile, part, mask=valid, sem="relaxed")
    tl.debug_barrier()  # every partial of this program is issued before it signals
    arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
    if arrived == tl.num_programs(1) - 1:
        tl.store(cnt_ptr + pid_n, 0)  # ready for the next launch
        up = tl.load(acc_ptr + tile, mask=valid, other=0.0, cache_modifier=".cg")
        tl.store(acc_ptr + tile, tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32), mask=valid)
        if ACT > 0:   # COUNTDOWN: the gathered gate rows take the activation
            up = activate(up, ACT)
        h = tl.where(keep, a * up, 0.0)
        tl.store(y_ptr + offs_b[:, None] * stride_yb + offs_n[None, :], h.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _rows_up_kernel(
    x_ptr, g_ptr, a_ptr, t_ptr, w_ptr, y_ptr,
    K, N, stride_tn, stride_wn,
    eps,
    NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
    ACT: tl.constexpr = 0, PDL: tl.constexpr = False):
    """Batch 1. One program per BLOCK_N consecutive channels: it ranks its kept channels (an exclusive prefix sum
    of the mask) and walks them ROWS at a time, each step a full [ROWS × BLOCK_K] tile of whole W_u rows (no
    masked lanes, no split of K, no atomics); the channels it drops get their zeros first."""
    pdl_prologue(PDL)
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    a = tl.load(a_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs_n * stride_tn, mask=mask_n, other=0.0)
    keep = (tl.abs(a) > t) & mask_n
    k32 = keep.to(tl.int32)
    rank = tl.cumsum(k32, axis=0) - k32  # a kept channel's place among the program's kept channels
    n_kept = tl.sum(k32, axis=0)
    tl.store(y_ptr + offs_n, tl.zeros([BLOCK_N], dtype=tl.float32).to(y_ptr.dtype.element_ty), mask=mask_n & ~keep)
    rstd = 1.0
    if NORM:
        rstd = token_rstd(x_ptr, K, eps, NORM_BLOCK)
    slot = tl.arange(0, ROWS)
    ar_k = tl.arange(0, BLOCK_K)
    for j0 in range(0, n_kept, ROWS):
        sel = (rank[None, :] == (j0 + slot)[:, None]) & keep[None, :]  # [ROWS, BLOCK_N]: step j0's channels
        ids = tl.sum(tl.where(sel, offs_n[None, :], 0), axis=1)
        live = (j0 + slot) < n_kept
        acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + ar_k
            mask_k = offs_k < K
            w = tl.load(w_ptr + ids[:, None] * stride_wn + offs_k[None, :], mask=live[:, None] & mask_k[None, :],
                        other=0.0, eviction_policy="evict_first")
            xv = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0, eviction_policy="evict_last").to(tl.float32)
            if NORM:
                xv = xv * rstd * tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * xv[None, :]
        up = tl.sum(acc, axis=1)
        if ACT > 0:   # COUNTDOWN: the gathered gate rows take the activation
            up = activate(up, ACT)
        av = tl.sum(tl.where(sel, a[None, :], 0.0), axis=1)
        tl.store(y_ptr + ids, (av * up).to(y_ptr.dtype.element_ty), mask=live)


@dataclass(frozen=True)
class RowsConfig:
    """One launch configuration of cats_up's kept-rows walk (batch 1)."""

    block_n: int = 16  # channels (W_u rows) a program owns
    rows: int = 8  # kept rows a step reads
    block_k: int = 512  # columns a step covers
    num_warps: int = 4
    num_stages: int = 2


def _launch_rows_up(x, w_up, a, thresh, norm_weight, eps, cfg: RowsConfig, act: int = 0) -> torch.Tensor:
    k = x.shape[1]
    n = w_up.shape[0]
    y = new_output((1, n), x.device, a.dtype)
    _rows_up_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, norm_weight if norm_weight is not None else x, a, thresh, w_up, y, k, n, thresh.stride(0), w_up.stride(0),
        eps, NORM=norm_weight is not None, NORM_BLOCK=min(triton.next_power_of_2(k), 4096), BLOCK_N=cfg.block_n,
        ROWS=cfg.rows, BLOCK_K=cfg.block_k, ACT=act, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl_args(x.device))
    return y


def _launch_oneshot_up(x, w_up, a, thresh, norm_weight, eps, cfg: OneshotConfig, act: int = 0) -> torch.Tensor:
    b, k = x.shape
    n = w_up.shape[0]
    use_dot = b > 1
    block_b = 16 if use_dot else 1
    tiles_n = triton.cdiv(n, cfg.block_n)
    if tiles_n > MAX_TILES or b * n > MAX_ACC:
        raise ValueError(f"cats_up's one-shot tiles take at most {MAX_TILES} strips and {MAX_ACC} sums, got "
                         f"{tiles_n} and {b} × {n}; use impl='walk'")
    y = new_output((b, n), x.device, a.dtype)
    _oneshot_up_kernel[(tiles_n, triton.cdiv(k, cfg.block_k))](
        x, norm_weight if norm_weight is not None else x, a, thresh, w_up, y, atomic_accumulator(x.device),
        tile_counters(x.device), b, k, n, x.stride(0), a.stride(0), thresh.stride(0), w_up.stride(0), y.stride(0),
        eps, NORM=norm_weight is not None, NORM_BLOCK=min(triton.next_power_of_2(k), max(1024, 4096 // block_b)),
        USE_DOT=use_dot, IEEE=w_up.dtype == torch.float32, BLOCK_B=block_b, BLOCK_K=cfg.block_k,
        BLOCK_N=cfg.block_n, ACT=act, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x.device),
    )
    return y


UP_IMPLS = ("auto", "walk", "oneshot", "rows")
# Llama-3-8B's up rows at batch 1 (`bench_kernels.py --cats-anatomy`, H100, 8d07a2c, bf16, µs at 0.5 + 0.8 of the
# rows skipped): the kept-rows walk 54.2 (16 channels a program, 8 rows × 512 columns a step), the split-K walk
# 64.3 (16 × 256, K unsplit; its default 32 × 128 split 2: 70.4), the one-shot tiles 91.1 (16 × 256).
# impl="auto" for cats_up: (K, N, batch bucket) -> "walk", "oneshot" or "rows", measured; the walk where there is none.
PREFERRED_UP: dict[tuple[int, int, int], str] = {(4096, 14336, 1): "rows"}
# One-shot tiles of cats_up: (K, N, batch bucket) -> config; W_u rows of BLOCK_K contiguous weights.
TUNED_ONESHOT_UP: dict[tuple[int, int, int], OneshotConfig] = {
    (4096, 14336, 1): OneshotConfig(block_n=16, block_k=256, num_warps=2)}
# The kept-rows walk's tiles: (K, N) -> config (batch 1 only).
TUNED_ROWS_UP: dict[tuple[int, int], RowsConfig] = {(4096, 14336): RowsConfig(block_n=16, rows=8, block_k=512)}


def _up_impl(k: int, n: int, b: int, impl: str) -> str:
    """The cats_up kernel a launch runs: the one named, or for "auto" the measured preference where it can run."""
    if impl not in UP_IMPLS:
        raise ValueError(f"impl must be one of {UP_IMPLS}, got {impl!r}")
    if impl == "oneshot" and b > ONESHOT_MAX_BATCH:
        raise ValueError(f"cats_up's one-shot tiles run batches of at most {ONESHOT_MAX_BATCH} rows, got {b}")
    if impl == "rows" and b != 1:
        raise ValueError(f"cats_up's kept-rows walk runs batch 1 only, got {b}; use impl='walk' or 'oneshot'")
    if impl == "auto":
        impl = PREFERRED_UP.get((k, n, batch_bucket(b)), "walk")
        impl = "walk" if b > ONESHOT_MAX_BATCH or (impl == "rows" and b != 1) else impl
    return impl


@torch.library.custom_op("actsparse::cats_up", mutates_args=())
def _cats_up_op(x: torch.Tensor, w_up: torch.Tensor, a: torch.Tensor, thresh: torch.Tensor,
                norm_weight: Optional[torch.Tensor], eps: float, impl: str = "auto", act: int = 0) -> torch.Tensor:
    b, k = x.shape
    n = w_up.shape[0]
    chosen = _up_impl(k, n, b, impl)
    if chosen == "oneshot":
        cfg = TUNED_ONESHOT_UP.get((k, n, batch_bucket(b))) or OneshotConfig(block_n=64, block_k=128, num_warps=4)
        return _launch_oneshot_up(x, w_up, a, thresh, norm_weight, eps, cfg, act)
    if chosen == "rows":
        return _launch_rows_up(x, w_up, a, thresh, norm_weight, eps, TUNED_ROWS_UP.get((k, n)) or RowsConfig(), act)
    _, cfg = choose_impl("cats_up", k, n, b, "masked")  # the masked walk's configuration (or its override)
    use_dot = cfg.use_dot or b > FMA_MAX_BATCH
    block_b = 16 if use_dot else triton.next_power_of_2(b)
    tiles_n, tiles_b = triton.cdiv(n, cfg.block_n), triton.cdiv(b, block_b)
    split = choose_split(cfg, k, tiles_n * tiles_b, x.device)
    k_split = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_split)
    y = new_output((b, n), x.device, a.dtype)
    ws, cnt = split_workspace(split, 1, b, n, tiles_n * tiles_b, y)
    _gather_up_kernel[(tiles_n, split, tiles_b)](
        x, norm_weight if norm_weight is not None else x, a, thresh, w_up, y, ws, cnt,
        b, k, n, k_split,
        x.stride(0), a.stride(0), thresh.stride(0), w_up.stride(0), y.stride(0),
        eps,
        NORM=norm_weight is not None, NORM_BLOCK=min(triton.next_power_of_2(k), max(1024, 4096 // block_b)),
        USE_DOT=use_dot, IEEE=w_up.dtype == torch.float32, SPLIT=split > 1,
        BLOCK_B=block_b, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, ACT=act,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x.device),
    )
    return y


@_cats_up_op.register_fake
def _(x, w_up, a, thresh, norm_weight, eps, impl="auto", act=0):
    return a.new_empty((x.shape[0], w_up.shape[0]))


def cats_up(
    x: torch.Tensor,
    w_up: torch.Tensor,
    a: torch.Tensor,
    thresh: torch.Tensor,
    *,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    impl: str = "auto",
    act: str = "none",
) -> torch.Tensor:
    """Return h [B, I] = where(|a| > t, a ⊙ act(W_u·x̂), 0), reading only the rows of W_u [I, K] that are kept.

    x: [B, K] (the residual stream when norm_weight is given); a: [B, I], CATS' gate activations silu(W_g·x̂)
    (act "none", W_u the up projection) or COUNTDOWN's up outputs (act "silu" / "gelu_tanh", w_up then holds
    the gate projection); thresh: float32 scalar tensor, [1] or [I]. impl: "walk" (a split-K walk over the kept rows, any
    batch), "oneshot" (one program per [rows × columns] tile of W_u, fp32 atomic sums; batch ≤ 16), "rows" (each
    program ranks its kept channels and reads only whole kept rows, a full tile a step; batch 1) or "auto" (the one
    measured fastest for this shape, `PREFERRED_UP`, else the walk).
    """
    if x.dim() != 2 or w_up.dim() != 2 or w_up.shape[1] != x.shape[1]:
        raise ValueError(f"x must be [B, K] and w_up [I, K] (natural nn.Linear layout), got "
                         f"{tuple(x.shape)} and {tuple(w_up.shape)}")
    if w_up.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("w_up and x must be contiguous along K")
    n = w_up.shape[0]
    if tuple(a.shape) != (x.shape[0], n):
        raise ValueError(f"a must have shape [{x.shape[0]}, {n}], got {tuple(a.shape)}")
    if thresh.dtype != torch.float32:
        raise ValueError(f"thresh must be float32, got {thresh.dtype}")
    if thresh.numel() == 1:
        thresh = thresh.reshape(1).expand(n)
    if tuple(thresh.shape) != (n,):
        raise ValueError(f"thresh must be a scalar or have shape [{n}], got {tuple(thresh.shape)}")
    if norm_weight is not None and tuple(norm_weight.shape) != (x.shape[1],):
        raise ValueError(f"norm_weight must have shape [{x.shape[1]}], got {tuple(norm_weight.shape)}")
    if act not in ACTS:
        raise ValueError(f"act must be one of {sorted(ACTS)}, got {act!r}")
    _up_impl(x.shape[1], n, x.shape[0], impl)  # refuses a bad impl here
    return torch.ops.actsparse.cats_up(x, w_up, a, thresh, norm_weight, float(eps), impl, ACTS[act])
