"""The masked split-K walk: y = W·(x ⊙ 1[|x − m| > t]) (+ bias, act, residual), one launch, any batch.

Weights are stored transposed, W^T of shape [K, N] row-major (or packed, `pack_weight`), so an input channel
k that is skipped skips one contiguous row of N weights. A program owns a strip of BLOCK_N output columns
and a slice of the K range (split-K); it loads only the rows whose channel some token of the batch keeps
(the union) and zeroes each token's own inactive entries, so the result is exactly W·x_s per token.
Predicated-off rows issue no memory traffic.

Why split-K: decode is one memory latency per K chunk per program, so a program that walked all of K would
be latency-bound. Splitting K until ~8 programs per SM are in flight turns latency into bandwidth. Partial
sums go to a workspace; the last program of each tile (elected by one counter increment per program, the
counter reset by that last program) adds them in a fixed order, a few partials per load, and runs the
epilogue. So: no zeroing launch, no atomics on data, deterministic results. The next chunk's selection is
computed while the current chunk's weights are in flight; with `depth=2` two weight tiles are in flight.

`MaskedConfig(atomic=True)` sums the partials instead with fp32 atomic adds into per-device accumulators
(`configs.atomic_accumulator`) that L2 reduces as they arrive; the last program of a tile reads the sum, zeroes
it for the next launch and runs the epilogue. Still one launch and no zeroing launch, and one load instead of
`split` for the last program, at the price of an arrival-order-dependent fp32 rounding (TEAL's kernel adds its
partials the same way, in fp16, after a zeroing launch).

One chunk a program (split-K = K / BLOCK_K) is TEAL's one-shot tile design; on the H200 it lost to the gather
walk by 1.6x at 50% sparsity (BENCHMARKS.md), so `impl="auto"` runs this kernel only where gather cannot:
batches over 4, packed weights, an already-selected input (thresh=None) and a selected output (out_thresh).

Fused options (all compile-time): RMSNorm of x in the prologue (NORM), up to three column segments with their
own threshold/shift (fused q/k/v), a second weight matrix sharing the read of x with output
act(W1·x_s1) ⊙ (W2·x_s2) (PAIR: gate/up), bias (SCAP folds W·m into it), act (silu or gelu-tanh), residual,
N:M selection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import FMA_MAX_BATCH, MAX_ACC, MaskedConfig, choose_split, new_output, record_compiled
from .gemv_common import (accumulate, epilogue, fit_block_n, launch_args, out_dtype, row_rstd, sel_operands,
                          selected, split_workspace, wshape)
from .pdl import pdl_args, pdl_prologue


@triton.jit
def _raw_chunk(x_rows, g_ptr, t_row, m_row, t_row2, m_row2, offs_k, mask_k, mask_b, stride_tk,
               NORM: tl.constexpr, HAS_SHIFT: tl.constexpr, PAIR: tl.constexpr, NM_N: tl.constexpr,
               PRESEL: tl.constexpr):
    """Issue the loads of one K chunk's selection operands (x, norm weight, thresholds, shifts; with PRESEL
    only the already-selected x_s); nothing waits on them."""
    xv = tl.load(x_rows + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0,
                 eviction_policy="evict_last")
    xv2 = xv
    gv = tl.zeros(offs_k.shape, dtype=tl.float32)
    t = tl.zeros(offs_k.shape, dtype=tl.float32)
    m = t
    if not PRESEL:  # (with PRESEL both matrices of a pair read the one selected x)
        if NORM:
            gv = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        t, m = sel_operands(t_row, m_row, offs_k, mask_k, stride_tk, HAS_SHIFT, NM_N)
    t2, m2 = t, m
    if PAIR and not PRESEL:
        t2, m2 = sel_operands(t_row2, m_row2, offs_k, mask_k, stride_tk, HAS_SHIFT, NM_N)
    return xv, xv2, gv, t, m, t2, m2


@triton.jit
def _presel(xv, mask_k, mask_b):
    """An already-selected chunk: x_s in fp32 and the rows some token keeps (x_s ≠ 0)."""
    keep = (xv != 0) & mask_b[:, None] & mask_k[None, :]
    return xv.to(tl.float32), tl.max(keep.to(tl.int32), axis=0).to(tl.int8)


@triton.jit
def _sel_chunk(xv, xv2, gv, t, m, t2, m2, rstd, mask_k, mask_b,
               NORM: tl.constexpr, HAS_SHIFT: tl.constexpr, PAIR: tl.constexpr, NM_N: tl.constexpr,
               NM_M: tl.constexpr, PRESEL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Normalise and select a chunk whose operands `_raw_chunk` loaded (for both matrices of a pair)."""
    if PRESEL:
        xs, rows = _presel(xv, mask_k, mask_b)
        xs2, rows2 = xs, rows
        if PAIR:
            xs2, rows2 = _presel(xv2, mask_k, mask_b)
    else:
        xv = xv.to(tl.float32)
        if NORM:
            xv = xv * rstd[:, None] * gv[None, :]
        xs, rows = selected(xv, t, m, mask_k, mask_b, HAS_SHIFT, NM_N, NM_M, BLOCK_B, BLOCK_K)
        xs2 = xs
        rows2 = rows
        if PAIR:
            xs2, rows2 = selected(xv, t2, m2, mask_k, mask_b, HAS_SHIFT, NM_N, NM_M, BLOCK_B, BLOCK_K)
    return xs, rows, xs2, rows2


