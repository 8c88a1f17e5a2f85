"""R-Sparse's second path on the GPU: what an op's threshold drops goes through rank-r factors, two launches an op.

R-Sparse keeps the channels whose |x| clears the threshold t in the sparse kernels and sends the rest through a
low-rank approximation of the weight: y += (x ⊙ 1[|x| ≤ t]) · V · (U·S)ᵀ, V [K, r], U·S [N, r]. Per op (q|k|v,
o, gate|up, down: one to three sites, each with its own threshold and factors) this is

  1. `_lr_in_kernel`: z[b, c] = Σ_k x̂[b, k] · 1[|x̂[b, k]| ≤ t_s(k)] · V[k, c] over every site's columns at
     once (the sites' V side by side, each padded to the op's largest rank), split over K, fp32 atomic sums into
     the device's self-zeroing accumulators. A row of V is read only where its channel is dropped: the kept
     channels' rows (what the sparse kernel reads) are not. x̂ is what the op's sparse kernel selects on: x, its
     RMSNorm (norm_weight), or act(gate)·up formed from a gate/up pair's raw sums (gated).
  2. `_lr_out_kernel`: out[b, n] += Σ_j z[b, s(n)·R + j] · (U·S)[n, j], j < r_s(n), adding in fp32 into the
     op's output (its raw fp32 sums, the fp32 residual stream, or an output in the model's dtype); the last
     program zeroes z for the next op.

Against the torch formulation (a cast, a compare, a product and two GEMVs per site, a concatenation and an add)
this is two launches an op whatever its site count, and the factors are read in the model's dtype.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .configs import atomic_accumulator, num_sms, tile_counters
from .gemv_common import ACTS, activate, token_rstd
from .pdl import pdl_args, pdl_prologue

MAX_Z = 1 << 20  # fp32 sums of one launch (batch × sites × rank): the accumulators' size


@triton.jit
def _lr_in_kernel(x_ptr, g_ptr, t_ptr, v_ptr, rk_ptr, z_ptr, K, C, R, stride_xb, stride_xh, stride_ts, stride_tk,
                  stride_vk, eps, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, GATED: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    site = offs_c // R
    rank = tl.load(rk_ptr + site, mask=offs_c < C, other=0)
    live = (offs_c < C) & (offs_c - site * R < rank)  # a padding column of a site of lower rank: never read
    row = x_ptr + b * stride_xb
    xv = tl.load(row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    if GATED > 0:  # act(gate)·up from the pair's raw sums
        xv = activate(xv, GATED) * tl.load(row + stride_xh + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    if NORM:  # RMSNorm's factor as the sparse kernels form it (the same blocks): the two paths split x̂ exactly
        rstd = token_rstd(row, K, eps, NORM_BLOCK)
        xv = xv * rstd * tl.load(g_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + site[None, :] * stride_ts + offs_k[:, None] * stride_tk,
                mask=mask_k[:, None] & live[None, :], other=-1.0)
    ax = tl.abs(xv)[:, None]
    sel = (ax <= t) & (ax > 0) & mask_k[:, None] & live[None, :]  # what the sparse kernel drops (zeros add nothing)
    w = tl.load(v_ptr + offs_k[:, None] * stride_vk + offs_c[None, :], mask=sel, other=0.0,
                eviction_policy="evict_first")
    part = tl.sum(w.to(tl.float32) * xv[:, None], axis=0)
    if tl.max(sel.to(tl.int32)) > 0:
        tl.atomic_add(z_ptr + b * C + offs_c, part, mask=live, sem="relaxed")


@triton.jit
def _lr_out_kernel(z_ptr, u_ptr, rk_ptr, out_ptr, cnt_ptr, B, N, C, R, S1, S2, HALF, stride_ob, stride_oh, stride_un,
                   PAIR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, Z_BLOCK: tl.constexpr,
                   PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    b = tl.program_id(1)
    j = tl.arange(0, BLOCK_R)
    # A few programs per SM, each over every num_programs-th block of rows: the arrival count below stays short
    for blk in range(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        site = (offs_n >= S1).to(tl.int32) + (offs_n >= S2).to(tl.int32)
        rank = tl.load(rk_ptr + site, mask=mask_n, other=0)
        mj = (j[None, :] < rank[:, None]) & mask_n[:, None]
        z = tl.load(z_ptr + b * C + site[:, None] * R + j[None, :], mask=mj, other=0.0, cache_modifier=".cg")
        u = tl.load(u_ptr + offs_n[:, None] * stride_un + j[None, :], mask=mj, other=0.0,
                    eviction_policy="evict_first")
        y = tl.sum(u.to(tl.float32) * z, axis=1)
        dst = out_ptr + b * stride_ob + offs_n
        if PAIR:  # a gate|up pair's second half: its own block of the sums
            hi = (offs_n >= HALF).to(tl.int32)
            dst += hi * (stride_oh - HALF)
        o = tl.load(dst, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(dst, (o + y).to(out_ptr.dtype.element_ty), mask=mask_n)
    # Every program has read its z: the last to arrive zeroes the sums for the next launch.
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if arrived == tl.num_programs(0) * tl.num_programs(1) - 1:
        tl.store(cnt_ptr, 0)
        for z0 in range(0, B * C, Z_BLOCK):
            offs = z0 + tl.arange(0, Z_BLOCK)
            tl.store(z_ptr + offs, tl.zeros([Z_BLOCK], dtype=tl.float32), mask=offs < B * C)


def pack_lowrank(factors: Sequence[Optional[tuple[torch.Tensor, torch.Tensor]]], widths: Sequence[int],
                 dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An op's sites' factors side by side, as `lowrank_add` reads them: (V [K, S·R], U·S [Σ widths, R], ranks
    int32 [S]), R the largest rank, each site's columns zero-padded to it (the kernels never read the padding);
    a site without factors (None) has rank 0. factors[s] = (V_s [K, r_s], UST_s [widths[s], r_s])."""
    if len(factors) != len(widths) or not any(f is not None for f in factors):
        raise ValueError("pack_lowrank takes one (V, U·S) or None per site, at least one pair")
    k = next(f[0].shape[0] for f in factors if f is not None)
    ranks = [0 if f is None else f[0].shape[1] for f in factors]
    r = max(ranks)
    v = torch.zeros(k, len(factors) * r, dtype=dtype, device=device)
    ust = torch.zeros(sum(widths), r, dtype=dtype, device=device)
    row = 0
    for s, (f, n) in enumerate(zip(factors, widths)):
        if f is not None:
            fv, fu = f
            if fv.shape[0] != k or tuple(fu.shape) != (n, fv.shape[1]):
                raise ValueError(f"site {s}: V must be [{k}, r] and U·S [{n}, r], got {tuple(fv.shape)} and "
                                 f"{tuple(fu.shape)}")
            v[:, s * r:s * r + fv.shape[1]] = fv.to(device=device, dtype=dtype)
            ust[row:row + n, :fv.shape[1]] = fu.to(device=device, dtype=dtype)
        row += n
    return v, ust, torch.tensor(ranks, dtype=torch.int32, device=device)


