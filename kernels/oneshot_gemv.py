"""The one-shot tiles: one program per [BLOCK_K input rows × BLOCK_N output columns] tile, no loop, one launch.

This is TEAL's kernel design (FasterDecoding/TEAL, kernels/sparse_gemv.py) made a path of its own: thousands of
short programs, each loading its slice of x, selecting it, issuing one masked load of its tile's kept weight
rows (W^T [K, N] row-major: a skipped input channel is a contiguous row segment never read) and adding its
partial sums into the output columns. With so many independent programs the memory pipe is full at any
sparsity, where a walk over a K range waits one memory latency per step.

Where it differs from TEAL's kernel, and why:
- **No zeroing launch, and any output dtype.** Partials are fp32 atomic adds into the device's self-zeroing
  accumulators (`configs.atomic_accumulator`); one counter increment per program elects the last program of
  each column strip, which reads the sums, zeroes them for the next launch, resets its counter and runs the
  epilogue (bias, act or act(gate)·up, residual, cast). TEAL adds fp16 partials into an output a separate
  launch zeroed, which bf16 (8 bits of mantissa per atomic add) could not afford.
- **Fused ops.** RMSNorm of x (the row's factor 1/rms computed once per launch by a one-program-per-row pre-pass,
  each tile then scales its own slice: measured on an H100, every program reducing the whole row itself cost
  13 µs of q|k|v's 30 and 69 µs of gate|up's 133 at 50%), per-channel thresholds and shifts per q/k/v segment, N:M selection, and gate/up in
  one launch (programs of both matrices, one counter per strip: the epilogue writes act(gate)·up).
- **Accumulating into the caller's fp32 tensor** (`sparse_gemv(accumulate=h)`): with the residual stream kept
  in fp32, o and down add their partials straight into it (y = h + W·x_s): no counter, no epilogue, no zeroing.
- **Batches 2-16** on tensor cores: x_s rows padded to 16, one tl.dot [16, BLOCK_K] × [BLOCK_K, BLOCK_N]
  over the tile's union of kept rows (each token's own unselected entries zeroed).
The fp32 atomic sum makes the last bits of the result depend on arrival order (as TEAL's fp16 sum does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import MAX_ACC, MAX_TILES, OneshotConfig, atomic_accumulator, new_output, record_compiled, tile_counters
from .gemv_common import activate, epilogue, fit_block_n, launch_args, out_dtype, row_rstd, select_chunk
from .pdl import pdl_args, pdl_prologue


@triton.jit
def _rstd_kernel(x_ptr, r_ptr, z_ptr, K, Z_N, Z_TOTAL, stride_xb, eps, NORM_BLOCK: tl.constexpr,
                 ZERO: tl.constexpr, Z_BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """r[b] = 1 / RMS of row b of x: RMSNorm's factor, once per launch of the tiles (programs (b, 0)); with ZERO,
    program (b, j) also zeroes elements [(b·J + j)·Z_N, +Z_N) (below Z_TOTAL) of the contiguous fp32 tensor the
    tiles then add into (`out=`: their raw sums), so the zeroing costs no launch of its own."""
    pdl_prologue(PDL)
    row = tl.program_id(0)
    if tl.program_id(1) == 0:
        r = row_rstd(x_ptr + row * stride_xb + tl.zeros([1, 1], dtype=tl.int32), tl.full([1], 1, tl.int1), K, eps,
                     NORM_BLOCK, 1)
        tl.store(r_ptr + row + tl.arange(0, 1), r)
    if ZERO:
        start = (row * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * Z_N
        for z0 in range(0, Z_N, Z_BLOCK):
            offs = z0 + tl.arange(0, Z_BLOCK)
            tl.store(z_ptr + start + offs, tl.zeros([Z_BLOCK], dtype=tl.float32),
                     mask=(offs < Z_N) & (start + offs < Z_TOTAL))


@triton.jit
def _oneshot_kernel(
    x_ptr, g_ptr, t_ptr, m_ptr, w_ptr, w2_ptr, bias_ptr, res_ptr, y_ptr, acc_ptr, cnt_ptr, rstd_ptr,
    B, K, N, N0, N1, stride_xm,
    stride_xb, stride_ts, stride_tk, stride_ms, stride_wk, stride_bs, stride_rb, stride_yb,
    eps, e_ptr, ew_ptr, T, stride_we, stride_te,
    NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr, PAIR: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr,
    USE_DOT: tl.constexpr, IEEE: tl.constexpr, ACCUM: tl.constexpr, GATED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EXPERTS: tl.constexpr = False,
    HAS_EW: tl.constexpr = False, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    pid_n = tl.program_id(0)  # fastest: neighbouring programs read neighbouring columns of the same rows
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)  # which matrix of a gate/up pair; EXPERTS: (routed row, matrix)
    if EXPERTS:
        # Routed row r = b·T + t is token b's t-th expert, whose id the device holds: the weights' base moves by
        # it, so a captured graph serves any routing. One token per program (B is 1 here).
        mat = pid_m % (1 + PAIR)
        row = pid_m // (1 + PAIR)
        tok = row // T
        e_id = tl.load(e_ptr + row).to(tl.int64)
        w_off = e_id * stride_we
        t_off = e_id * stride_te  # 0: one threshold row set serves every expert
        x_row = tok
        if GATED > 0:
            x_row = row  # each routed row has its own pair of raw sums
    else:
        mat = pid_m
        row = 0
        tok = 0
        w_off = 0
        t_off = 0
        x_row = 0
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    n_start = pid_n * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    if PAIR:
        sel = mat  # gate / up thresholds
    else:
        sel = (n_start >= N0).to(tl.int32) + (n_start >= N1).to(tl.int32)  # q / k / v segment
    x_rows = x_ptr + (x_row + offs_b[:, None]) * stride_xb
    xv = tl.load(x_rows + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0,
                 eviction_policy="evict_last").to(tl.float32)
    if NORM:
        gv = tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + tok + offs_b, mask=mask_b, other=0.0)
        xv = xv * rstd[:, None] * gv[None, :]
    if GATED > 0:  # x holds a gate/up pair's raw sums [2, B, K]: the input is act(gate)·up
        uv = tl.load(x_rows + stride_xm + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0,
                     eviction_policy="evict_last").to(tl.float32)
        xv = activate(xv, GATED) * uv
    xs, rows = select_chunk(xv, t_ptr + t_off + sel * stride_ts, m_ptr + sel * stride_ms, offs_k, mask_k, mask_b,
                            stride_tk, HAS_SHIFT, NM_N, NM_M, BLOCK_B, BLOCK_K)
    if HAS_EW:  # the routing weight scales the expert's selected input (the same as its output: W is linear)
        xs = xs * tl.load(ew_ptr + row).to(tl.float32)
    if mat == 0:
        wb = w_ptr
    else:
        wb = w2_ptr
    w = tl.load(wb + w_off + offs_k[:, None] * stride_wk + offs_n[None, :],
                mask=(rows[:, None] != 0) & mask_n[None, :], other=0.0, eviction_policy="evict_first")
    if USE_DOT:
        if IEEE:
            part = tl.dot(xs, w.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(xs.to(w.dtype), w)
    else:
        part = tl.sum(xs[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    mask_out = mask_b[:, None] & mask_n[None, :]
    if ACCUM:
        # y is the caller's fp32 [B, N] (it holds the residual): the partials land in it directly, no counter, no
        # epilogue, no zeroing. The first K tile of each strip adds the bias.
        kept = tl.max(rows.to(tl.int32), axis=0) > 0
        if HAS_BIAS:
            if pid_k == 0:
                part += tl.load(bias_ptr + pid_m * stride_bs + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                kept = kept | (pid_k == 0)
        if EXPERTS:
            if PAIR:
                y_row = pid_m  # the raw sums [B·T·2, N]: one row per (routed row, matrix)
            else:
                y_row = tok  # every expert of a token adds into its row
        else:
            y_row = pid_m * B
        if kept:
            tl.atomic_add(y_ptr + (y_row + offs_b[:, None]) * stride_yb + offs_n[None, :], part,
                          mask=mask_out, sem="relaxed")
    else:
        tile = offs_b[:, None] * N + offs_n[None, :]
        if tl.max(rows.to(tl.int32), axis=0) > 0:  # a tile with no kept row adds nothing: no atomics
            tl.atomic_add(acc_ptr + pid_m * B * N + tile, part, mask=mask_out, sem="relaxed")
        tl.debug_barrier()  # every partial of this program is issued before it signals
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == tl.num_programs(1) * (1 + PAIR) - 1:
            tl.store(cnt_ptr + pid_n, 0)  # ready for the next launch or graph replay
            out = tl.load(acc_ptr + tile, mask=mask_out, other=0.0, cache_modifier=".cg")
            tl.store(acc_ptr + tile, tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32), mask=mask_out)
            out2 = out
            if PAIR:
                out2 = tl.load(acc_ptr + B * N + tile, mask=mask_out, other=0.0, cache_modifier=".cg")
                tl.store(acc_ptr + B * N + tile, tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32), mask=mask_out)
            epilogue(out, out2, bias_ptr, stride_bs, res_ptr, stride_rb, y_ptr, stride_yb, offs_b, offs_n, mask_n,
                     mask_out, HAS_BIAS, PAIR, ACT, HAS_RES, y_ptr, y_ptr, 0, False, False)


def launch_oneshot(x, wt, w2, thresh, shift, bias, residual, norm_weight, eps, act, bounds, nm_n, nm_m,
                   cfg: OneshotConfig, accumulate=None, zero_first: bool = False, gated: int = 0, experts=None,
                   expert_weights=None) -> torch.Tensor:
    """Run the one-shot tiles (arguments validated by the public ops); return y [B, N], or with `accumulate`
    (fp32 [B, N]; a gate/up pair: [2, B, N], the raw sums) add W·x_s (+ bias) into it in place and return it;
    `zero_first`: zero it first (inside the norm's pre-pass where there is one), so it receives W·x_s (+ bias).
    `gated` (an ACTS code): x is a gate/up pair's raw sums [2, B, K] and the input is act(gate)·up.
    `experts` (int [B, T] on the device): wt (and w2) are stacked experts [E, K, N] and each token runs its T
    experts: a pair writes raw sums `accumulate` [B, T, 2, N], a single matrix adds Σ_t w_t·W_{e_t}·x_s into the
    token's row of `accumulate` [B, N] (w_t: `expert_weights` [B, T], or 1); gated, x is the pair's sums
    [B, T, 2, K]; thresh [S, K] serves every expert, [E, S, K] is a row set per expert."""
    stride_we, stride_te, rows, top = 0, 0, 0, 1
    if experts is not None:
        stride_we, rows, top = wt.stride(0), experts.numel(), experts.shape[-1]
        if thresh.dim() == 3:  # a threshold row set per expert [E, S, K]
            stride_te, thresh = thresh.stride(0), thresh[0]
        wt, w2 = wt[0], (None if w2 is None else w2[0])
        if gated:
            x = x.reshape(rows, 2, x.shape[-1])
    stride_xm = x.stride(-3 if experts is None else 1) if gated else 0
    x = (x[0] if experts is None else x[:, 0]) if gated else x
    b, k = x.shape
    n = wt.shape[1]
    use_dot = b > 1 and experts is None
    block_b = 16 if use_dot else 1
    block_n = fit_block_n(cfg.block_n, bounds) if bounds else cfg.block_n
    block_k = cfg.block_k
    if nm_n > 0 and block_k % nm_m:
        block_k = max(nm_m, block_k // nm_m * nm_m)
    if use_dot and (block_k < 16 or block_n < 16):
        raise ValueError(f"batches over 1 run on tensor cores, which need block_k and block_n ≥ 16, got {block_k} "
                         f"and {block_n}")
    mats = 2 if w2 is not None else 1
    tiles_n = triton.cdiv(n, block_n)
    if tiles_n > MAX_TILES:
        raise ValueError(f"too many output strips ({tiles_n}) for the one-shot tiles; use a larger block_n")
    if accumulate is None and mats * b * n > MAX_ACC:
        raise ValueError(f"the one-shot tiles accumulate at most {MAX_ACC} fp32 sums a launch, got "
                         f"{mats} × {b} × {n}; use the gather or masked kernel")
    if accumulate is None:
        y = new_output((b, n), x.device, out_dtype(wt, residual))
    elif experts is not None:
        y = accumulate.view(-1, n)  # a pair: one row per (routed row, matrix); a single matrix: one per token
    else:
        y = accumulate if accumulate.dim() == 2 else accumulate[0]  # a pair's second matrix is B·N further on
    ptrs, (n0, n1), strides, flags = launch_args(x, wt, w2, thresh, shift, bias, residual, norm_weight, act, bounds,
                                                 nm_n, nm_m, y, block_b)
    rstd = y
    zero = zero_first and accumulate is not None
    if norm_weight is not None:
        rstd = torch.empty(b, device=x.device, dtype=torch.float32)
        # The pre-pass's programs zero equal contiguous shares of the (contiguous) sums, ≤ 4096 elements each.
        total = accumulate.numel() if zero else 0
        chunks = max(1, triton.cdiv(total, 4096 * b))
        _rstd_kernel[(b, chunks)](x, rstd, accumulate if zero else rstd, k, triton.cdiv(total, b * chunks), total,
                                  x.stride(0), eps, NORM_BLOCK=min(triton.next_power_of_2(k), 4096), ZERO=zero,
                                  Z_BLOCK=1024, num_warps=4, **pdl_args(x.device))
    elif zero:
        accumulate.zero_()
    e_ptr = experts if experts is not None else y  # never read without EXPERTS / HAS_EW
    ew_ptr = expert_weights if expert_weights is not None else y
    grid_m = mats * rows if experts is not None else mats
    compiled = _oneshot_kernel[(tiles_n, triton.cdiv(k, block_k), grid_m)](
        *ptrs, atomic_accumulator(x.device), tile_counters(x.device), rstd, 1 if experts is not None else b, k, n,
        n0, n1, stride_xm, *strides, eps, e_ptr, ew_ptr, top, stride_we, stride_te,
        **flags, USE_DOT=use_dot, IEEE=wt.dtype == torch.float32, ACCUM=accumulate is not None, GATED=gated,
        BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_N=block_n, EXPERTS=experts is not None,
        HAS_EW=expert_weights is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x.device),
    )
    record_compiled("oneshot_kernel" if accumulate is None else "oneshot_accumulate", compiled, k, n, w2 is not None)
    return y if accumulate is None else accumulate