@triton.jit
def _chunk(x_rows, g_ptr, rstd, t_row, m_row, t_row2, m_row2, offs_k, mask_k, mask_b, stride_tk,
           NORM: tl.constexpr, HAS_SHIFT: tl.constexpr, PAIR: tl.constexpr, NM_N: tl.constexpr,
           NM_M: tl.constexpr, PRESEL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Load, normalise and select one K chunk of x for both matrices of a pair (or one)."""
    xv, xv2, gv, t, m, t2, m2 = _raw_chunk(x_rows, g_ptr, t_row, m_row, t_row2, m_row2, offs_k, mask_k,
                                           mask_b, stride_tk, NORM, HAS_SHIFT, PAIR, NM_N, PRESEL)
    return _sel_chunk(xv, xv2, gv, t, m, t2, m2, rstd, mask_k, mask_b, NORM, HAS_SHIFT, PAIR, NM_N, NM_M, PRESEL,
                      BLOCK_B, BLOCK_K)


@triton.jit
def _weights(w_ptr, w2_ptr, offs_k, offs_n, mask_n, rows, rows2, stride_wk, PAIR: tl.constexpr):
    """Request the kept rows of one K chunk of the strip (of both matrices of a pair); skipped rows cost no traffic."""
    w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :],
                mask=(rows[:, None] != 0) & mask_n[None, :], other=0.0, eviction_policy="evict_first")
    w2 = w
    if PAIR:
        w2 = tl.load(w2_ptr + offs_k[:, None] * stride_wk + offs_n[None, :],
                     mask=(rows2[:, None] != 0) & mask_n[None, :], other=0.0, eviction_policy="evict_first")
    return w, w2


@triton.jit
def _acc(acc, xs, w, USE_DOT: tl.constexpr, IEEE: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """acc += x_s @ w. A program of one K chunk reduces it at once (acc [B, N]): a [B, K, N] accumulator kept
    for one step only costs registers (at 64 rows × 128 columns and 2 warps it spilled)."""
    # One return: Triton's compiler (not its interpreter) types every return of a function, pruned or not.
    if ONE_CHUNK and not USE_DOT:
        acc = acc + tl.sum(xs[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    else:
        acc = accumulate(acc, xs, w, USE_DOT, IEEE)
    return acc


@triton.jit
def _masked_gemv_kernel(
    x_ptr, g_ptr, t_ptr, m_ptr, w_ptr, w2_ptr, bias_ptr, res_ptr, y_ptr, ws_ptr, cnt_ptr, to_ptr, mo_ptr,
    B, K, N, N0, N1, K_SPLIT,
    stride_xb, stride_ts, stride_tk, stride_ms, stride_wk, stride_bs, stride_rb, stride_yb, stride_to,
    stride_wp, eps,
    PRESEL: tl.constexpr, OUT_SEL: tl.constexpr, OUT_SHIFT: tl.constexpr, PACK_W: tl.constexpr,
    NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr, PAIR: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr, DEPTH: tl.constexpr, RED: tl.constexpr,
    ATOMIC: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    mask_out = mask_b[:, None] & mask_n[None, :]
    ar_k = tl.arange(0, BLOCK_K)
    # The strip lies inside one segment (the launcher makes BLOCK_N divide the boundaries).
    n_start = pid_n * BLOCK_N
    seg = (n_start >= N0).to(tl.int32) + (n_start >= N1).to(tl.int32)
    x_rows = x_ptr + offs_b[:, None] * stride_xb
    if PACK_W > 0:
        # Packed weights [N / PACK_W, K, PACK_W]: column n of row k at (n // PACK_W)·stride_wp + k·PACK_W + n % PACK_W.
        # The strip lies in one pack; shift the base so that `base + k·stride_wk + n` addresses it. The shift,
        # pack·(stride_wp − PACK_W), is a multiple of PACK_W ≥ 16: say so, or the loads lose their 16-byte width.
        w_shift = tl.multiple_of((n_start // PACK_W) * (stride_wp - PACK_W), 16)
        w_ptr += w_shift
        w2_ptr += w_shift

    t_row = t_ptr + seg * stride_ts
    m_row = m_ptr + seg * stride_ms
    t_row2 = t_ptr + stride_ts
    m_row2 = m_ptr + stride_ms
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    offs_k = k_lo + ar_k
    # The first chunk's operands are requested before the row norms, so both L2 round trips overlap.
    xv_0, xv2_0, gv_0, t_0, m_0, t2_0, m2_0 = _raw_chunk(x_rows, g_ptr, t_row, m_row, t_row2, m_row2, offs_k,
                                                         offs_k < k_hi, mask_b, stride_tk, NORM, HAS_SHIFT, PAIR, NM_N,
                                                         PRESEL)
    rstd = tl.zeros([BLOCK_B], dtype=tl.float32)
    if NORM:  # every program needs the row norms
        rstd = row_rstd(x_rows, mask_b, K, eps, NORM_BLOCK, BLOCK_B)

    if USE_DOT or ONE_CHUNK:
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_B, BLOCK_K, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_B, BLOCK_K, BLOCK_N], dtype=tl.float32)

    xs, rows, xs2, rows2 = _sel_chunk(xv_0, xv2_0, gv_0, t_0, m_0, t2_0, m2_0, rstd, offs_k < k_hi, mask_b, NORM,
                                      HAS_SHIFT, PAIR, NM_N, NM_M, PRESEL, BLOCK_B, BLOCK_K)
    if DEPTH == 1:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + ar_k
            w, w2 = _weights(w_ptr, w2_ptr, offs_k, offs_n, mask_n, rows, rows2, stride_wk, PAIR)
            # Select the next chunk while this chunk's weight rows are in flight.
            nxt = offs_k + BLOCK_K
            xs_n, rows_n, xs2_n, rows2_n = _chunk(x_rows, g_ptr, rstd, t_row, m_row, t_row2, m_row2, nxt,
                                                  nxt < k_hi, mask_b, stride_tk, NORM, HAS_SHIFT, PAIR, NM_N, NM_M,
                                                  PRESEL, BLOCK_B, BLOCK_K)
            acc = _acc(acc, xs, w, USE_DOT, IEEE, ONE_CHUNK)
            if PAIR:
                acc2 = _acc(acc2, xs2, w2, USE_DOT, IEEE, ONE_CHUNK)
            xs, rows, xs2, rows2 = xs_n, rows_n, xs2_n, rows2_n
    else:
        # Nothing is used in the step that requests it: step i uses chunk i's weight tile (requested one
        # step earlier), requests chunk i+1's tile (its selection computed now from operands loaded one
        # step earlier) and chunk i+2's selection operands. So two weight tiles and one x chunk are in
        # flight while a step computes, and the x -> mask -> weight chain is off the critical path. A
        # chunk past the slice selects nothing, so its loads are predicated off.
        w, w2 = _weights(w_ptr, w2_ptr, offs_k, offs_n, mask_n, rows, rows2, stride_wk, PAIR)
        nxt = offs_k + BLOCK_K
        xv_1, xv2_1, gv_1, t_1, m_1, t2_1, m2_1 = _raw_chunk(x_rows, g_ptr, t_row, m_row, t_row2, m_row2, nxt,
                                                             nxt < k_hi, mask_b, stride_tk, NORM, HAS_SHIFT, PAIR, NM_N,
                                                             PRESEL)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            nxt = k0 + BLOCK_K + ar_k
            xs_1, rows_1, xs2_1, rows2_1 = _sel_chunk(xv_1, xv2_1, gv_1, t_1, m_1, t2_1, m2_1, rstd, nxt < k_hi,
                                                      mask_b, NORM, HAS_SHIFT, PAIR, NM_N, NM_M, PRESEL, BLOCK_B,
                                                      BLOCK_K)
            w_1, w2_1 = _weights(w_ptr, w2_ptr, nxt, offs_n, mask_n, rows_1, rows2_1, stride_wk, PAIR)
            nxt2 = nxt + BLOCK_K
            xv_1, xv2_1, gv_1, t_1, m_1, t2_1, m2_1 = _raw_chunk(x_rows, g_ptr, t_row, m_row, t_row2, m_row2,
                                                                 nxt2, nxt2 < k_hi, mask_b, stride_tk, NORM, HAS_SHIFT,
                                                                 PAIR, NM_N, PRESEL)
            acc = _acc(acc, xs, w, USE_DOT, IEEE, ONE_CHUNK)
            if PAIR:
                acc2 = _acc(acc2, xs2, w2, USE_DOT, IEEE, ONE_CHUNK)
            xs, xs2, w, w2 = xs_1, xs2_1, w_1, w2_1

    if USE_DOT or ONE_CHUNK:
        out = acc
        out2 = acc2
    else:
        out = tl.sum(acc, axis=1)
        out2 = tl.sum(acc2, axis=1)

    if SPLIT:
        n_split = tl.num_programs(1)
        NACC = 1 + PAIR  # accumulators per program
        ws_tile = offs_b[:, None] * N + offs_n[None, :]
        if ATOMIC:
            tl.atomic_add(ws_ptr + ws_tile, out, mask=mask_out, sem="relaxed")
            if PAIR:
                tl.atomic_add(ws_ptr + B * N + ws_tile, out2, mask=mask_out, sem="relaxed")
        else:
            tl.store(ws_ptr + (pid_k * NACC) * B * N + ws_tile, out, mask=mask_out)
            if PAIR:
                tl.store(ws_ptr + (pid_k * NACC + 1) * B * N + ws_tile, out2, mask=mask_out)
        tl.debug_barrier()  # all of this program's partials are written before it signals
        tile = pid_b * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == n_split - 1:
            tl.store(cnt_ptr + tile, 0)  # ready for the next launch: no zeroing launch ever
            if ATOMIC:  # the sums, then zeroes in their place for the next launch
                out = tl.load(ws_ptr + ws_tile, mask=mask_out, other=0.0, cache_modifier=".cg")
                tl.store(ws_ptr + ws_tile, tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32), mask=mask_out)
                if PAIR:
                    out2 = tl.load(ws_ptr + B * N + ws_tile, mask=mask_out, other=0.0, cache_modifier=".cg")
                    tl.store(ws_ptr + B * N + ws_tile, tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32),
                             mask=mask_out)
            else:
                # RED partials per load, summed in a fixed order: the result does not depend on arrival order,
                # and a tile of one-shot programs (dozens of partials) costs a few L2 round trips, not one each.
                rs = tl.arange(0, RED)
                out = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
                out2 = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
                for s0 in range(0, n_split, RED):
                    part = ((s0 + rs) * NACC)[:, None, None] * B * N + ws_tile[None, :, :]
                    pm = ((s0 + rs) < n_split)[:, None, None] & mask_out[None, :, :]
                    out += tl.sum(tl.load(ws_ptr + part, mask=pm, other=0.0, cache_modifier=".cg"), axis=0)
                    if PAIR:
                        out2 += tl.sum(tl.load(ws_ptr + part + B * N, mask=pm, other=0.0, cache_modifier=".cg"),
                                       axis=0)
            epilogue(out, out2, bias_ptr, stride_bs, res_ptr, stride_rb, y_ptr, stride_yb, offs_b, offs_n, mask_n,
                      mask_out, HAS_BIAS, PAIR, ACT, HAS_RES, to_ptr, mo_ptr, stride_to, OUT_SEL, OUT_SHIFT)
    else:
        epilogue(out, out2, bias_ptr, stride_bs, res_ptr, stride_rb, y_ptr, stride_yb, offs_b, offs_n, mask_n,
                  mask_out, HAS_BIAS, PAIR, ACT, HAS_RES, to_ptr, mo_ptr, stride_to, OUT_SEL, OUT_SHIFT)


def _reduce_width(split: int, tile: int, num_warps: int) -> int:
    """Partials the last program of a tile loads at once: all of them, within ~32 fp32 registers a thread."""
    red = triton.next_power_of_2(max(split, 1))
    while red > 1 and red * tile > 32 * 32 * num_warps:
        red //= 2
    return red


def launch_masked(x, wt, w2, thresh, shift, bias, residual, norm_weight, eps, act, bounds, nm_n, nm_m,
                  cfg: MaskedConfig, out_thresh=None, out_shift=None) -> torch.Tensor:
    """Run the masked walk (arguments validated by the public ops); return y [B, N]. thresh None: x is already
    selected (its zeros are skipped); out_thresh / out_shift: float32 [N] selection of the output for the next op."""
    b, k = x.shape
    n = wshape(wt)[1]
    presel = thresh is None
    if presel:
        thresh, shift, norm_weight, nm_n, nm_m = None, None, None, 0, 0
    use_dot = cfg.use_dot or b > FMA_MAX_BATCH
    block_b = 16 if use_dot else triton.next_power_of_2(b)
    block_n = cfg.block_n if wt.dim() == 2 else min(cfg.block_n, wt.shape[2])  # a strip lies in one pack
    block_n = fit_block_n(block_n, bounds) if bounds else block_n
    block_k = cfg.block_k
    if nm_n > 0 and block_k % nm_m:
        block_k = max(nm_m, block_k // nm_m * nm_m)
    tiles_n, tiles_b = triton.cdiv(n, block_n), triton.cdiv(b, block_b)
    split = choose_split(cfg, k, tiles_n * tiles_b, x.device)
    k_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_split)
    y = new_output((b, n), x.device, out_dtype(wt, residual))
    nacc = 2 if w2 is not None else 1
    atomic = cfg.atomic and split > 1 and nacc * b * n <= MAX_ACC   # else the ordered sum (a larger launch)
    ws, cnt = split_workspace(split, nacc, b, n, tiles_n * tiles_b, y, atomic)
    ptrs, (n0, n1), strides, flags = launch_args(x, wt, w2, y if presel else thresh, shift, bias, residual,
                                                  norm_weight, act, bounds, nm_n, nm_m, y, block_b)
    compiled = _masked_gemv_kernel[(tiles_n, split, tiles_b)](
        *ptrs, ws, cnt, out_thresh if out_thresh is not None else y, out_shift if out_shift is not None else y,
        b, k, n, n0, n1, k_split, *strides, out_thresh.stride(0) if out_thresh is not None else 0,
        wt.stride(0) if wt.dim() == 3 else 0, eps, PRESEL=presel, OUT_SEL=out_thresh is not None,
        OUT_SHIFT=out_shift is not None, PACK_W=wt.shape[2] if wt.dim() == 3 else 0, **flags,
        USE_DOT=use_dot, IEEE=wt.dtype == torch.float32, SPLIT=split > 1, DEPTH=cfg.depth,
        RED=_reduce_width(split, block_b * block_n * nacc, cfg.num_warps), ATOMIC=atomic,
        ONE_CHUNK=k_split == block_k,
        BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_N=block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x.device),
    )
    record_compiled("masked_gemv_kernel", compiled, k, n, w2 is not None)
    return y
