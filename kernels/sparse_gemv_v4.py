"""Input-sparse GEMV v4: the selection stays put while the weight stream moves (batch 1 to 4, one launch per op).

Why v2 and v3 stayed latency-bound (BENCHMARKS.md): every step of their inner loop waited for a
selection (x chunk -> mask) before its weight load could start, and each program covered a narrow
strip of columns, so a program had one small load in flight and the kernel paid
(N·K / tile area) / (programs in flight) memory round trips, almost regardless of sparsity.

v4 swaps the loops. A program owns a slice of SEG_K input channels and a RANGE of output columns:

1. Prologue, once per program: the RMSNorm factor (one wide load of x, L2-resident), the x slice,
   its shift, threshold (or N:M) selection -> x_s [B, SEG_K] and the batch-union row mask, for
   one matrix or both of a gate/up pair. Nothing in it depends on the column range.
2. Loop over the range in strips of BLOCK_N columns: load the [SEG_K, BLOCK_N] weight tile with
   the row mask (predicated-off rows issue no memory traffic; W^T [K, N] row-major, so a kept
   row is BLOCK_N contiguous elements), reduce x_s · tile over K to [B, BLOCK_N], store the
   partial. The mask is loop-invariant, so no load in this loop depends on another: they can
   all be in flight together (the compiler's pipeliner, num_stages) and the loop costs bandwidth,
   not round trips. The reduction over K happens every step (a 2-D accumulator), so SEG_K can be
   long (few slices, few partials) without a [B, SEG_K, BLOCK_N] register accumulator.
3. Split-K without atomics on data: partials [slices, matrices, B, N] go to an fp32 workspace;
   each program then increments its range's counter once, and the last-arriving program of the
   range sums every slice's partial in a fixed order (deterministic) and runs the epilogue
   (bias, silu / silu(gate)·up, residual, cast) for the whole range, then resets the counter for
   the next launch or graph replay. No zeroing launch.

A range lies inside one q/k/v segment (the launcher makes RANGE_N divide the segment
boundaries), so a program needs one threshold row. The grid is (ranges, slices); consecutive
programs share a slice, so its x and thresholds are read from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import V4Config, new_output, num_sms, record_compiled
from .pdl import pdl_prologue
from .sparse_gemv import _chunk, _epilogue, _fit_block_n, _launch_args, _row_rstd, _split_workspace


@triton.jit
def _v4_kernel(
    x_ptr, g_ptr, t_ptr, m_ptr, w_ptr, w2_ptr, bias_ptr, res_ptr, y_ptr, ws_ptr, cnt_ptr,
    B, K, N, N0, N1, RANGE_N,
    stride_xb, stride_ts, stride_tk, stride_ms, stride_wk, stride_bs, stride_rb, stride_yb,
    eps,
    NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr, PAIR: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr,
    SPLIT: tl.constexpr, SLICES_P2: tl.constexpr,
    BLOCK_B: tl.constexpr, SEG_K: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    x_rows = x_ptr + offs_b[:, None] * stride_xb
    n_lo = pid_r * RANGE_N
    n_hi = tl.minimum(N, n_lo + RANGE_N)

    rstd = tl.zeros([BLOCK_B], dtype=tl.float32)
    if NORM:
        rstd = _row_rstd(x_rows, mask_b, K, eps, NORM_BLOCK, BLOCK_B)
    seg = (n_lo >= N0).to(tl.int32) + (n_lo >= N1).to(tl.int32)  # the range's q / k / v segment
    offs_k = pid_k * SEG_K + tl.arange(0, SEG_K)
    mask_k = offs_k < K
    xs, rows, xs2, rows2 = _chunk(x_rows, x_rows, g_ptr, rstd, t_ptr + seg * stride_ts, m_ptr + seg * stride_ms,
                                  t_ptr + stride_ts, m_ptr + stride_ms, offs_k, mask_k, mask_b, stride_tk,
                                  NORM, HAS_SHIFT, PAIR, NM_N, NM_M, False, BLOCK_B, SEG_K)
    keep = rows[:, None] != 0
    keep2 = rows2[:, None] != 0
    w_rows = w_ptr + offs_k[:, None] * stride_wk
    w2_rows = w2_ptr + offs_k[:, None] * stride_wk
    NACC = 1 + PAIR  # partials per program and column

    # The next strip's tiles are requested before this strip's are reduced (a manual double buffer:
    # the compiler does not pipeline loads that feed no dot), so two strips' rows are in flight.
    ar_n = tl.arange(0, BLOCK_N)
    mask_n = ar_n + n_lo < n_hi
    w_n = tl.load(w_rows + (n_lo + ar_n)[None, :], mask=keep & mask_n[None, :], other=0.0,
                  eviction_policy="evict_first")
    w2_n = w_n
    if PAIR:
        w2_n = tl.load(w2_rows + (n_lo + ar_n)[None, :], mask=keep2 & mask_n[None, :], other=0.0,
                       eviction_policy="evict_first")
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + ar_n
        mask_n = offs_n < n_hi
        w = w_n
        w2 = w2_n
        nxt = offs_n + BLOCK_N
        mask_nxt = nxt < n_hi
        w_n = tl.load(w_rows + nxt[None, :], mask=keep & mask_nxt[None, :], other=0.0, eviction_policy="evict_first")
        if PAIR:
            w2_n = tl.load(w2_rows + nxt[None, :], mask=keep2 & mask_nxt[None, :], other=0.0,
                           eviction_policy="evict_first")
        out = tl.sum(xs[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)  # [BLOCK_B, BLOCK_N]
        out2 = out
        if PAIR:
            out2 = tl.sum(xs2[:, :, None] * w2.to(tl.float32)[None, :, :], axis=1)
        mask_out = mask_b[:, None] & mask_n[None, :]
        if SPLIT:
            ws_tile = ws_ptr + (pid_k * NACC) * B * N + offs_b[:, None] * N + offs_n[None, :]
            tl.store(ws_tile, out, mask=mask_out)
            if PAIR:
                tl.store(ws_tile + B * N, out2, mask=mask_out)
        else:
            _epilogue(out, out2, bias_ptr, stride_bs, res_ptr, stride_rb, y_ptr, stride_yb, offs_b, offs_n, mask_n,
                      mask_out, HAS_BIAS, PAIR, ACT, HAS_RES,
                      y_ptr, y_ptr, 0, False, False)

    if SPLIT:
        n_slices = tl.num_programs(1)
        tl.debug_barrier()  # every partial of this program is written before it signals
        arrived = tl.atomic_add(cnt_ptr + pid_r, 1, sem="acq_rel")
        if arrived == n_slices - 1:
            tl.store(cnt_ptr + pid_r, 0)  # ready for the next launch / graph replay: no zeroing launch
            ss = tl.arange(0, SLICES_P2)
            for n0 in range(n_lo, n_hi, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < n_hi
                mask_out = mask_b[:, None] & mask_n[None, :]
                pm = (ss < n_slices)[:, None, None] & mask_out[None, :, :]
                part = ws_ptr + (ss[:, None, None] * NACC) * B * N + offs_b[None, :, None] * N + offs_n[None, None, :]
                # One load of every slice's partial, summed in a fixed order: the result does not
                # depend on which program arrived last.
                out = tl.sum(tl.load(part, mask=pm, other=0.0, cache_modifier=".cg"), axis=0)
                out2 = out
                if PAIR:
                    out2 = tl.sum(tl.load(part + B * N, mask=pm, other=0.0, cache_modifier=".cg"), axis=0)
                _epilogue(out, out2, bias_ptr, stride_bs, res_ptr, stride_rb, y_ptr, stride_yb, offs_b, offs_n,
                          mask_n, mask_out, HAS_BIAS, PAIR, ACT, HAS_RES,
                      y_ptr, y_ptr, 0, False, False)


def plan_v4(k: int, n: int, bounds, cfg: V4Config, nm_m: int, device: torch.device) -> tuple[int, int, int, int]:
    """Return (seg_k, block_n, range_n, slices) of a launch: K slices of seg_k channels, column ranges of
    range_n (a multiple of block_n inside one segment) so that about cfg.per_sm programs run per SM
    (or cfg.ranges ranges, when set)."""
    seg_k = min(cfg.seg_k, max(16, triton.next_power_of_2(k)))
    if nm_m and seg_k % nm_m:
        seg_k = max(seg_k, nm_m)
    block_n = _fit_block_n(cfg.block_n, bounds) if bounds else cfg.block_n
    slices = triton.cdiv(k, seg_k)
    ranges = cfg.ranges or max(1, triton.cdiv(cfg.per_sm * num_sms(device), slices))
    range_n = max(block_n, triton.cdiv(triton.cdiv(n, ranges), block_n) * block_n)
    while any(b % range_n for b in bounds):  # stops at block_n, which divides every boundary
        range_n -= block_n
    return seg_k, block_n, range_n, slices


def launch_v4(x, wt, w2, thresh, shift, bias, residual, norm_weight, eps, act, bounds, nm_n, nm_m,
              cfg: V4Config) -> torch.Tensor:
    """Run the v4 kernel (arguments already validated by the public op); return y [B, N]."""
    b, k = x.shape
    n = wt.shape[1]
    seg_k, block_n, range_n, slices = plan_v4(k, n, bounds, cfg, nm_m, x.device)
    ranges = triton.cdiv(n, range_n)
    split = slices > 1
    y = new_output((b, n), x.device, x.dtype)
    ws, cnt = _split_workspace(slices, 2 if w2 is not None else 1, b, n, ranges, y)
    block_b = triton.next_power_of_2(b)
    ptrs, (n0, n1), strides, flags = _launch_args(x, wt, w2, thresh, shift, bias, residual, norm_weight, act, bounds,
                                                  nm_n, nm_m, y, block_b)
    compiled = _v4_kernel[(ranges, slices)](
        *ptrs, ws, cnt, b, k, n, n0, n1, range_n, *strides, eps, **flags,
        SPLIT=split, SLICES_P2=triton.next_power_of_2(slices),
        BLOCK_B=block_b, SEG_K=seg_k, BLOCK_N=block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    record_compiled("v4_kernel", compiled, k, n, w2 is not None)
    return y
