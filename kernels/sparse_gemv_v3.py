"""Input-sparse GEMV v3: work proportional to the ACTIVE rows (batch 1 to 4, one launch per op).

v2 walked every K row of its slice and let masked loads skip the bytes, but each chunk still cost
one memory latency, so time barely fell with sparsity. v3 makes the iteration count follow the
active rows:

1. A program (pid_n: a strip of BLOCK_N output columns; pid_k: a SEG_K slice of K; pid_m: which
   matrix of a gate/up pair) loads its x slice once, normalises it (RMSNorm factor from one wide
   load of the whole row, L2-resident), selects, and compacts the kept channels into a list
   (cumsum of the keep bits → slot of each kept channel; scattered to a small scratch buffer,
   read back after a CTA barrier). Every program of the same slice computes the same list, so the
   programs need no producer launch and no ordering between them (identical values only).
2. It then loops `for i in range(0, count, BLOCK_K)`: a device-side bound, so no host sync and
   graph-safe; each step gathers BLOCK_K whole weight rows of its strip (W^T [K, N] row-major: a
   row of the strip is BLOCK_N contiguous elements, 128 bytes at BLOCK_N = 64 bf16) while the next
   step's indices are loaded. At sparsity s a program runs ⌈(1 − s)·SEG_K / BLOCK_K⌉ steps.
3. Partials [matrices × slices, B, N] go to an fp32 workspace; the last-arriving program of a
   strip (one atomic counter increment per program, the counter reset by that program for the
   next launch or graph replay) reads all partials in ONE vectorised load, sums them in a fixed
   order (deterministic) and runs the epilogue: bias, silu / silu(gate)·up, residual, cast.

Gate and up are separate programs of one launch (pid_m), so each holds one accumulator.

Batches 2-4 (`V3Config(use_dot=True)`): the FMA accumulators grow with the batch (batch × BLOCK_K ×
BLOCK_N fp32), which capped the programs per SM; the tensor-core walk pads the batch to 16 rows and
runs each gathered step as one tl.dot [16, BLOCK_K] × [BLOCK_K, BLOCK_N] into a [16, BLOCK_N]
accumulator (x_s rounded to the weights' dtype first, as the reference does).

v6 (`impl="v6"`, PRELIST): step 1 moves into a separate compaction launch (`_compact_kernel`, one
program per K slice and threshold row), so a walk program only loads its slice's count and list.
Measured (BENCHMARKS.md, Session 4): v3 lost to v2 by 2-3x because every program re-did step 1;
v6 beats v2 at every sparsity and batch measured, and is the default at batch ≤ 4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import V3Config, new_output, record_compiled
from .pdl import launch_kwargs, pdl_prologue
from .sparse_gemv import _epilogue, _fit_block_n, _launch_args, _row_rstd, _select, _split_workspace


@triton.jit
def _compact_slice(x_ptr, g_ptr, t_ptr, m_ptr, idx_base, val_base, sel, pid_k, offs_b, mask_b, K,
                   stride_xb, stride_ts, stride_tk, stride_ms, eps,
                   NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr, NM_N: tl.constexpr,
                   NM_M: tl.constexpr, BLOCK_B: tl.constexpr, SEG_K: tl.constexpr):
    """Select the SEG_K slice pid_k of x with threshold row `sel` and compact its kept channels (the batch union):
    indices to idx_base[0:count], values [BLOCK_B, count] to val_base; return count."""
    x_rows = x_ptr + offs_b[:, None] * stride_xb
    rstd = tl.zeros([BLOCK_B], dtype=tl.float32)
    if NORM:
        rstd = _row_rstd(x_rows, mask_b, K, eps, NORM_BLOCK, BLOCK_B)
    offs_k = pid_k * SEG_K + tl.arange(0, SEG_K)
    mask_k = offs_k < K
    xv = tl.load(x_rows + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
    if NORM:
        gv = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        xv = xv * rstd[:, None] * gv[None, :]
    xs, rows = _select(xv, t_ptr + sel * stride_ts, m_ptr + sel * stride_ms, offs_k, mask_k, mask_b, stride_tk,
                       HAS_SHIFT, NM_N, NM_M, BLOCK_B, SEG_K)
    keep = rows.to(tl.int32)
    pos = tl.cumsum(keep, axis=0) - 1
    kept = keep != 0
    tl.store(idx_base + pos, offs_k, mask=kept)
    tl.store(val_base + pos[None, :], xs, mask=kept[None, :] & mask_b[:, None])
    return tl.sum(keep, axis=0)


@triton.jit
def _compact_kernel(x_ptr, g_ptr, t_ptr, m_ptr, idx_ptr, val_ptr, count_ptr, B, K,
                    stride_xb, stride_ts, stride_tk, stride_ms, eps,
                    NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr, NM_N: tl.constexpr,
                    NM_M: tl.constexpr, GROUPS: tl.constexpr, BLOCK_B: tl.constexpr, SEG_K: tl.constexpr,
                    PDL: tl.constexpr):
    """The v6 compaction pass: one program per (K slice, threshold row) writes the list the v3 walk reads."""
    pdl_prologue(PDL)
    pid_k = tl.program_id(0)
    sel = tl.program_id(1)
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    slot = sel * GROUPS + pid_k
    count = _compact_slice(x_ptr, g_ptr, t_ptr, m_ptr, idx_ptr + slot * SEG_K,
                           val_ptr + slot * (BLOCK_B * SEG_K) + offs_b[:, None] * SEG_K, sel, pid_k, offs_b, mask_b,
                           K, stride_xb, stride_ts, stride_tk, stride_ms, eps, NORM, NORM_BLOCK, HAS_SHIFT, NM_N,
                           NM_M, BLOCK_B, SEG_K)
    tl.store(count_ptr + slot, count)


@triton.jit
def _gather_step(acc, xc, w, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """acc += x_s · w for one gathered step (x_s rounded to the weights' dtype on tensor cores, as the reference
    does; fp32 weights: full-precision products)."""
    if USE_DOT:
        if IEEE:
            acc = tl.dot(xc, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(xc.to(w.dtype), w, acc)
    else:
        acc += xc[:, :, None] * w.to(tl.float32)[None, :, :]
    return acc


@triton.jit
def _v3_kernel(
    x_ptr, g_ptr, t_ptr, m_ptr, w_ptr, w2_ptr, bias_ptr, res_ptr, y_ptr, ws_ptr, cnt_ptr, idx_ptr, val_ptr, count_ptr,
    B, K, N, N0, N1,
    stride_xb, stride_ts, stride_tk, stride_ms, stride_wk, stride_bs, stride_rb, stride_yb,
    eps,
    NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr, PAIR: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr,
    GROUPS: tl.constexpr, GROUPS_P2: tl.constexpr, SPLIT: tl.constexpr, PRELIST: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, VAL_B: tl.constexpr, DEPTH: tl.constexpr,
    BLOCK_B: tl.constexpr, SEG_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    n_start = pid_n * BLOCK_N
    if PAIR:
        sel = pid_m  # gate / up thresholds
    else:
        sel = (n_start >= N0).to(tl.int32) + (n_start >= N1).to(tl.int32)  # q / k / v segment
    slot = sel * GROUPS + pid_k
    idx_base = idx_ptr + slot * SEG_K
    # A slot holds VAL_B value rows (the batch rounded up); BLOCK_B (16 for tl.dot) rows past B stay masked.
    val_base = val_ptr + slot * (VAL_B * SEG_K) + offs_b[:, None] * SEG_K
    if PRELIST:  # the compaction pass (select.compact) wrote this slice's list
        count = tl.load(count_ptr + slot)
    else:
        count = _compact_slice(x_ptr, g_ptr, t_ptr, m_ptr, idx_base, val_base, sel, pid_k, offs_b, mask_b, K,
                               stride_xb, stride_ts, stride_tk, stride_ms, eps, NORM, NORM_BLOCK, HAS_SHIFT, NM_N,
                               NM_M, BLOCK_B, SEG_K)
        tl.debug_barrier()  # the list is complete (and visible to every thread of the program) before it is read

    # ---- gather the active rows of the strip, BLOCK_K at a time; the next indices load meanwhile
    if pid_m == 0:
        wb = w_ptr
    else:
        wb = w2_ptr
    offs_n = n_start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    ar = tl.arange(0, BLOCK_K)
    mk = ar < count
    idx = tl.load(idx_base + ar, mask=mk, other=0, cache_modifier=".cg")
    xc = tl.load(val_base + ar[None, :], mask=mask_b[:, None] & mk[None, :], other=0.0, cache_modifier=".cg")
    if USE_DOT:  # batch 2-4: tensor cores on [16 (rows padded), BLOCK_K] x [BLOCK_K, BLOCK_N], 4 regs of acc
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    else:  # batch 1: products on CUDA cores, reduced over K once after the loop (no cross-thread traffic inside)
        acc = tl.zeros([BLOCK_B, BLOCK_K, BLOCK_N], dtype=tl.float32)
    if DEPTH == 1:
        for i in range(0, count, BLOCK_K):
            mk = (i + ar) < count
            w = tl.load(wb + idx[:, None] * stride_wk + offs_n[None, :], mask=mk[:, None] & mask_n[None, :],
                        other=0.0, eviction_policy="evict_first")
            nxt = i + BLOCK_K + ar
            mkn = nxt < count
            idx_n = tl.load(idx_base + nxt, mask=mkn, other=0, cache_modifier=".cg")
            xc_n = tl.load(val_base + nxt[None, :], mask=mask_b[:, None] & mkn[None, :], other=0.0,
                           cache_modifier=".cg")
            acc = _gather_step(acc, xc, w, USE_DOT, IEEE)
            idx = idx_n
            xc = xc_n
    else:
        # Two weight tiles in flight: step i multiplies tile i (requested one step earlier) while tile i+1 and
        # the indices of step i+2 are on their way, so a program never waits a full memory latency per step.
        w = tl.load(wb + idx[:, None] * stride_wk + offs_n[None, :], mask=mk[:, None] & mask_n[None, :], other=0.0,
                    eviction_policy="evict_first")
        nxt = BLOCK_K + ar
        mkn = nxt < count
        idx_1 = tl.load(idx_base + nxt, mask=mkn, other=0, cache_modifier=".cg")
        xc_1 = tl.load(val_base + nxt[None, :], mask=mask_b[:, None] & mkn[None, :], other=0.0, cache_modifier=".cg")
        for i in range(0, count, BLOCK_K):
            nxt = i + BLOCK_K + ar
            w_1 = tl.load(wb + idx_1[:, None] * stride_wk + offs_n[None, :],
                          mask=(nxt < count)[:, None] & mask_n[None, :], other=0.0, eviction_policy="evict_first")
            nxt2 = nxt + BLOCK_K
            mk2 = nxt2 < count
            idx_2 = tl.load(idx_base + nxt2, mask=mk2, other=0, cache_modifier=".cg")
            xc_2 = tl.load(val_base + nxt2[None, :], mask=mask_b[:, None] & mk2[None, :], other=0.0,
                           cache_modifier=".cg")
            acc = _gather_step(acc, xc, w, USE_DOT, IEEE)
            w, xc, idx_1, xc_1 = w_1, xc_1, idx_2, xc_2
    if USE_DOT:
        out = acc
    else:
        out = tl.sum(acc, axis=1)  # [BLOCK_B, BLOCK_N]
    mask_out = mask_b[:, None] & mask_n[None, :]

    if SPLIT:
        ws_tile = offs_b[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + (pid_m * GROUPS + pid_k) * B * N + ws_tile, out, mask=mask_out)
        tl.debug_barrier()  # all partials of this program are written before it signals
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == (1 + PAIR) * GROUPS - 1:
            tl.store(cnt_ptr + pid_n, 0)  # ready for the next launch / graph replay: no zeroing launch
            gs = tl.arange(0, GROUPS_P2)
            pm = (gs < GROUPS)[:, None, None] & mask_out[None, :, :]
            # One load of every slice's partial: [GROUPS_P2, BLOCK_B, BLOCK_N], summed in a fixed order.
            parts = tl.load(ws_ptr + gs[:, None, None] * B * N + ws_tile[None, :, :], mask=pm, other=0.0,
                            cache_modifier=".cg")
            out = tl.sum(parts, axis=0)
            out2 = out
            if PAIR:
                parts2 = tl.load(ws_ptr + (GROUPS + gs[:, None, None]) * B * N + ws_tile[None, :, :], mask=pm,
                                 other=0.0, cache_modifier=".cg")
                out2 = tl.sum(parts2, axis=0)
            _epilogue(out, out2, bias_ptr, stride_bs, res_ptr, stride_rb, y_ptr, stride_yb, offs_b, offs_n, mask_n,
                      mask_out, HAS_BIAS, PAIR, ACT, HAS_RES, y_ptr, y_ptr, 0, False, False)
    else:
        _epilogue(out, out, bias_ptr, stride_bs, res_ptr, stride_rb, y_ptr, stride_yb, offs_b, offs_n, mask_n,
                  mask_out, HAS_BIAS, PAIR, ACT, HAS_RES, y_ptr, y_ptr, 0, False, False)


def launch_v3(x, wt, w2, thresh, shift, bias, residual, norm_weight, eps, act, bounds, nm_n, nm_m,
              cfg: V3Config, prelist: bool = False) -> torch.Tensor:
    """Run the v3 kernel (arguments already validated by the public op); return y [B, N].

    prelist (the v6 path): a compaction pass (one program per K slice and threshold row) writes the lists
    first, so the walk's programs neither normalise, select nor compact: they load their slice's count."""
    b, k = x.shape
    n = wt.shape[1]
    val_b = triton.next_power_of_2(b)  # value rows of a compacted list
    use_dot = cfg.use_dot
    block_b = 16 if use_dot else val_b  # tl.dot takes at least 16 rows: the padding rows are masked
    block_n = _fit_block_n(cfg.block_n, bounds) if bounds else cfg.block_n
    seg_k = min(cfg.seg_k, max(16, triton.next_power_of_2(k)))
    if nm_n > 0 and seg_k % nm_m:
        seg_k = max(seg_k, nm_m)
    block_k = min(cfg.block_k, seg_k)
    if use_dot and (block_k < 16 or block_n < 16):
        raise ValueError(f"the tensor-core walk (use_dot) needs block_k and block_n ≥ 16, got {block_k} and {block_n}")
    groups = triton.cdiv(k, seg_k)
    mats = 2 if w2 is not None else 1
    tiles_n = triton.cdiv(n, block_n)
    split = mats * groups > 1
    nsel = 2 if w2 is not None else len(bounds) + 1
    y = new_output((b, n), x.device, x.dtype)
    ws, cnt = _split_workspace(mats * groups, 1, b, n, tiles_n, y)
    # Compacted lists: one per (selection row, K slice); indices int32 and values fp32 per batch row.
    idx = torch.empty(nsel * groups * seg_k, device=x.device, dtype=torch.int32)
    val = torch.empty(nsel * groups * val_b * seg_k, device=x.device, dtype=torch.float32)
    count = torch.empty(nsel * groups, device=x.device, dtype=torch.int32)
    ptrs, (n0, n1), strides, flags = _launch_args(x, wt, w2, thresh, shift, bias, residual, norm_weight, act, bounds,
                                                  nm_n, nm_m, y, block_b)
    if prelist:
        xp, gp, tp, mp = ptrs[:4]
        _compact_kernel[(groups, nsel)](
            xp, gp, tp, mp, idx, val, count, b, k, *strides[:4], eps, NORM=flags["NORM"],
            NORM_BLOCK=flags["NORM_BLOCK"], HAS_SHIFT=flags["HAS_SHIFT"], NM_N=flags["NM_N"], NM_M=flags["NM_M"],
            GROUPS=groups, BLOCK_B=val_b, SEG_K=seg_k, num_warps=4, **launch_kwargs(x.device))
    compiled = _v3_kernel[(tiles_n, groups, mats)](
        *ptrs, ws, cnt, idx, val, count, b, k, n, n0, n1, *strides, eps, **flags,
        GROUPS=groups, GROUPS_P2=triton.next_power_of_2(groups), SPLIT=split, PRELIST=prelist,
        USE_DOT=use_dot, IEEE=wt.dtype == torch.float32, VAL_B=val_b, DEPTH=cfg.depth,
        BLOCK_B=block_b, SEG_K=seg_k, BLOCK_K=block_k, BLOCK_N=block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    record_compiled("v3_kernel", compiled, k, n, w2 is not None)
    return y
