"""The gather walk: work proportional to the ACTIVE rows (batch 1 to 4), two launches per op (one with
`GatherConfig(fused=True)`: the walk's first programs write the lists, see 5.).

1. The compaction pass (`_compact_kernel`, one program per K slice and threshold row: q/k/v segments or
   gate/up) loads its slice of x, normalises it (RMSNorm factor from one wide load of the whole row,
   L2-resident), selects (threshold, shift or N:M) and writes the kept channels of the batch union as a list:
   indices (cumsum of the keep bits gives each one's slot) and the selected values per batch row, and a count.
2. The walk (`_gather_kernel`; pid_n: a strip of BLOCK_N output columns, pid_k: a K slice, pid_m: which matrix
   of a gate/up pair) loops `for i in range(0, count, BLOCK_K)`, a device-side bound (no host sync,
   graph-safe); each step gathers BLOCK_K whole weight rows of its strip (W^T [K, N] row-major: a row of the
   strip is BLOCK_N contiguous elements) while the next step's indices load. At sparsity s a program runs
   ⌈(1 − s)·SEG_K / BLOCK_K⌉ steps; with `depth=2` two gathered tiles are in flight per program.
3. Partials [matrices × slices, B, N] go to an fp32 workspace; the last-arriving program of a strip (one
   atomic counter increment per program, the counter reset by that program for the next launch or graph
   replay) reads all partials in one vectorised load, sums them in a fixed order (deterministic) and runs the
   epilogue: bias, act / act(gate)·up (silu or gelu-tanh), residual, cast.
4. Adding into the caller's fp32 tensor (`sparse_gemv(accumulate=)` / `out=`, `sparse_gated_mlp(out=)`: the
   residual stream, q|k|v's or gate|up's raw sums): no workspace, counter or epilogue. With one K slice a program
   owns its output elements (a plain store, or read-add-store into the stream: deterministic); with several
   the slices' partials meet by fp32 atomics, in a tensor the compaction pass zeroes when it is written.
   `gated=`: the compaction pass forms act(gate)·up from a gate/up pair's raw sums before it selects.

Batches 2-4 (`GatherConfig(use_dot=True)`): the FMA accumulators grow with the batch (batch × BLOCK_K × BLOCK_N
fp32); the tensor-core walk pads the batch to 16 rows and runs each gathered step as one tl.dot
[16, BLOCK_K] × [BLOCK_K, BLOCK_N] into a [16, BLOCK_N] accumulator (x_s rounded to the weights' dtype first,
as the reference does).

5. `fused=True`: no compaction launch. Each program of the walk claims a list to write (a device-wide int64
   counter) until none is left, then waits until every list is marked ready, then walks as above. The claim and
   ready counters only grow, by a fixed amount per launch, so no launch or replay resets them, and a program
   only ever waits on lists being written by running programs (no deadlock whatever the scheduling order). It
   trades the boundary between two launches for one contended atomic per program and the wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import GatherConfig, choose_impl, claim_counters, new_output, record_compiled, tile_counters
from .gemv_common import (accumulate, activate, epilogue, fit_block_n, launch_args, out_dtype, row_rstd,
                          select_chunk, split_workspace)
from .pdl import pdl_args, pdl_prologue


@triton.jit
def _compact_slice(x_ptr, g_ptr, t_ptr, m_ptr, idx_base, val_base, sel, pid_k, offs_b, mask_b, K,
                   stride_xb, stride_ts, stride_tk, stride_ms, stride_xm, eps,
                   NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr, NM_N: tl.constexpr,
                   NM_M: tl.constexpr, GATED: tl.constexpr, BLOCK_B: tl.constexpr, SEG_K: tl.constexpr,
                   CHUNK: tl.constexpr):
    """Select the SEG_K slice pid_k of x with threshold row `sel` and compact its kept channels (the batch union):
    indices to idx_base[0:count], values [BLOCK_B, count] to val_base; return count. CHUNK channels at a time
    (a divisor of SEG_K: the walk's launch keeps its registers for the walk). GATED (an ACTS code): x is a
    gate/up pair's raw sums [2, B, K] (the up sums stride_xm further on) and the input is act(gate)·up."""
    x_rows = x_ptr + offs_b[:, None] * stride_xb
    rstd = tl.zeros([BLOCK_B], dtype=tl.float32)
    if NORM:
        rstd = row_rstd(x_rows, mask_b, K, eps, NORM_BLOCK, BLOCK_B)
    count = 0
    for c0 in tl.static_range(0, SEG_K, CHUNK):
        offs_k = pid_k * SEG_K + c0 + tl.arange(0, CHUNK)
        mask_k = offs_k < K
        xv = tl.load(x_rows + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        if NORM:
            gv = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            xv = xv * rstd[:, None] * gv[None, :]
        if GATED > 0:
            uv = tl.load(x_rows + stride_xm + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)
            xv = activate(xv, GATED) * uv
        xs, rows = select_chunk(xv, t_ptr + sel * stride_ts, m_ptr + sel * stride_ms, offs_k, mask_k, mask_b,
                                stride_tk, HAS_SHIFT, NM_N, NM_M, BLOCK_B, CHUNK)
        keep = rows.to(tl.int32)
        pos = count + tl.cumsum(keep, axis=0) - 1
        kept = keep != 0
        tl.store(idx_base + pos, offs_k, mask=kept)
        tl.store(val_base + pos[None, :], xs, mask=kept[None, :] & mask_b[:, None])
        count += tl.sum(keep, axis=0)
    return count


@triton.jit
def _compact_slot(slot, x_ptr, g_ptr, t_ptr, m_ptr, idx_ptr, val_ptr, count_ptr, z_ptr, offs_b, mask_b, K, Z_N,
                  Z_TOTAL, stride_xb, stride_ts, stride_tk, stride_ms, stride_xm, eps,
                  NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr, NM_N: tl.constexpr,
                  NM_M: tl.constexpr, GATED: tl.constexpr, GROUPS: tl.constexpr, BLOCK_B: tl.constexpr,
                  SEG_K: tl.constexpr, ZERO: tl.constexpr, Z_BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                  stride_xsel, XSEL: tl.constexpr):
    """Write list `slot` (threshold row slot // GROUPS, K slice slot % GROUPS) and its count; with ZERO also zero
    the slot's equal share (Z_N elements, below Z_TOTAL) of the fp32 tensor the walk then adds into. XSEL: list
    row slot // GROUPS selects x's row of that index (stride_xsel further on each) by threshold row 0 (a mixture
    of experts' down: each routed expert's own act(gate)·up, one rule for all)."""
    row = slot // GROUPS
    x_base = x_ptr
    if XSEL:
        x_base = x_ptr + row * stride_xsel
        row = 0
    count = _compact_slice(x_base, g_ptr, t_ptr, m_ptr, idx_ptr + slot * SEG_K,
                           val_ptr + slot * (BLOCK_B * SEG_K) + offs_b[:, None] * SEG_K, row,
                           slot % GROUPS, offs_b, mask_b, K, stride_xb, stride_ts, stride_tk, stride_ms, stride_xm,
                           eps, NORM, NORM_BLOCK, HAS_SHIFT, NM_N, NM_M, GATED, BLOCK_B, SEG_K, CHUNK)
    tl.store(count_ptr + slot, count)
    if ZERO:
        start = slot.to(tl.int64) * Z_N
        for z0 in range(0, Z_N, Z_BLOCK):
            offs = z0 + tl.arange(0, Z_BLOCK)
            tl.store(z_ptr + start + offs, tl.zeros([Z_BLOCK], dtype=tl.float32),
                     mask=(offs < Z_N) & (start + offs < Z_TOTAL))


@triton.jit
def _compact_kernel(x_ptr, g_ptr, t_ptr, m_ptr, idx_ptr, val_ptr, count_ptr, z_ptr, B, K, Z_N, Z_TOTAL,
                    stride_xb, stride_ts, stride_tk, stride_ms, stride_xm, eps,
                    NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr, NM_N: tl.constexpr,
                    NM_M: tl.constexpr, GATED: tl.constexpr, GROUPS: tl.constexpr, BLOCK_B: tl.constexpr,
                    SEG_K: tl.constexpr, ZERO: tl.constexpr, Z_BLOCK: tl.constexpr, PDL: tl.constexpr = False,
                    stride_xsel=0, XSEL: tl.constexpr = False, zc_ptr=None, ZC_N: tl.constexpr = 0,
                    ZC_P2: tl.constexpr = 1, CHUNK: tl.constexpr = 0):
    """The compaction pass: one program per (K slice, threshold row) writes the list the walk reads. ZC_N > 0:
    program (0, 0) also zeroes the ZC_N list counts at zc_ptr that the walk's last programs then append to (the
    next op's lists, `launch_gather(down_lists=)`). CHUNK: channels selected at a time (0: the whole slice; a
    power of two dividing SEG_K where SEG_K is none, e.g. lists of a kv head group's GROUP·D channels)."""
    pdl_prologue(PDL)
    if ZC_N > 0:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            zc = tl.arange(0, ZC_P2)
            tl.store(zc_ptr + zc, tl.zeros(zc.shape, dtype=tl.int32), mask=zc < ZC_N)
    offs_b = tl.arange(0, BLOCK_B)
    _compact_slot(tl.program_id(1) * GROUPS + tl.program_id(0), x_ptr, g_ptr, t_ptr, m_ptr, idx_ptr, val_ptr,
                  count_ptr, z_ptr, offs_b, offs_b < B, K, Z_N, Z_TOTAL, stride_xb, stride_ts, stride_tk, stride_ms,
                  stride_xm, eps, NORM, NORM_BLOCK, HAS_SHIFT, NM_N, NM_M, GATED, GROUPS, BLOCK_B, SEG_K, ZERO,
                  Z_BLOCK, SEG_K if CHUNK == 0 else CHUNK, stride_xsel, XSEL)


@triton.jit
def _claim_and_compact(claim_ptr, ready_ptr, x_ptr, g_ptr, t_ptr, m_ptr, idx_ptr, val_ptr, count_ptr, z_ptr,
                       offs_b, mask_b, K, Z_N, Z_TOTAL, stride_xb, stride_ts, stride_tk, stride_ms, stride_xm, eps,
                       NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr, NM_N: tl.constexpr,
                       NM_M: tl.constexpr, GATED: tl.constexpr, GROUPS: tl.constexpr, BLOCK_B: tl.constexpr,
                       SEG_K: tl.constexpr, ZERO: tl.constexpr, Z_BLOCK: tl.constexpr, SLOTS: tl.constexpr,
                       PROGRAMS: tl.constexpr, CHUNK: tl.constexpr):
    """The compaction inside the walk's own launch (`GatherConfig(fused=True)`): each program claims lists to
    write until none is left, then waits until all are written.

    The claim counter (int64) only grows: a launch takes exactly PROGRAMS + SLOTS claims (every program ends on
    one claim past the lists, the lists take one each), so launch e's claims lie in [e, e + 1)·(PROGRAMS + SLOTS)
    and the ready counter reaches (e + 1)·SLOTS when its lists are written; no program resets anything. A
    program only waits on lists already claimed, and a claimed list is being written by a running program, so
    the wait cannot deadlock whatever order the programs are scheduled in (the interpreter runs them one after
    another: the first claims every list)."""
    per_launch = PROGRAMS + SLOTS
    c = tl.atomic_add(claim_ptr, 1, sem="relaxed")
    base = (c // per_launch) * per_launch
    while c - base < SLOTS:
        _compact_slot((c - base).to(tl.int32), x_ptr, g_ptr, t_ptr, m_ptr, idx_ptr, val_ptr, count_ptr, z_ptr,
                      offs_b, mask_b, K, Z_N, Z_TOTAL, stride_xb, stride_ts, stride_tk, stride_ms, stride_xm, eps,
                      NORM, NORM_BLOCK, HAS_SHIFT, NM_N, NM_M, GATED, GROUPS, BLOCK_B, SEG_K, ZERO, Z_BLOCK, CHUNK,
                      0, False)
        tl.debug_barrier()  # every thread's stores of the list are issued before the release below
        tl.atomic_add(ready_ptr, 1, sem="release")
        c = tl.atomic_add(claim_ptr, 1, sem="relaxed")
    target = (base // per_launch + 1) * SLOTS
    seen = False
    while not seen:
        ready = tl.load(ready_ptr, volatile=True)  # plain polling: no atomic traffic while the lists are written
        while ready < target:
            ready = tl.load(ready_ptr, volatile=True)
        # One acquire once they are: the lists' stores are visible to every load after it. Its value is used
        # (always true here) so that the compiler keeps it.
        seen = tl.atomic_add(ready_ptr, 0, sem="acquire") >= target


@triton.jit
def walk_rows(idx_base, val_base, count_ptr, wb, offs_n, mask_n, mask_b, stride_wk, K, EAGER: tl.constexpr,
              DEPTH: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Walk one compacted list (its indices at idx_base, its values at val_base + batch row · SEG_K, its count at
    count_ptr) over the columns offs_n of W^T at wb, BLOCK_K kept rows a step; return (the columns' W·x_s
    [BLOCK_B, BLOCK_N] in fp32, the count)."""
    ar = tl.arange(0, BLOCK_K)
    if EAGER:
        # The first indices load beside the count, not after it; past the count they are stale (any int32:
        # the list is not cleared), so clamped to a valid row here and masked out of every use below.
        idx = tl.minimum(tl.maximum(tl.load(idx_base + ar, cache_modifier=".cg"), 0), K - 1)
    count = tl.load(count_ptr)  # the compaction pass wrote this slice's list
    mk = ar < count
    if not EAGER:
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
            acc = accumulate(acc, xc, w, USE_DOT, IEEE)
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
            acc = accumulate(acc, xc, w, USE_DOT, IEEE)
            w, xc, idx_1, xc_1 = w_1, xc_1, idx_2, xc_2
    if USE_DOT:
        out = acc
    else:
        out = tl.sum(acc, axis=1)  # [BLOCK_B, BLOCK_N]
    return out, count


@triton.jit
def _gather_kernel(
    x_ptr, g_ptr, t_ptr, m_ptr, w_ptr, w2_ptr, bias_ptr, res_ptr, y_ptr, ws_ptr, cnt_ptr, idx_ptr, val_ptr, count_ptr,
    B, K, N, N0, N1,
    stride_xb, stride_ts, stride_tk, stride_ms, stride_wk, stride_bs, stride_rb, stride_yb,
    eps,
    NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr, PAIR: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr,
    GROUPS: tl.constexpr, GROUPS_P2: tl.constexpr, SPLIT: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, VAL_B: tl.constexpr, DEPTH: tl.constexpr, ACCUM: tl.constexpr,
    BLOCK_B: tl.constexpr, SEG_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    EAGER: tl.constexpr = False, PDL: tl.constexpr = False,
    claim_ptr=None, ready_ptr=None, z_ptr=None, Z_N=0, Z_TOTAL=0, stride_xm=0, FUSED: tl.constexpr = False,
    GATED: tl.constexpr = 0, SLOTS: tl.constexpr = 1, PROGRAMS: tl.constexpr = 1, ZERO: tl.constexpr = False,
    CHUNK: tl.constexpr = 1, e_ptr=None, ew_ptr=None, stride_we=0, EXPERTS: tl.constexpr = False,
    HAS_EW: tl.constexpr = False, arr_ptr=None, dt_ptr=None, dm_ptr=None, didx_ptr=None, dval_ptr=None,
    dcnt_ptr=None, stride_dtk=0, LISTS: tl.constexpr = False, D_ACT: tl.constexpr = 1,
    D_SHIFT: tl.constexpr = False, D_NM_N: tl.constexpr = 0, D_NM_M: tl.constexpr = 1, SEG_D: tl.constexpr = 1):
    pdl_prologue(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    # EXPERTS (batch 1): pid_m is a routed row's matrix (a pair: 2·row + gate/up) or the routed row (down); the
    # weights' base moves by the row's expert id, which the device holds, so a captured graph serves any routing
    mat = pid_m
    row = 0
    w_off = 0
    if EXPERTS:
        if PAIR:
            mat = pid_m % 2
            row = pid_m // 2
        else:
            mat = 0
            row = pid_m
        w_off = tl.load(e_ptr + row).to(tl.int64) * stride_we
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    if FUSED:  # no compaction launch: the first programs to claim the lists write them (see _claim_and_compact)
        offs_vb = tl.arange(0, VAL_B)
        _claim_and_compact(claim_ptr, ready_ptr, x_ptr, g_ptr, t_ptr, m_ptr, idx_ptr, val_ptr, count_ptr, z_ptr,
                           offs_vb, offs_vb < B, K, Z_N, Z_TOTAL, stride_xb, stride_ts, stride_tk, stride_ms,
                           stride_xm, eps, NORM, NORM_BLOCK, HAS_SHIFT, NM_N, NM_M, GATED, GROUPS, VAL_B,
                           SEG_K, ZERO, 1024, SLOTS, PROGRAMS, CHUNK)
    n_start = pid_n * BLOCK_N
    if PAIR:
        sel = mat  # gate / up thresholds (every routed expert reads the same two lists)
    elif EXPERTS:
        sel = row  # down: each routed row's own list
    else:
        sel = (n_start >= N0).to(tl.int32) + (n_start >= N1).to(tl.int32)  # q / k / v segment
    slot = sel * GROUPS + pid_k
    idx_base = idx_ptr + slot * SEG_K
    # A slot holds VAL_B value rows (the batch rounded up); BLOCK_B (16 for tl.dot) rows past B stay masked.
    val_base = val_ptr + slot * (VAL_B * SEG_K) + offs_b[:, None] * SEG_K
    if mat == 0:
        wb = w_ptr + w_off
    else:
        wb = w2_ptr + w_off
    offs_n = n_start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    out, count = walk_rows(idx_base, val_base, count_ptr + slot, wb, offs_n, mask_n, mask_b, stride_wk, K, EAGER,
                           DEPTH, USE_DOT, IEEE, BLOCK_B, BLOCK_K, BLOCK_N)
    if HAS_EW:  # the routing weight scales the expert's sums (W is linear: as if it scaled the input)
        out = out * tl.load(ew_ptr + row).to(tl.float32)
    mask_out = mask_b[:, None] & mask_n[None, :]
    y_m = pid_m  # a pair's (routed row's) matrix: its own row of y
    if EXPERTS and not PAIR:
        y_m = 0  # every routed expert of the token adds into its row

    if ACCUM > 0:
        # y is the caller's fp32 [B, N] (a pair's: [2, B, N]); no workspace, counter or epilogue. ACCUM 1: one
        # program per output element (a single K slice) writes y = W·x_s (+ bias); 2: it adds into y, the sole
        # writer of its elements, so a plain read-modify-write; 3: the slices' partials meet by fp32 atomics
        # (y zeroed by the compaction pass where it is written, or holding the residual it is added to).
        if HAS_BIAS:
            if pid_k == 0:
                out += tl.load(bias_ptr + pid_m * stride_bs + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_tile = y_ptr + y_m * B * stride_yb + offs_b[:, None] * stride_yb + offs_n[None, :]
        if ACCUM == 1:
            tl.store(y_tile, out, mask=mask_out)
        elif ACCUM == 2:
            tl.store(y_tile, out + tl.load(y_tile, mask=mask_out, other=0.0), mask=mask_out)
        else:
            adds = count > 0  # a slice with no kept row adds nothing: no atomics
            if HAS_BIAS:
                adds = adds | (pid_k == 0)
            if adds:
                tl.atomic_add(y_tile, out, mask=mask_out, sem="relaxed")
        if LISTS:
            # A gate/up pair's raw sums at batch 1 (y [2, N]): the last of a strip's 2·GROUPS programs to arrive
            # forms its columns' h = act(gate)·up, selects it with the next op's (down's) rule and appends the
            # kept channels to down's list of the slice holding the strip (counts zeroed by the compaction pass):
            # down's walk then runs without a compaction launch of its own.
            tl.debug_barrier()  # every thread's sums are issued before the program signals
            arrived = tl.atomic_add(arr_ptr + pid_n, 1, sem="acq_rel")
            if arrived == 2 * GROUPS - 1:
                tl.store(arr_ptr + pid_n, 0)  # ready for the next launch / graph replay
                g = tl.load(y_ptr + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg").to(tl.float32)
                u = tl.load(y_ptr + stride_yb + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg").to(tl.float32)
                h = (activate(g, D_ACT) * u)[None, :]
                hs, rows = select_chunk(h, dt_ptr, dm_ptr, offs_n, mask_n, mask_b, stride_dtk, D_SHIFT, D_NM_N,
                                        D_NM_M, 1, BLOCK_N)
                keep = rows.to(tl.int32)
                dslot = n_start // SEG_D
                base = tl.atomic_add(dcnt_ptr + dslot, tl.sum(keep, axis=0), sem="relaxed")
                at = dslot * SEG_D + base + tl.cumsum(keep, axis=0) - 1
                tl.store(didx_ptr + at, offs_n, mask=keep != 0)
                tl.store(dval_ptr + at[None, :], hs, mask=(keep != 0)[None, :])
    elif SPLIT:
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
            epilogue(out, out2, bias_ptr, stride_bs, res_ptr, stride_rb, y_ptr, stride_yb, offs_b, offs_n, mask_n,
                      mask_out, HAS_BIAS, PAIR, ACT, HAS_RES, y_ptr, y_ptr, 0, False, False)
    else:
        epilogue(out, out, bias_ptr, stride_bs, res_ptr, stride_rb, y_ptr, stride_yb, offs_b, offs_n, mask_n,
                  mask_out, HAS_BIAS, PAIR, ACT, HAS_RES, y_ptr, y_ptr, 0, False, False)


def launch_gather(x, wt, w2, thresh, shift, bias, residual, norm_weight, eps, act, bounds, nm_n, nm_m,
                  cfg: GatherConfig, accumulate=None, zero_first: bool = False, gated: int = 0, experts=None,
                  expert_weights=None, down: Optional[dict] = None) -> torch.Tensor:
    """Run the compaction pass and the gather walk (arguments validated by the public ops); return y [B, N], or
    with `accumulate` (fp32 [B, N]; a gate/up pair: [2, B, N]) add W·x_s (+ bias) into it in place and return it;
    `zero_first`: it receives W·x_s (+ bias) instead. `gated` (an ACTS code): x is a gate/up pair's raw sums
    [2, B, K] and the input is act(gate)·up (see `launch_oneshot`).
    `experts` (int [1, T] on the device; batch 1): wt (and w2) are stacked experts [E, K, N]. A pair: x [1, K] is
    compacted once (two lists every routed expert walks) and `accumulate` [1, T, 2, N] receives each routed
    expert's raw sums; a single matrix with `gated`: x is the pair's sums [1, T, 2, K], each routed row's
    act(gate)·up its own list, and Σ_t w_t·W_{e_t}·x_s is added into `accumulate` [1, N] (w_t: expert_weights).
    `down` (a pair's raw sums at batch 1): dict(lists=ActiveLists of the N channels of h, thresh [1, N], shift
    [1, N] or None, nm_n, nm_m, act): the last program of each column strip also writes h's kept channels as
    down's lists (see `_gather_kernel`'s LISTS)."""
    stride_we, rows, stride_xsel = 0, 1, 0
    if experts is not None:
        stride_we, rows = wt.stride(0), experts.numel()
        wt, w2 = wt[0], (None if w2 is None else w2[0])
        if gated:  # each routed row's own pair of raw sums: the lists' x rows lie stride_xsel apart
            x = x.reshape(rows, 2, x.shape[-1])
            stride_xsel = x.stride(0)
            x = x.transpose(0, 1)[:, :1]  # [2, 1, K]: routed row 0's gate and up sums
    stride_xm = x.stride(0) if gated else 0
    x = x[0] if gated else x
    b, k = x.shape
    n = wt.shape[1]
    val_b = triton.next_power_of_2(b)  # value rows of a compacted list
    use_dot = cfg.use_dot
    block_b = 16 if use_dot else val_b  # tl.dot takes at least 16 rows: the padding rows are masked
    block_n = fit_block_n(cfg.block_n, bounds) if bounds else cfg.block_n
    seg_k = min(cfg.seg_k, max(16, triton.next_power_of_2(k)))
    if nm_n > 0 and seg_k % nm_m:
        seg_k = max(seg_k, nm_m)
    block_k = min(cfg.block_k, seg_k)
    if use_dot and (block_k < 16 or block_n < 16):
        raise ValueError(f"the tensor-core walk (use_dot) needs block_k and block_n ≥ 16, got {block_k} and "
                         f"{block_n}")
    groups = triton.cdiv(k, seg_k)
    mats = 2 if w2 is not None else 1
    tiles_n = triton.cdiv(n, block_n)
    nsel = 2 if w2 is not None else (rows if experts is not None else len(bounds) + 1)
    if accumulate is None:
        split, accum = mats * groups > 1, 0
        y = new_output((b, n), x.device, out_dtype(wt, residual))
        ws, cnt = split_workspace(mats * groups, 1, b, n, tiles_n, y)
    else:
        # One K slice: each program owns its output elements outright (written, or read-modified-written);
        # several: their partials meet by atomics in a tensor the compaction pass zeroed where it is written.
        split, accum = False, (1 if zero_first else 2) if groups == 1 else 3
        y = accumulate if accumulate.dim() == 2 else accumulate[0]  # a pair's second matrix is B·N further on
        if experts is not None:
            # a pair: one row per (routed row, matrix); down: the routed rows all add into the token's row
            y = accumulate.view(-1, n)
            accum = accum if mats == 2 else 3
        ws, cnt = y, y
    zero = accum == 3 and zero_first
    z_total = accumulate.numel() if zero else 0
    z_n = triton.cdiv(z_total, nsel * groups)
    # Compacted lists: one per (selection row, K slice); indices int32 and values fp32 per batch row.
    idx = torch.empty(nsel * groups * seg_k, device=x.device, dtype=torch.int32)
    val = torch.empty(nsel * groups * val_b * seg_k, device=x.device, dtype=torch.float32)
    count = torch.empty(nsel * groups, device=x.device, dtype=torch.int32)
    ptrs, (n0, n1), strides, flags = launch_args(x, wt, w2, thresh, shift, bias, residual, norm_weight, act, bounds,
                                                 nm_n, nm_m, y, block_b)
    xp, gp, tp, mp = ptrs[:4]
    grid_m = mats * rows
    programs = tiles_n * groups * grid_m
    lists_out, zc = {}, {}
    if down is not None:
        dl = down["lists"]
        if dl.seg % block_n:
            raise ValueError(f"down's lists take whole strips of the pair: seg {dl.seg} is no multiple of "
                             f"block_n {block_n}")
        lists_out = dict(arr_ptr=tile_counters(x.device), dt_ptr=down["thresh"],
                         dm_ptr=down["shift"] if down["shift"] is not None else down["thresh"], didx_ptr=dl.idx,
                         dval_ptr=dl.val, dcnt_ptr=dl.count, stride_dtk=down["thresh"].stride(1), LISTS=True,
                         D_ACT=down["act"], D_SHIFT=down["shift"] is not None, D_NM_N=down["nm_n"],
                         D_NM_M=max(down["nm_m"], 1), SEG_D=dl.seg)
        zc = dict(zc_ptr=dl.count, ZC_N=dl.count.numel(), ZC_P2=triton.next_power_of_2(dl.count.numel()))
    # a single matrix's routed rows: each its own list (gated: its own input; else the token's, once per row)
    xsel = dict(stride_xsel=stride_xsel, XSEL=True) if experts is not None and w2 is None else {}
    routed = {}
    if experts is not None:
        routed = dict(e_ptr=experts, ew_ptr=expert_weights if expert_weights is not None else experts,
                      stride_we=stride_we, EXPERTS=True, HAS_EW=expert_weights is not None)
    if cfg.fused and experts is None and down is None:  # one launch: the walk's first programs write the lists (its pointers and flags cover the rest)
        claims = claim_counters(x.device, programs, nsel * groups)
        fused = dict(claim_ptr=claims, ready_ptr=claims[1:], z_ptr=accumulate if zero else idx, Z_N=z_n,
                     Z_TOTAL=z_total, stride_xm=stride_xm, FUSED=True, GATED=gated, SLOTS=nsel * groups,
                     PROGRAMS=programs, ZERO=zero, CHUNK=min(seg_k, 512))
    else:
        fused = {}
        _compact_kernel[(groups, nsel)](
            xp, gp, tp, mp, idx, val, count, accumulate if zero else idx, b, k, z_n, z_total, *strides[:4],
            stride_xm, eps, NORM=flags["NORM"], NORM_BLOCK=flags["NORM_BLOCK"], HAS_SHIFT=flags["HAS_SHIFT"],
            NM_N=flags["NM_N"], NM_M=flags["NM_M"], GATED=gated, GROUPS=groups, BLOCK_B=val_b, SEG_K=seg_k,
            ZERO=zero, Z_BLOCK=1024, num_warps=4, **xsel, **zc, **pdl_args(x.device))
    compiled = _gather_kernel[(tiles_n, groups, grid_m)](
        *ptrs, ws, cnt, idx, val, count, b, k, n, n0, n1, *strides, eps, **flags,
        GROUPS=groups, GROUPS_P2=triton.next_power_of_2(groups), SPLIT=split,
        USE_DOT=use_dot, IEEE=wt.dtype == torch.float32, VAL_B=val_b, DEPTH=cfg.depth, ACCUM=accum,
        BLOCK_B=block_b, SEG_K=seg_k, BLOCK_K=block_k, BLOCK_N=block_n, EAGER=cfg.eager, **fused, **routed,
        **lists_out,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x.device),
    )
    kind = "gather_kernel" if accumulate is None else "gather_experts" if experts is not None else "gather_accumulate"
    record_compiled(kind, compiled, k, n, w2 is not None)
    return y if accumulate is None else accumulate


# ---------------------------------------------------------------------------------------------- producer lists
@dataclass(frozen=True)
class ActiveLists:
    """The compacted active-row lists of one op's input at batch 1, in the layout the walk reads: list `slot` (the
    input channels [slot·seg, (slot + 1)·seg)) holds its kept channels' indices at idx[slot·seg:][:count[slot]] and
    their selected values at val[slot·seg:][:count[slot]], in any order.

    Written by the op that produces the input (`decode_attention(lists=)`: o's input, one list per kv head) or by
    the compaction pass (`compact_lists`), and read by `gather_lists`, so the walk's own compaction launch goes."""

    idx: torch.Tensor  # int32 [K]
    val: torch.Tensor  # float32 [K]
    count: torch.Tensor  # int32 [K / seg]
    seg: int

    @property
    def k(self) -> int:
        return self.idx.numel()


def active_lists(k: int, seg: int, device) -> ActiveLists:
    """Allocate the lists of a K-channel input in slots of `seg` channels (a divisor of K, ≥ 16)."""
    if seg < 16 or k % seg:
        raise ValueError(f"seg must be ≥ 16 and divide K={k}, got {seg}")
    return ActiveLists(torch.empty(k, dtype=torch.int32, device=device),
                       torch.empty(k, dtype=torch.float32, device=device),
                       torch.empty(k // seg, dtype=torch.int32, device=device), seg)


def check_lists(lists: ActiveLists, k: int, device) -> None:
    """Raise ValueError unless `lists` is an ActiveLists of a K-channel input on `device`."""
    if not isinstance(lists, ActiveLists):
        raise ValueError(f"lists must be an ActiveLists (kernels.active_lists), got {type(lists).__name__}")
    if lists.k != k or lists.idx.device != device:
        raise ValueError(f"lists are for {lists.k} channels on {lists.idx.device}; this op's input has {k} on "
                         f"{device}")
    parts = ((lists.idx, torch.int32, k), (lists.val, torch.float32, k), (lists.count, torch.int32, k // lists.seg))
    if (lists.seg < 16 or k % lists.seg
            or any(t.dtype != dt or t.numel() != n or t.device != device or not t.is_contiguous()
                   for t, dt, n in parts)):
        raise ValueError(f"lists must be active_lists({k}, seg, {device}): int32 indices and float32 values [K], "
                         f"int32 counts [K / seg], seg ≥ 16 dividing K; got seg {lists.seg}, "
                         + ", ".join(f"{t.dtype} {tuple(t.shape)} on {t.device}" for t, _, _ in parts))


@torch.library.custom_op("actsparse::compact_lists", mutates_args=("idx", "val", "count"))
def _compact_lists_op(x: torch.Tensor, thresh: torch.Tensor, shift: Optional[torch.Tensor], idx: torch.Tensor,
                      val: torch.Tensor, count: torch.Tensor, seg: int, nm_n: int, nm_m: int) -> None:
    k = x.shape[1]
    _compact_kernel[(k // seg, 1)](
        x, x, thresh, shift if shift is not None else thresh, idx, val, count, idx, 1, k, 0, 0, x.stride(0),
        thresh.stride(0), thresh.stride(1), shift.stride(0) if shift is not None else 0, 0, 1e-6, NORM=False,
        NORM_BLOCK=16, HAS_SHIFT=shift is not None, NM_N=nm_n, NM_M=max(nm_m, 1), GATED=0, GROUPS=k // seg,
        BLOCK_B=1, SEG_K=seg, ZERO=False, Z_BLOCK=16, CHUNK=min(seg & -seg, 1024), num_warps=4,
        **pdl_args(x.device))


@torch.library.custom_op("actsparse::gather_lists", mutates_args=("acc",))
def _gather_lists_op(idx: torch.Tensor, val: torch.Tensor, count: torch.Tensor, wt: torch.Tensor,
                     bias: Optional[torch.Tensor], acc: torch.Tensor, seg: int) -> None:
    k, n = wt.shape
    _, cfg = choose_impl("gemv", k, n, 1, "gather", accum=True)
    groups = k // seg
    block_n = cfg.block_n
    block_k = min(cfg.block_k, 1 << (seg.bit_length() - 1))  # a power of two within a list
    # x, the norm weight and the selection's operands are never read (the lists are selected): acc stands in
    compiled = _gather_kernel[(triton.cdiv(n, block_n), groups, 1)](
        acc, acc, acc, acc, wt, wt, bias if bias is not None else acc, acc, acc, acc, acc, idx, val, count,
        1, k, n, n, n, acc.stride(0), 0, 0, 0, wt.stride(0), 0, 0, acc.stride(0), 1e-6,
        NORM=False, NORM_BLOCK=16, HAS_SHIFT=False, PAIR=False, HAS_BIAS=bias is not None, HAS_RES=False, ACT=0,
        NM_N=0, NM_M=1, GROUPS=groups, GROUPS_P2=triton.next_power_of_2(groups), SPLIT=False, USE_DOT=False,
        IEEE=wt.dtype == torch.float32, VAL_B=1, DEPTH=cfg.depth, ACCUM=3 if groups > 1 else 2, BLOCK_B=1,
        SEG_K=seg, BLOCK_K=block_k, BLOCK_N=block_n, EAGER=cfg.eager, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl_args(wt.device))
    record_compiled("gather_lists", compiled, k, n, False)
