"""The whole gated MLP in two launches: y += W_d·s_d(act(W_g·x_s,g + b_g) ⊙ (W_u·x_s,u + b_u)) (+ b_d).

A gated MLP on the engine's raw path takes four launches today (the compaction pass and the walk of gate|up,
then the same two for the down projection forming act(gate)·up from the pair's raw sums). The down projection
needs every channel of h, but each channel of h needs only its own column of W_g and W_u: a program that owns
BLOCK_I channels can finish h for them and read their rows of W_d^T at once, adding its partial W_d·h into the
output by fp32 atomics. So:

1. The compaction pass of the gather walk (`gather_gemv._compact_kernel`): x̂ = rmsnorm(x)·g (or x), gate's and
   up's selections (threshold, shift or N:M) as two lists of kept channels with their values; with `out=` it
   also zeroes the output.
2. `_mlp_kernel`, one program per BLOCK_I channels of h: walks gate's list over its BLOCK_I columns of W_g^T and
   up's over W_u^T in one loop (`_walk_pair`; or one after the other, `gather_gemv.walk_rows`: only the kept rows
   are read), forms h = act(g + b_g)·(u + b_u) in
   fp32, selects it with down's rule (threshold, shift or N:M, `select_chunk`) and reads only the kept rows of
   its [BLOCK_I, D] block of W_d^T, BLOCK_D columns a step (the next step's tile requested first), adding each step's [B, BLOCK_D] partial into y
   (fp32 atomics; a program whose channels are all dropped reads and adds nothing). Program 0 adds b_d.

No intermediate leaves the program: gate|up's raw sums and h never round-trip through memory, and the down
projection has no compaction pass or launch of its own. The price: D atomics per program (as many as the
one-shot tiles' down at its tile height), and a sum whose order varies from run to run (not bit-reproducible).
Batches 1 to 4 (CUDA-core FMAs, the accumulators grow with the batch; the kept rows are the batch's union).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import GATHER_MAX_BATCH, record_compiled
from .gather_gemv import _compact_kernel, walk_rows
from .gemv_common import ACTS, activate, launch_args, select_chunk
from .pdl import pdl_args, pdl_prologue
from .sparse_gemv import _as_rows, _check_common, _validate_nm


@dataclass(frozen=True)
class MlpConfig:
    """One launch configuration of the fused MLP's second launch (`_mlp_kernel`)."""

    block_i: int = 64  # channels of h a program owns: columns of W_g^T / W_u^T, rows of W_d^T
    block_k: int = 32  # kept input rows a step of the gate and up walks (the joint walk holds 2 × these tiles)
    block_d: int = 128  # output columns a step of the down part
    num_warps: int = 4
    num_stages: int = 1
    depth: int = 2  # two gathered weight tiles in flight in the gate and up walks (apart: joint=False)
    eager: bool = False  # the walks' first indices load beside the count (see GatherConfig.eager; joint=False)
    joint: bool = True  # gate's and up's lists walked in one loop: both matrices' tiles in flight at once
    down_depth: int = 2  # the next W_d tile requested before the current one is summed
    # the joint walk sums each step's products over its rows at once ([block_i] sums, not [block_k, block_i]):
    # a reduction a step, for registers that hold taller tiles in flight instead
    reduce_each: bool = False


# (K, I, D, batch bucket 1 or 4) -> config: winners of `bench_kernels.py --mlp-anatomy` on the GPU.
TUNED_MLP: dict[tuple[int, int, int, int], MlpConfig] = {}


def mlp_config(k: int, i: int, d: int, b: int) -> MlpConfig:
    """The tuned configuration of a shape and batch, else the default: from batch 2 on fewer channels a program
    and fewer rows a step (the FMA accumulators grow with the batch; these compile for sm_90 without spilling)."""
    got = TUNED_MLP.get((k, i, d, 1 if b == 1 else 4))
    if got is not None:
        return got
    if b == 1:
        return MlpConfig()
    return MlpConfig(block_i=32, block_k=32, block_d=64) if b == 2 else MlpConfig(block_i=32, block_k=16,
                                                                                 block_d=64, num_warps=8)


@triton.jit
def _list_step(idx_base, val_rows, pos, count, mb):
    """The indices and values [BLOCK_B, len(pos)] at positions pos of a compacted list (masked past its count)."""
    keep = pos < count
    idx = tl.load(idx_base + pos, mask=keep, other=0, cache_modifier=".cg")
    return idx, tl.load(val_rows + pos[None, :], mask=mb & keep[None, :], other=0.0, cache_modifier=".cg")