def lowrank_add(x: torch.Tensor, thresh: torch.Tensor, v: torch.Tensor, ust: torch.Tensor, ranks: torch.Tensor,
                out: torch.Tensor, *, norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                gated: str = "none", segments: Sequence[int] = ()) -> torch.Tensor:
    """Add R-Sparse's low-rank path of one op into `out` (in place; returned): out[b, n] += Σ_j z_s[b, j]·ust[n, j]
    with z_s[b, j] = Σ_k x̂[b, k]·1[|x̂[b, k]| ≤ t_s(k)]·v[k, s·R + j], s the site of output n.

    x: [B, K] (the residual stream with norm_weight: x̂ = RMSNorm(x)·g), or with gated="silu" / "gelu_tanh" a
    gate/up pair's raw sums [2, B, K] (x̂ = act(gate)·up). thresh: float32 [S] or [S, K], the op's thresholds
    (what its sparse kernel keeps: |x̂| > t). v, ust, ranks: `pack_lowrank`'s. out: [B, N] (N = ust's rows; the
    sites' outputs side by side, `segments` their boundaries, as `sparse_gemv`'s), or a pair's [2, B, N/2]
    (gate's sites then up's: segments (N/2,)); any float dtype, the sum formed in fp32.
    """
    pair_in = gated != "none"
    if gated not in ACTS or (pair_in and ACTS[gated] == 0):
        raise ValueError(f"gated must be 'none', 'silu' or 'gelu_tanh', got {gated!r}")
    if pair_in and (x.dim() != 3 or x.shape[0] != 2):
        raise ValueError(f"gated: x must be a pair's raw sums [2, B, K], got {tuple(x.shape)}")
    if not pair_in and x.dim() != 2:
        raise ValueError(f"x must be [B, K], got {tuple(x.shape)}")
    b, k = x.shape[-2], x.shape[-1]
    s = ranks.numel()
    n = ust.shape[0]
    if v.dim() != 2 or v.shape[0] != k or v.shape[1] != s * ust.shape[1] or ranks.dtype != torch.int32:
        raise ValueError(f"v, ust, ranks must be pack_lowrank's for K={k}: [K, S·R], [N, R], int32 [S]; got "
                         f"{tuple(v.shape)}, {tuple(ust.shape)}, {ranks.dtype} {tuple(ranks.shape)}")
    if len(segments) != s - 1 or list(segments) != sorted(segments) or any(not 0 < g < n for g in segments):
        raise ValueError(f"segments must be the {s - 1} increasing boundaries of {s} sites' outputs in (0, {n}), "
                         f"got {tuple(segments)}")
    if thresh.dtype != torch.float32 or tuple(thresh.shape) not in ((s,), (s, k), (s, 1)):
        raise ValueError(f"thresh must be float32 [{s}] or [{s}, {k}], got {thresh.dtype} {tuple(thresh.shape)}")
    pair_out = out.dim() == 3
    if (pair_out and (out.shape[0] != 2 or tuple(out.shape[1:]) != (b, n // 2) or n % 2)) or \
            (not pair_out and tuple(out.shape) != (b, n)):
        raise ValueError(f"out must be [{b}, {n}] or a pair's [2, {b}, {n // 2}], got {tuple(out.shape)}")
    if pair_out and tuple(segments[:1]) != (n // 2,) and s > 1:
        raise ValueError("a pair's out: the first segment boundary must be its half")
    if norm_weight is not None and (pair_in or tuple(norm_weight.shape) != (k,)):
        raise ValueError(f"norm_weight must have shape [{k}] (and x be the stream, not a pair's sums)")
    if b * s * ust.shape[1] > MAX_Z:
        raise ValueError(f"batch × sites × rank must be at most {MAX_Z}, got {b * s * ust.shape[1]}")
    if x.stride(-1) != 1 or v.stride(1) != 1 or ust.stride(1) != 1 or out.stride(-1) != 1:
        raise ValueError("x, v, ust and out must be contiguous along their last dimension")
    if ust.shape[1] == 0:
        return out  # every site's rank is 0: nothing to add
    bounds = list(segments) + [n] * (2 - len(segments))
    torch.ops.actsparse.lowrank_add(x, thresh, v, ust, ranks, out, norm_weight, float(eps), ACTS[gated],
                                    int(bounds[0]), int(bounds[1]))
    return out


@torch.library.custom_op("actsparse::lowrank_add", mutates_args=("out",))
def _lowrank_add_op(x: torch.Tensor, thresh: torch.Tensor, v: torch.Tensor, ust: torch.Tensor, ranks: torch.Tensor,
                    out: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float, gated: int, s1: int,
                    s2: int) -> None:
    b, k = x.shape[-2], x.shape[-1]
    s, r = ranks.numel(), ust.shape[1]
    c, n = s * r, ust.shape[0]
    z = atomic_accumulator(x.device)
    per_k = thresh.dim() == 2 and thresh.shape[1] == k
    block_c = min(128, triton.next_power_of_2(c))
    _lr_in_kernel[(triton.cdiv(k, 64), triton.cdiv(c, block_c), b)](
        x, norm_weight if norm_weight is not None else x, thresh, v, ranks, z, k, c, r,
        x.stride(-2), x.stride(0) if gated else 0, thresh.stride(0), thresh.stride(1) if per_k else 0, v.stride(0), eps,
        NORM=norm_weight is not None, NORM_BLOCK=min(triton.next_power_of_2(k), 4096), GATED=gated,
        BLOCK_K=64, BLOCK_C=block_c, num_warps=4, **pdl_args(x.device))
    pair_out = out.dim() == 3
    block_r = triton.next_power_of_2(r)
    block_n = max(1, min(64, 8192 // block_r))
    programs = min(triton.cdiv(n, block_n), max(1, 2 * num_sms(x.device) // b))
    _lr_out_kernel[(programs, b)](
        z, ust, ranks, out, tile_counters(x.device), b, n, c, r, s1, s2, n // 2 if pair_out else 0,
        out.stride(-2), out.stride(0) if pair_out else 0, ust.stride(0), PAIR=pair_out,
        BLOCK_N=block_n, BLOCK_R=block_r, Z_BLOCK=1024, num_warps=4, **pdl_args(x.device))


@_lowrank_add_op.register_fake
def _(x, thresh, v, ust, ranks, out, norm_weight, eps, gated, s1, s2):
    return None
