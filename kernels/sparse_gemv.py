"""Input-sparse GEMV / skinny GEMM: y = W·(x ⊙ 1[|x − m| > t]) (+ bias, act, residual), one launch.

Weights are stored transposed, W^T of shape [K, N] row-major, so an input channel k that is
skipped skips one contiguous row of N weights. A program owns a strip of BLOCK_N output columns
and a slice of the K range (split-K); it loads only the rows whose channel some token of the
batch keeps (the union) and zeroes each token's own inactive entries, so the result is exactly
W·x_s per token. Predicated-off rows issue no memory traffic.

Why split-K: decode is one memory latency per K chunk per program, so a program that walked all
of K would be latency-bound (measured: 0.8 µs a chunk, nearly flat in sparsity). Splitting K
until ~8 programs per SM are in flight turns latency into bandwidth. Partial sums go to a
workspace; the last program of each tile (elected by one counter increment per program, the
counter reset by that last program) adds them in a fixed order and runs the epilogue. So: no
zeroing launch, no atomics on data, deterministic results. The next chunk's selection is
computed while the current chunk's weights are in flight; with `depth=2` nothing is used in the
step that requests it (two weight tiles and the selection operands of the chunk after them in
flight per program).

Fused options (all compile-time):
- NORM: RMSNorm of x (weight g) computed in the prologue, so the residual stream is the input;
- segments: up to three column segments with their own threshold/shift (fused q/k/v);
- PAIR: a second weight matrix sharing the read of x; output silu(W1·x_s1) ⊙ (W2·x_s2) (gate/up);
- bias (SCAP folds W·m into it), silu activation, residual add, N:M selection instead of a threshold.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .configs import (FMA_MAX_BATCH, MAX_TILES, GemvConfig, choose_impl, choose_split, new_output, record_compiled,
                      tile_counters)
from .pdl import launch_kwargs, pdl_prologue


@triton.jit
def _row_rstd(x_rows, mask_b, K, eps, NORM_BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
    """1 / RMS of each batch row of x [BLOCK_B, K] (RMSNorm's factor); x is L2-resident, read in wide loads."""
    ss = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k0 in range(0, K, NORM_BLOCK):
        offs = k0 + tl.arange(0, NORM_BLOCK)
        xv = tl.load(x_rows + offs[None, :], mask=mask_b[:, None] & (offs < K)[None, :], other=0.0)
        xv = xv.to(tl.float32)
        ss += tl.sum(xv * xv, axis=1)
    return tl.rsqrt(ss / K + eps)


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
def _keep(x, t, m, mask_k, mask_b, HAS_SHIFT: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr,
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
def _sel_operands(t_row, m_row, offs_k, mask_k, stride_tk, HAS_SHIFT: tl.constexpr, NM_N: tl.constexpr):
    """Load one K chunk's threshold and shift (zeros for the unused one)."""
    m = tl.zeros(offs_k.shape, dtype=tl.float32)
    t = tl.zeros(offs_k.shape, dtype=tl.float32)
    if HAS_SHIFT:
        m = tl.load(m_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    if NM_N == 0:
        t = tl.load(t_row + offs_k * stride_tk, mask=mask_k, other=0.0)
    return t, m


@triton.jit
def _select(x, t_row, m_row, offs_k, mask_k, mask_b, stride_tk,
            HAS_SHIFT: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr,
            BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sparsified input chunk x_s [BLOCK_B, BLOCK_K] (fp32) and the batch-union row mask [BLOCK_K]."""
    t, m = _sel_operands(t_row, m_row, offs_k, mask_k, stride_tk, HAS_SHIFT, NM_N)
    return _keep(x, t, m, mask_k, mask_b, HAS_SHIFT, NM_N, NM_M, BLOCK_B, BLOCK_K)


@triton.jit
def _raw_chunk(x_rows, x_rows2, g_ptr, t_row, m_row, t_row2, m_row2, offs_k, mask_k, mask_b, stride_tk,
               NORM: tl.constexpr, HAS_SHIFT: tl.constexpr, PAIR: tl.constexpr, NM_N: tl.constexpr,
               PRESEL: tl.constexpr):
    """Issue the loads of one K chunk's selection operands (x, norm weight, thresholds, shifts; with PRESEL
    only the already-selected x_s of each matrix); nothing waits on them."""
    xv = tl.load(x_rows + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0,
                 eviction_policy="evict_last")
    xv2 = xv
    gv = tl.zeros(offs_k.shape, dtype=tl.float32)
    t = tl.zeros(offs_k.shape, dtype=tl.float32)
    m = t
    if PRESEL:
        if PAIR:
            xv2 = tl.load(x_rows2 + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0,
                          eviction_policy="evict_last")
    else:
        if NORM:
            gv = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        t, m = _sel_operands(t_row, m_row, offs_k, mask_k, stride_tk, HAS_SHIFT, NM_N)
    t2, m2 = t, m
    if PAIR and not PRESEL:
        t2, m2 = _sel_operands(t_row2, m_row2, offs_k, mask_k, stride_tk, HAS_SHIFT, NM_N)
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
        xs, rows = _keep(xv, t, m, mask_k, mask_b, HAS_SHIFT, NM_N, NM_M, BLOCK_B, BLOCK_K)
        xs2 = xs
        rows2 = rows
        if PAIR:
            xs2, rows2 = _keep(xv, t2, m2, mask_k, mask_b, HAS_SHIFT, NM_N, NM_M, BLOCK_B, BLOCK_K)
    return xs, rows, xs2, rows2


@triton.jit
def _chunk(x_rows, x_rows2, g_ptr, rstd, t_row, m_row, t_row2, m_row2, offs_k, mask_k, mask_b, stride_tk,
           NORM: tl.constexpr, HAS_SHIFT: tl.constexpr, PAIR: tl.constexpr, NM_N: tl.constexpr,
           NM_M: tl.constexpr, PRESEL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Load, normalise and select one K chunk of x for both matrices of a pair (or one)."""
    xv, xv2, gv, t, m, t2, m2 = _raw_chunk(x_rows, x_rows2, g_ptr, t_row, m_row, t_row2, m_row2, offs_k, mask_k,
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
def _accumulate(acc, xs, w, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
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


@triton.jit
def _epilogue(out, out2, bias_ptr, stride_bs, res_ptr, stride_rb, y_ptr, stride_yb, offs_b, offs_n, mask_n,
              mask_out, HAS_BIAS: tl.constexpr, PAIR: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
              to_ptr, mo_ptr, stride_to, OUT_SEL: tl.constexpr, OUT_SHIFT: tl.constexpr):
    """bias, silu / silu·up, residual, the consumer's selection (OUT_SEL: y = (y − m)⊙1[|y − m| > t] per
    column, so the next GEMV reads its input already selected), cast and store of one [BLOCK_B, BLOCK_N] tile."""
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if PAIR:
        if HAS_BIAS:
            out2 += tl.load(bias_ptr + stride_bs + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out * tl.sigmoid(out) * out2
    elif ACT == 1:
        out = out * tl.sigmoid(out)
    if HAS_RES:
        res = tl.load(res_ptr + offs_b[:, None] * stride_rb + offs_n[None, :], mask=mask_out, other=0.0)
        out += res.to(tl.float32)
    if OUT_SEL:
        if OUT_SHIFT:
            out -= tl.load(mo_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        t_out = tl.load(to_ptr + offs_n * stride_to, mask=mask_n, other=0.0)
        out = tl.where(tl.abs(out) > t_out[None, :], out, 0.0)
    tl.store(y_ptr + offs_b[:, None] * stride_yb + offs_n[None, :], out.to(y_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, g_ptr, t_ptr, m_ptr, w_ptr, w2_ptr, bias_ptr, res_ptr, y_ptr, ws_ptr, cnt_ptr, to_ptr, mo_ptr,
    B, K, N, N0, N1, K_SPLIT,
    stride_xb, stride_ts, stride_tk, stride_ms, stride_wk, stride_bs, stride_rb, stride_yb, stride_xs, stride_to,
    stride_wp, eps,
    PRESEL: tl.constexpr, OUT_SEL: tl.constexpr, OUT_SHIFT: tl.constexpr, PACK_W: tl.constexpr,
    NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr, PAIR: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr, DEPTH: tl.constexpr, RED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
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
    # x [S, B, K]: with PRESEL one selected copy per segment (q / k / v, or gate / up), else stride_xs = 0.
    x_rows = x_ptr + seg * stride_xs + offs_b[:, None] * stride_xb
    x_rows2 = x_ptr + stride_xs + offs_b[:, None] * stride_xb
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
    xv_0, xv2_0, gv_0, t_0, m_0, t2_0, m2_0 = _raw_chunk(x_rows, x_rows2, g_ptr, t_row, m_row, t_row2, m_row2, offs_k,
                                                         offs_k < k_hi, mask_b, stride_tk, NORM, HAS_SHIFT, PAIR, NM_N,
                                                         PRESEL)
    rstd = tl.zeros([BLOCK_B], dtype=tl.float32)
    if NORM:  # every program needs the row norms
        rstd = _row_rstd(x_rows, mask_b, K, eps, NORM_BLOCK, BLOCK_B)

    if USE_DOT:
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
            xs_n, rows_n, xs2_n, rows2_n = _chunk(x_rows, x_rows2, g_ptr, rstd, t_row, m_row, t_row2, m_row2, nxt,
                                                  nxt < k_hi, mask_b, stride_tk, NORM, HAS_SHIFT, PAIR, NM_N, NM_M,
                                                  PRESEL, BLOCK_B, BLOCK_K)
            acc = _accumulate(acc, xs, w, USE_DOT, IEEE)
            if PAIR:
                acc2 = _accumulate(acc2, xs2, w2, USE_DOT, IEEE)
            xs, rows, xs2, rows2 = xs_n, rows_n, xs2_n, rows2_n
    else:
        # Nothing is used in the step that requests it: step i uses chunk i's weight tile (requested one
        # step earlier), requests chunk i+1's tile (its selection computed now from operands loaded one
        # step earlier) and chunk i+2's selection operands. So two weight tiles and one x chunk are in
        # flight while a step computes, and the x -> mask -> weight chain is off the critical path. A
        # chunk past the slice selects nothing, so its loads are predicated off.
        w, w2 = _weights(w_ptr, w2_ptr, offs_k, offs_n, mask_n, rows, rows2, stride_wk, PAIR)
        nxt = offs_k + BLOCK_K
        xv_1, xv2_1, gv_1, t_1, m_1, t2_1, m2_1 = _raw_chunk(x_rows, x_rows2, g_ptr, t_row, m_row, t_row2, m_row2, nxt,
                                                             nxt < k_hi, mask_b, stride_tk, NORM, HAS_SHIFT, PAIR, NM_N,
                                                             PRESEL)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            nxt = k0 + BLOCK_K + ar_k
            xs_1, rows_1, xs2_1, rows2_1 = _sel_chunk(xv_1, xv2_1, gv_1, t_1, m_1, t2_1, m2_1, rstd, nxt < k_hi,
                                                      mask_b, NORM, HAS_SHIFT, PAIR, NM_N, NM_M, PRESEL, BLOCK_B,
                                                      BLOCK_K)
            w_1, w2_1 = _weights(w_ptr, w2_ptr, nxt, offs_n, mask_n, rows_1, rows2_1, stride_wk, PAIR)
            nxt2 = nxt + BLOCK_K
            xv_1, xv2_1, gv_1, t_1, m_1, t2_1, m2_1 = _raw_chunk(x_rows, x_rows2, g_ptr, t_row, m_row, t_row2, m_row2,
                                                                 nxt2, nxt2 < k_hi, mask_b, stride_tk, NORM, HAS_SHIFT,
                                                                 PAIR, NM_N, PRESEL)
            acc = _accumulate(acc, xs, w, USE_DOT, IEEE)
            if PAIR:
                acc2 = _accumulate(acc2, xs2, w2, USE_DOT, IEEE)
            xs, xs2, w, w2 = xs_1, xs2_1, w_1, w2_1

    if USE_DOT:
        out = acc
        out2 = acc2
    else:
        out = tl.sum(acc, axis=1)
        out2 = tl.sum(acc2, axis=1)

    if SPLIT:
        n_split = tl.num_programs(1)
        NACC = 1 + PAIR  # accumulators per program
        ws_tile = offs_b[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + (pid_k * NACC) * B * N + ws_tile, out, mask=mask_out)
        if PAIR:
            tl.store(ws_ptr + (pid_k * NACC + 1) * B * N + ws_tile, out2, mask=mask_out)
        tl.debug_barrier()  # all of this program's partials are written before it signals
        tile = pid_b * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == n_split - 1:
            tl.store(cnt_ptr + tile, 0)  # ready for the next launch: no zeroing launch ever
            # RED partials per load, summed in a fixed order: the result does not depend on arrival order, and
            # a tile of one-shot programs (dozens of partials) costs a few L2 round trips, not one per partial.
            rs = tl.arange(0, RED)
            out = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
            out2 = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
            for s0 in range(0, n_split, RED):
                part = ((s0 + rs) * NACC)[:, None, None] * B * N + ws_tile[None, :, :]
                pm = ((s0 + rs) < n_split)[:, None, None] & mask_out[None, :, :]
                out += tl.sum(tl.load(ws_ptr + part, mask=pm, other=0.0, cache_modifier=".cg"), axis=0)
                if PAIR:
                    out2 += tl.sum(tl.load(ws_ptr + part + B * N, mask=pm, other=0.0, cache_modifier=".cg"), axis=0)
            _epilogue(out, out2, bias_ptr, stride_bs, res_ptr, stride_rb, y_ptr, stride_yb, offs_b, offs_n, mask_n,
                      mask_out, HAS_BIAS, PAIR, ACT, HAS_RES, to_ptr, mo_ptr, stride_to, OUT_SEL, OUT_SHIFT)
    else:
        _epilogue(out, out2, bias_ptr, stride_bs, res_ptr, stride_rb, y_ptr, stride_yb, offs_b, offs_n, mask_n,
                  mask_out, HAS_BIAS, PAIR, ACT, HAS_RES, to_ptr, mo_ptr, stride_to, OUT_SEL, OUT_SHIFT)


ACTS = {"none": 0, "silu": 1}


def _as_rows(t: torch.Tensor, nseg: int, k: int, name: str) -> torch.Tensor:
    """Return `t` as a float32 [nseg, k] view (a [nseg] tensor broadcasts along k with stride 0)."""
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() == 1 and t.shape[0] == nseg:
        t = t[:, None].expand(nseg, k)
    if tuple(t.shape) != (nseg, k):
        raise ValueError(f"{name} must have shape [{nseg}] or [{nseg}, {k}] (one row per segment), "
                         f"got {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}; convert it once when the plan is loaded")
    if t.stride(1) not in (0, 1):
        t = t.contiguous()
    return t


def _check_common(x: torch.Tensor, wt: torch.Tensor, name: str = "wt") -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [batch, in_features], got shape {tuple(x.shape)}")
    if wt.dim() == 3:  # packed [N / W, K, W] (pack_weight)
        if wt.shape[1] != x.shape[1] or not wt.is_contiguous() or wt.shape[2] < 16 or wt.shape[2] & (wt.shape[2] - 1):
            raise ValueError(f"a packed {name} must be contiguous [out_features / W, in_features={x.shape[1]}, W] with "
                             f"W a power of two ≥ 16 (pack_weight), got shape {tuple(wt.shape)}")
    elif wt.dim() != 2 or wt.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be the transposed weight [in_features={x.shape[1]}, out_features], "
                         f"got shape {tuple(wt.shape)}; pass weight.t().contiguous()")
    elif wt.stride(1) != 1:
        raise ValueError(f"{name} must be row-major [in, out] (stride(1) == 1), got strides {wt.stride()}; "
                         "pass weight.t().contiguous()")
    if x.stride(1) != 1:
        raise ValueError(f"x must be contiguous along in_features, got strides {x.stride()}")
    if x.device != wt.device:
        raise ValueError(f"x is on {x.device} but {name} is on {wt.device}")


def wshape(wt: torch.Tensor) -> tuple[int, int]:
    """(in_features K, out_features N) of a transposed weight [K, N] or a packed one [N / W, K, W]."""
    if wt.dim() == 3:
        return wt.shape[1], wt.shape[0] * wt.shape[2]
    return wt.shape[0], wt.shape[1]


def pack_weight(wt: torch.Tensor, width: int = 32) -> torch.Tensor:
    """Return W^T [K, N] repacked as [N / width, K, width]: each strip of `width` output columns is one contiguous
    block, so the kept rows of a strip lie close together in memory (DRAM pages stay open across them)."""
    k, n = wt.shape
    if width < 16 or width & (width - 1) or n % width:
        raise ValueError(f"width must be a power of two ≥ 16 dividing out_features={n}, got {width}")
    return wt.reshape(k, n // width, width).permute(1, 0, 2).contiguous()


def _fit_block_n(block_n: int, bounds: Sequence[int]) -> int:
    """Largest block_n ≤ the configured one that divides every segment boundary (min 16)."""
    while block_n > 16 and any(b % block_n for b in bounds):
        block_n //= 2
    if any(b % block_n for b in bounds):
        raise ValueError(f"segment boundaries {list(bounds)} must be multiples of 16")
    return block_n


def _launch_args(x, wt, w2, thresh, shift, bias, residual, norm_weight, act, bounds, nm_n, nm_m, y, block_b):
    """The arguments every sparse-GEMV kernel (v2, v3, v4) takes alike: the leading pointers (an unused one
    points at y and is never read: its constexpr flag is off), the q/k/v segment boundaries, the strides and
    the feature flags (with the PDL flag and launch option, `pdl.launch_kwargs`)."""
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
                 NM_M=max(nm_m, 1), **launch_kwargs(y.device))
    return ptrs, n01, strides, flags


def _split_workspace(split: int, nacc: int, b: int, n: int, tiles: int,
                     y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 split-K partials [split × nacc, b, n] (nacc: partials per program and column) and the arrival
    counters of `tiles` output tiles; y twice when split == 1 (SPLIT is off and neither is touched)."""
    if split <= 1:
        return y, y
    if tiles > MAX_TILES:
        raise ValueError(f"too many output tiles ({tiles}) for split-K; use a larger block_n")
    return torch.empty(split * nacc * b * n, device=y.device, dtype=torch.float32), tile_counters(y.device)


def _reduce_width(split: int, tile: int, num_warps: int) -> int:
    """Partials the last program of a tile loads at once: all of them, within ~32 fp32 registers a thread."""
    red = triton.next_power_of_2(max(split, 1))
    while red > 1 and red * tile > 32 * 32 * num_warps:
        red //= 2
    return red


def _launch(x, wt, w2, thresh, shift, bias, residual, norm_weight, eps, act, bounds, nm_n, nm_m, kind, impl="auto",
            out_thresh=None, out_shift=None):
    """Run one sparse GEMV (or gate/up pair). thresh None: x is already selected (its zeros are skipped).
    out_thresh / out_shift: float32 [N] selection applied to the output for the next GEMV."""
    b, k = x.shape
    n = wshape(wt)[1]
    presel = thresh is None
    which, cfg = choose_impl(kind, k, n, b, impl, presel=presel, out_sel=out_thresh is not None)
    if wt.dim() == 3 and which in ("v3", "v4", "v6"):
        raise ValueError(f"the {which} kernel reads [K, N] weights, not packed ones; use impl='v5', 'v2' or 'auto'")
    if which in ("v3", "v6"):
        from .sparse_gemv_v3 import launch_v3

        return launch_v3(x, wt, w2, thresh, shift, bias, residual, norm_weight, eps, act, bounds, nm_n, nm_m, cfg,
                         prelist=which == "v6")
    if which == "v4":
        from .sparse_gemv_v4 import launch_v4

        return launch_v4(x, wt, w2, thresh, shift, bias, residual, norm_weight, eps, act, bounds, nm_n, nm_m, cfg)
    cfg: GemvConfig
    stride_xs = 0  # one x for every segment
    if which == "v5" and not presel:
        from .select import select

        xs = select(x, thresh, shift, norm_weight, eps, nm_n, nm_m)  # [S, B, K], one selected copy per segment
        x, stride_xs, presel = xs[0], xs.stride(0), True
    if presel:
        thresh, shift, norm_weight, nm_n, nm_m = None, None, None, 0, 0
    use_dot = cfg.use_dot or b > FMA_MAX_BATCH
    block_b = 16 if use_dot else triton.next_power_of_2(b)
    block_n = cfg.block_n if wt.dim() == 2 else min(cfg.block_n, wt.shape[2])  # a strip lies in one pack
    block_n = _fit_block_n(block_n, bounds) if bounds else block_n
    block_k = cfg.block_k
    if nm_n > 0 and block_k % nm_m:
        block_k = max(nm_m, block_k // nm_m * nm_m)
    tiles_n, tiles_b = triton.cdiv(n, block_n), triton.cdiv(b, block_b)
    split = choose_split(cfg, k, tiles_n * tiles_b, x.device)
    k_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_split)
    y = new_output((b, n), x.device, x.dtype)
    ws, cnt = _split_workspace(split, 2 if w2 is not None else 1, b, n, tiles_n * tiles_b, y)
    ptrs, (n0, n1), strides, flags = _launch_args(x, wt, w2, y if presel else thresh, shift, bias, residual,
                                                  norm_weight, act, bounds, nm_n, nm_m, y, block_b)
    compiled = _sparse_gemv_kernel[(tiles_n, split, tiles_b)](
        *ptrs, ws, cnt, out_thresh if out_thresh is not None else y, out_shift if out_shift is not None else y,
        b, k, n, n0, n1, k_split, *strides, stride_xs, out_thresh.stride(0) if out_thresh is not None else 0,
        wt.stride(0) if wt.dim() == 3 else 0, eps, PRESEL=presel, OUT_SEL=out_thresh is not None,
        OUT_SHIFT=out_shift is not None, PACK_W=wt.shape[2] if wt.dim() == 3 else 0, **flags,
        USE_DOT=use_dot, IEEE=wt.dtype == torch.float32, SPLIT=split > 1, DEPTH=cfg.depth,
        RED=_reduce_width(split, block_b * block_n * (2 if w2 is not None else 1), cfg.num_warps),
        BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_N=block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    record_compiled("sparse_gemv_kernel", compiled, k, n, w2 is not None)
    return y


@torch.library.custom_op("actsparse::sparse_gemv", mutates_args=())
def _sparse_gemv_op(x: torch.Tensor, wt: torch.Tensor, thresh: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                    norm_weight: Optional[torch.Tensor], eps: float, act: int, segments: list[int],
                    nm_n: int, nm_m: int, impl: str = "auto", out_thresh: Optional[torch.Tensor] = None,
                    out_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    kind = "qkv" if segments else "gemv"
    return _launch(x, wt, None, thresh, shift, bias, residual, norm_weight, eps, act, segments, nm_n, nm_m, kind,
                   impl, out_thresh, out_shift)


@_sparse_gemv_op.register_fake
def _(x, wt, thresh, shift, bias, residual, norm_weight, eps, act, segments, nm_n, nm_m, impl="auto",
      out_thresh=None, out_shift=None):
    return x.new_empty((x.shape[0], wshape(wt)[1]))


def _check_presel(shift, norm_weight, nm) -> None:
    """thresh=None: x arrives already selected, so the selection's own operands must not be given."""
    given = [name for name, v in (("shift", shift), ("norm_weight", norm_weight), ("nm", nm)) if v is not None]
    if given:
        raise ValueError(f"thresh=None means x is already selected (its zeros are skipped); {', '.join(given)} "
                         "belong to the selection and must be None (fold a shift into bias)")


def _out_rows(out_thresh: Optional[torch.Tensor], out_shift: Optional[torch.Tensor],
              n: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Validate the output selection: float32 thresholds [1] or [N] (a [N] view) and a shift [N]."""
    if out_thresh is None:
        if out_shift is not None:
            raise ValueError("out_shift needs out_thresh (the output selection's thresholds)")
        return None, None
    def row(t: torch.Tensor) -> torch.Tensor:
        return t[None] if t.dim() == 1 and t.shape[0] == n else t

    out_thresh = _as_rows(row(out_thresh), 1, n, "out_thresh")[0]
    if out_shift is not None:
        out_shift = _as_rows(row(out_shift.float()), 1, n, "out_shift")[0].contiguous()
    return out_thresh, out_shift


def _validate_nm(nm: Optional[tuple[int, int]]) -> tuple[int, int]:
    if nm is None:
        return 0, 0
    n, m = nm
    if not (0 < n < m) or m & (m - 1):
        raise ValueError(f"nm must be (N, M) with 0 < N < M and M a power of two, got {nm}")
    return n, m


def sparse_gemv(
    x: torch.Tensor,
    wt: torch.Tensor,
    thresh: Optional[torch.Tensor],
    *,
    shift: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    act: str = "none",
    segments: Sequence[int] = (),
    nm: Optional[tuple[int, int]] = None,
    impl: str = "auto",
    out_thresh: Optional[torch.Tensor] = None,
    out_shift: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Return y [B, N] = act(W·x_s + bias) + residual, with x_s = (x̂ − m)⊙1[|x̂ − m| > t] and x̂ = rmsnorm(x) or x.

    x: [B, K]; wt: W^T [K, N] row-major, or packed [N / W, K, W] (`pack_weight`; v2 / v5 kernels); thresh: float32 [S] or [S, K] (S = len(segments) + 1, one row
    per output-column segment, e.g. q/k/v); shift: [S, K]; bias: [N]; residual: [B, N];
    norm_weight: [K] RMSNorm weight applied to x first; nm=(N, M) keeps the top N of every M
    consecutive channels instead of thresholding. thresh=None: x is already selected (x_s = x, its
    zeros skipped; shift, norm_weight and nm must be None), e.g. a producer's output with out_thresh.
    out_thresh: float32 [1] or [N], out_shift: [N]: the output is written selected for the next GEMV,
    y ← (y − m)⊙1[|y − m| > t] (after bias, act and residual). impl: "v6" (a compaction pass, then a
    walk that gathers only the active weight rows, batch ≤ 4: the default there), "v5" (a selection pass,
    then the v2 walk over the selected input), "v4" (selection once per K slice, columns streamed, batch ≤ 4),
    "v3" (active rows compacted, batch ≤ 4), "v2" (masked split-K walk selecting as it goes, any
    batch) or "auto" (the fastest one measured for the shape).
    """
    _check_common(x, wt)
    k, n = wshape(wt)
    bounds = [int(s) for s in segments]
    if len(bounds) > 2 or any(not (0 < s < n) for s in bounds) or bounds != sorted(bounds):
        raise ValueError(f"segments must be at most 2 increasing column boundaries inside (0, {n}), got {bounds}")
    nseg = len(bounds) + 1
    if thresh is None:
        _check_presel(shift, norm_weight, nm)
    else:
        thresh = _as_rows(thresh, nseg, k, "thresh")
    if shift is not None:
        shift = _as_rows(shift.float(), nseg, k, "shift").contiguous()
    out_thresh, out_shift = _out_rows(out_thresh, out_shift, n)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    if residual is not None and tuple(residual.shape) != (x.shape[0], n):
        raise ValueError(f"residual must have shape [{x.shape[0]}, {n}], got {tuple(residual.shape)}")
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"norm_weight must have shape [{k}], got {tuple(norm_weight.shape)}")
    if act not in ACTS:
        raise ValueError(f"act must be one of {sorted(ACTS)}, got {act!r}")
    nm_n, nm_m = _validate_nm(nm)
    # Rejects a bad impl / batch here.
    choose_impl("qkv" if bounds else "gemv", k, n, x.shape[0], impl, presel=thresh is None,
                out_sel=out_thresh is not None)
    return torch.ops.actsparse.sparse_gemv(x, wt, thresh, shift, bias, residual, norm_weight, float(eps),
                                           ACTS[act], bounds, nm_n, nm_m, impl, out_thresh, out_shift)