@triton.jit
def _rows_tile(w_ptr, rows, mask_r, cols, mask_c, stride_w):
    """The tile [rows, cols] of a row-major W, read where mask_r and mask_c: a walk step's kept rows over a
    program's columns, or the kept rows of W_d^T of a program's channels over a column block."""
    return tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=mask_r[:, None] & mask_c[None, :],
                   other=0.0, eviction_policy="evict_first")


@triton.jit
def _down_add(hs, w, y_rows, offs_d, mask_b, D):
    """Add the program's partial W_d·h_s over the output columns offs_d (w: its rows' tile there) into y."""
    part = tl.sum(hs[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)  # [BLOCK_B, BLOCK_D]
    tl.atomic_add(y_rows + offs_d[None, :], part, mask=mask_b[:, None] & (offs_d < D)[None, :], sem="relaxed")


@triton.jit
def _walk_pair(idx_ptr, val_rows, count_ptr, wg_ptr, wu_ptr, offs_i, mask_i, mask_b, stride_wk, SEG_K: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_I: tl.constexpr, REDUCE_EACH: tl.constexpr):
    """Gate's list over W_g^T's columns offs_i and up's over W_u^T's in one loop, BLOCK_K kept rows of each a step
    (the shorter list's steps past its count masked: no bytes): two tiles of each in flight, their indices two
    steps ahead (REDUCE_EACH: each step's products summed over its rows at once); return (g, u) [BLOCK_B, BLOCK_I]
    in fp32."""
    ar = tl.arange(0, BLOCK_K)
    cg = tl.load(count_ptr)
    cu = tl.load(count_ptr + 1)
    iu_base = idx_ptr + SEG_K
    vu_rows = val_rows + BLOCK_B * SEG_K
    mb = mask_b[:, None]
    ig, xg = _list_step(idx_ptr, val_rows, ar, cg, mb)
    iu, xu = _list_step(iu_base, vu_rows, ar, cu, mb)
    wg = _rows_tile(wg_ptr, ig, ar < cg, offs_i, mask_i, stride_wk)
    wu = _rows_tile(wu_ptr, iu, ar < cu, offs_i, mask_i, stride_wk)
    ig_1, xg_1 = _list_step(idx_ptr, val_rows, BLOCK_K + ar, cg, mb)
    iu_1, xu_1 = _list_step(iu_base, vu_rows, BLOCK_K + ar, cu, mb)
    if REDUCE_EACH:
        acc_g = tl.zeros([BLOCK_B, BLOCK_I], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_B, BLOCK_I], dtype=tl.float32)
    else:
        acc_g = tl.zeros([BLOCK_B, BLOCK_K, BLOCK_I], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_B, BLOCK_K, BLOCK_I], dtype=tl.float32)
    for i in range(0, tl.maximum(cg, cu), BLOCK_K):
        nxt = i + BLOCK_K + ar
        wg_1 = _rows_tile(wg_ptr, ig_1, nxt < cg, offs_i, mask_i, stride_wk)
        wu_1 = _rows_tile(wu_ptr, iu_1, nxt < cu, offs_i, mask_i, stride_wk)
        ig_2, xg_2 = _list_step(idx_ptr, val_rows, nxt + BLOCK_K, cg, mb)
        iu_2, xu_2 = _list_step(iu_base, vu_rows, nxt + BLOCK_K, cu, mb)
        if REDUCE_EACH:
            acc_g += tl.sum(xg[:, :, None] * wg.to(tl.float32)[None, :, :], axis=1)
            acc_u += tl.sum(xu[:, :, None] * wu.to(tl.float32)[None, :, :], axis=1)
        else:
            acc_g += xg[:, :, None] * wg.to(tl.float32)[None, :, :]
            acc_u += xu[:, :, None] * wu.to(tl.float32)[None, :, :]
        wg, wu, xg, xu = wg_1, wu_1, xg_1, xu_1
        ig_1, iu_1, xg_1, xu_1 = ig_2, iu_2, xg_2, xu_2
    if REDUCE_EACH:
        g, u = acc_g, acc_u
    else:
        g, u = tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1)
    return g, u


@triton.jit
def _mlp_kernel(idx_ptr, val_ptr, count_ptr, wg_ptr, wu_ptr, wd_ptr, bias_ptr, td_ptr, md_ptr, bd_ptr, y_ptr,
                B, K, I, D, stride_wk, stride_wd, stride_tdk, stride_yb,
                HAS_BIAS: tl.constexpr, HAS_DSHIFT: tl.constexpr, HAS_DBIAS: tl.constexpr, NM_N: tl.constexpr,
                NM_M: tl.constexpr, ACT: tl.constexpr, EAGER: tl.constexpr, DEPTH: tl.constexpr,
                IEEE: tl.constexpr, BLOCK_B: tl.constexpr, SEG_K: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, JOINT: tl.constexpr = True,
                DOWN_DEPTH: tl.constexpr = 2, REDUCE_EACH: tl.constexpr = False, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    pid = tl.program_id(0)
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < I
    # The compaction pass wrote two lists: gate's selection (slot 0), up's (slot 1), BLOCK_B value rows each.
    val_rows = val_ptr + offs_b[:, None] * SEG_K
    if JOINT:
        g, u = _walk_pair(idx_ptr, val_rows, count_ptr, wg_ptr, wu_ptr, offs_i, mask_i, mask_b, stride_wk, SEG_K,
                          BLOCK_B, BLOCK_K, BLOCK_I, REDUCE_EACH)
    else:
        g, _ = walk_rows(idx_ptr, val_rows, count_ptr, wg_ptr, offs_i, mask_i, mask_b, stride_wk, K, EAGER, DEPTH,
                         False, IEEE, BLOCK_B, BLOCK_K, BLOCK_I)
        u, _ = walk_rows(idx_ptr + SEG_K, val_rows + BLOCK_B * SEG_K, count_ptr + 1, wu_ptr, offs_i, mask_i, mask_b,
                         stride_wk, K, EAGER, DEPTH, False, IEEE, BLOCK_B, BLOCK_K, BLOCK_I)
    if HAS_BIAS:
        g += tl.load(bias_ptr + offs_i, mask=mask_i, other=0.0).to(tl.float32)[None, :]
        u += tl.load(bias_ptr + I + offs_i, mask=mask_i, other=0.0).to(tl.float32)[None, :]
    h = activate(g, ACT) * u  # [BLOCK_B, BLOCK_I], fp32
    hs, rows = select_chunk(h, td_ptr, md_ptr, offs_i, mask_i, mask_b, stride_tdk, HAS_DSHIFT, NM_N, NM_M, BLOCK_B,
                            BLOCK_I)
    keep = rows != 0
    if HAS_DBIAS:
        if pid == 0:
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                bd = tl.load(bd_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                tl.atomic_add(y_ptr + offs_b[:, None] * stride_yb + offs_d[None, :],
                              tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32) + bd[None, :],
                              mask=mask_b[:, None] & mask_d[None, :], sem="relaxed")
    if tl.sum(rows.to(tl.int32), axis=0) > 0:
        ar_d = tl.arange(0, BLOCK_D)
        y_rows = y_ptr + offs_b[:, None] * stride_yb
        if DOWN_DEPTH == 2:  # the next tile on its way while this one is summed and added
            w = _rows_tile(wd_ptr, offs_i, keep, ar_d, ar_d < D, stride_wd)
            for d0 in range(0, D, BLOCK_D):
                nxt = d0 + BLOCK_D + ar_d
                w_1 = _rows_tile(wd_ptr, offs_i, keep, nxt, nxt < D, stride_wd)
                _down_add(hs, w, y_rows, d0 + ar_d, mask_b, D)
                w = w_1
        else:
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + ar_d
                _down_add(hs, _rows_tile(wd_ptr, offs_i, keep, offs_d, offs_d < D, stride_wd), y_rows, offs_d, mask_b,
                          D)


def launch_mlp(x, wg, wu, wd, thresh, shift, bias, down_thresh, down_shift, down_bias, norm_weight, eps, act: int,
               nm_n: int, nm_m: int, y: torch.Tensor, zero_first: bool, cfg: MlpConfig) -> torch.Tensor:
    """Run the compaction pass and `_mlp_kernel` (arguments validated by `sparse_mlp`): add the MLP's output into
    the fp32 y [B, D] in place (zero_first: y receives it instead) and return y."""
    b, k = x.shape
    inter, d = wg.shape[1], wd.shape[1]
    val_b = triton.next_power_of_2(b)
    seg_k = max(16, triton.next_power_of_2(k), nm_m)
    block_k = min(cfg.block_k, seg_k)
    idx = torch.empty(2 * seg_k, device=x.device, dtype=torch.int32)
    val = torch.empty(2 * val_b * seg_k, device=x.device, dtype=torch.float32)
    count = torch.empty(2, device=x.device, dtype=torch.int32)
    ptrs, _, strides, flags = launch_args(x, wg, wu, thresh, shift, None, None, norm_weight, 0, (), nm_n, nm_m, y,
                                          val_b)
    z_total = y.numel() if zero_first else 0
    _compact_kernel[(1, 2)](
        ptrs[0], ptrs[1], ptrs[2], ptrs[3], idx, val, count, y if zero_first else idx, b, k,
        triton.cdiv(z_total, 2), z_total, *strides[:4], 0, eps, NORM=flags["NORM"], NORM_BLOCK=flags["NORM_BLOCK"],
        HAS_SHIFT=flags["HAS_SHIFT"], NM_N=nm_n, NM_M=max(nm_m, 1), GATED=0, GROUPS=1, BLOCK_B=val_b, SEG_K=seg_k,
        ZERO=zero_first, Z_BLOCK=1024, num_warps=4, **pdl_args(x.device))
    dummy = y
    compiled = _mlp_kernel[(triton.cdiv(inter, cfg.block_i),)](
        idx, val, count, wg, wu, wd, bias if bias is not None else dummy, down_thresh,
        down_shift if down_shift is not None else dummy, down_bias if down_bias is not None else dummy, y,
        b, k, inter, d, wg.stride(0), wd.stride(0), down_thresh.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, HAS_DSHIFT=down_shift is not None, HAS_DBIAS=down_bias is not None, NM_N=nm_n,
        NM_M=max(nm_m, 1), ACT=act, EAGER=cfg.eager, DEPTH=cfg.depth, IEEE=wg.dtype == torch.float32,
        BLOCK_B=val_b, SEG_K=seg_k, BLOCK_K=block_k, BLOCK_I=cfg.block_i, BLOCK_D=cfg.block_d, JOINT=cfg.joint,
        DOWN_DEPTH=cfg.down_depth, REDUCE_EACH=cfg.reduce_each, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl_args(x.device))
    record_compiled("mlp_kernel", compiled, k, inter, True)
    return y


@torch.library.custom_op("actsparse::sparse_mlp", mutates_args=("y",))
def _sparse_mlp_op(x: torch.Tensor, wt_gate: torch.Tensor, wt_up: torch.Tensor, wt_down: torch.Tensor,
                   thresh: torch.Tensor, shift: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   down_thresh: torch.Tensor, down_shift: Optional[torch.Tensor], down_bias: Optional[torch.Tensor],
                   norm_weight: Optional[torch.Tensor], eps: float, act: int, nm_n: int, nm_m: int, y: torch.Tensor,
                   zero_first: bool) -> None:
    cfg = mlp_config(x.shape[1], wt_gate.shape[1], wt_down.shape[1], x.shape[0])
    launch_mlp(x, wt_gate, wt_up, wt_down, thresh, shift, bias, down_thresh, down_shift, down_bias, norm_weight, eps,
               act, nm_n, nm_m, y, zero_first, cfg)


def sparse_mlp(
    x: torch.Tensor,
    wt_gate: torch.Tensor,
    wt_up: torch.Tensor,
    wt_down: torch.Tensor,
    thresh: torch.Tensor,
    down_thresh: torch.Tensor,
    *,
    shift: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    down_shift: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    act: str = "silu",
    nm: Optional[tuple[int, int]] = None,
    accumulate: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Add a whole input-sparse gated MLP into `accumulate` (or write it into `out`), two launches, and return it:

        h = act(W_g·x_s,g + b_g) ⊙ (W_u·x_s,u + b_u),   y += W_d·h_s + b_d,
        x_s = (x̂ − m)⊙1[|x̂ − m| > t] per projection (x̂ = rmsnorm(x)·norm_weight or x),  h_s likewise with down's rule.

    x: [B, K], B ≤ 4 (the residual stream when norm_weight is given); wt_gate, wt_up: [K, I] row-major; wt_down:
    W_d^T [I, D] row-major; thresh: float32 [2] or [2, K] (row 0 gate, row 1 up); shift: [2, K]; bias: [2, I] (e.g.
    a shift's W·m folded in); down_thresh: float32 [1] or [I] (or [1, I]); down_shift: [I]; down_bias: [D]; act:
    "silu" or "gelu_tanh"; nm=(N, M): N:M selection of both x̂ and h instead of thresholds. accumulate: a float32
    [B, D] tensor (the fp32 residual stream, or a zeroed buffer a post-norm reads) the output is added into; out:
    the same, written instead (zeroed by the first launch). The down projection's partials meet by fp32 atomics,
    so the sum's order (its last bits) varies between runs. Runs on the gather walk's compaction pass and
    `_mlp_kernel` (module docstring); `TUNED_MLP` holds tiles per shape.
    """
    if (accumulate is None) == (out is None):
        raise ValueError("sparse_mlp adds its output into accumulate= or writes it into out=: give exactly one")
    y = accumulate if out is None else out
    _check_common(x, wt_gate, "wt_gate")
    _check_common(x, wt_up, "wt_up")
    if wt_gate.dim() != 2 or wt_gate.shape != wt_up.shape or wt_gate.stride() != wt_up.stride():
        raise ValueError(f"wt_gate and wt_up must be [in, out] weights of the same shape and strides, got "
                         f"{tuple(wt_gate.shape)}/{wt_gate.stride()} and {tuple(wt_up.shape)}/{wt_up.stride()}")
    b, k = x.shape
    inter = wt_gate.shape[1]
    if b > GATHER_MAX_BATCH:
        raise ValueError(f"sparse_mlp runs batches of at most {GATHER_MAX_BATCH} rows (its FMA accumulators grow "
                         f"with the batch), got {b}; run sparse_gated_mlp and sparse_gemv instead")
    if wt_down.dim() != 2 or wt_down.shape[0] != inter or wt_down.stride(1) != 1:
        raise ValueError(f"wt_down must be the transposed down weight [intermediate={inter}, out_features], "
                         f"row-major, got shape {tuple(wt_down.shape)} and strides {wt_down.stride()}")
    if wt_down.device != x.device or wt_down.dtype != wt_gate.dtype:
        raise ValueError(f"wt_down must be on x's device in the gate's dtype ({x.device}, {wt_gate.dtype}), got "
                         f"{wt_down.device}, {wt_down.dtype}")
    d = wt_down.shape[1]
    name = "accumulate" if out is None else "out"
    if y.dtype != torch.float32 or tuple(y.shape) != (b, d) or not y.is_contiguous() or y.device != x.device:
        raise ValueError(f"{name} must be a contiguous float32 [{b}, {d}] tensor on {x.device}, got {y.dtype} "
                         f"{tuple(y.shape)} on {y.device}")
    thresh = _as_rows(thresh, 2, k, "thresh")
    if down_thresh.dim() == 1 and down_thresh.shape[0] == inter:
        down_thresh = down_thresh[None]
    down_thresh = _as_rows(down_thresh, 1, inter, "down_thresh")[0]
    if shift is not None:
        shift = _as_rows(shift.float(), 2, k, "shift").contiguous()
    if bias is not None and tuple(bias.shape) != (2, inter):
        raise ValueError(f"bias must have shape [2, {inter}] (gate row, up row), got {tuple(bias.shape)}")
    if down_shift is not None:
        if tuple(down_shift.shape) != (inter,):
            raise ValueError(f"down_shift must have shape [{inter}], got {tuple(down_shift.shape)}")
        down_shift = down_shift.float().contiguous()
    if down_bias is not None and tuple(down_bias.shape) != (d,):
        raise ValueError(f"down_bias must have shape [{d}], got {tuple(down_bias.shape)}")
    if bias is not None:
        bias = bias.contiguous()
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"norm_weight must have shape [{k}], got {tuple(norm_weight.shape)}")
    if act not in ACTS or act == "none":
        raise ValueError(f"act must be 'silu' or 'gelu_tanh' (the gate's activation), got {act!r}")
    nm_n, nm_m = _validate_nm(nm)
    block_i = mlp_config(k, inter, d, b).block_i
    if nm_n and block_i % nm_m:
        raise ValueError(f"nm's group size {nm_m} must divide the kernel's {block_i} channels a program")
    torch.ops.actsparse.sparse_mlp(x, wt_gate, wt_up, wt_down, thresh, shift, bias, down_thresh, down_shift,
                                   down_bias, norm_weight, float(eps), ACTS[act], nm_n, nm_m, y, out is not None)
    return y
