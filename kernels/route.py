"""Mixture-of-experts routing for decode: the router's logits to each token's top-k expert ids and weights, one
launch (torch takes three to five: top-k, softmax, renormalisation, casts).

One program per token holds its E logits in registers, picks the k largest one at a time (the lowest id among
equal logits) and forms the weights in float32: with `renorm`, the softmax of the k picked logits (softmax then
renormalising the top k, Mixtral's and Qwen-MoE's norm_topk_prob, is exactly that); without, the picked entries
of the softmax over all E (Qwen2-MoE's default). With the router's weight (`router=`), the router GEMV runs in the
same launch: programs of a few experts' logits each, the token's last to arrive routing it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import MAX_ACC, MAX_TILES, TL_DTYPES, atomic_accumulator, tile_counters
from .pdl import pdl_args, pdl_prologue



@triton.jit
def _route_kernel(logit_ptr, idx_ptr, w_ptr, E, stride_l, TOP: tl.constexpr, TOP_P2: tl.constexpr,
                  BLOCK_E: tl.constexpr, RENORM: tl.constexpr, W_DTYPE: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    row = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    v = tl.load(logit_ptr + row * stride_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
    _pick(v, e, row, idx_ptr, w_ptr, TOP, TOP_P2, BLOCK_E, RENORM, W_DTYPE)


@triton.jit
def _route_gemv_kernel(x_ptr, r_ptr, lg_ptr, cnt_ptr, idx_ptr, w_ptr, E, D, stride_xb, stride_re,
                       TOP: tl.constexpr, TOP_P2: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_E: tl.constexpr, RENORM: tl.constexpr, W_DTYPE: tl.constexpr, L_DTYPE: tl.constexpr,
                       PDL: tl.constexpr = False):
    """The router GEMV and the routing in one launch: each program forms ROWS experts' logits of one token
    (rounded to the model's dtype, as F.linear returns them) into the self-zeroing sums; the token's last program
    to arrive picks its top-k from all E and zeroes them."""
    pdl_prologue(PDL)
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid * ROWS + tl.arange(0, ROWS)
    live = rows < E
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        xv = tl.load(x_ptr + b * stride_xb + d, mask=d < D, other=0.0).to(tl.float32)
        w = tl.load(r_ptr + rows[:, None] * stride_re + d[None, :], mask=live[:, None] & (d < D)[None, :], other=0.0)
        acc += w.to(tl.float32) * xv[None, :]
    lg = tl.sum(acc, axis=1).to(L_DTYPE).to(tl.float32)
    tl.store(lg_ptr + b * E + rows, lg, mask=live)
    tl.debug_barrier()  # this program's logits are written before it counts itself in
    arrived = tl.atomic_add(cnt_ptr + b, 1, sem="acq_rel")
    if arrived == tl.num_programs(0) - 1:
        tl.store(cnt_ptr + b, 0)
        e = tl.arange(0, BLOCK_E)
        v = tl.load(lg_ptr + b * E + e, mask=e < E, other=float("-inf"), cache_modifier=".cg")
        tl.store(lg_ptr + b * E + e, tl.zeros([BLOCK_E], dtype=tl.float32), mask=e < E)
        _pick(v, e, b, idx_ptr, w_ptr, TOP, TOP_P2, BLOCK_E, RENORM, W_DTYPE)


@triton.jit
def _pick(v, e, row, idx_ptr, w_ptr, TOP: tl.constexpr, TOP_P2: tl.constexpr, BLOCK_E: tl.constexpr,
          RENORM: tl.constexpr, W_DTYPE: tl.constexpr):
    """Row `row`'s top-TOP of the float32 logits v [BLOCK_E] (-inf past E): ids and weights stored."""
    m_all = tl.max(v, axis=0)
    z_all = tl.sum(tl.exp(v - m_all), axis=0)  # over every expert: the weights without renormalisation
    slot = tl.arange(0, TOP_P2)
    picked = tl.full([TOP_P2], float("-inf"), dtype=tl.float32)
    ids = tl.zeros([TOP_P2], dtype=tl.int64)
    left = v
    for t in tl.static_range(TOP):
        m = tl.max(left, axis=0)
        i = tl.min(tl.where(left == m, e, BLOCK_E), axis=0)  # the lowest id of the largest logit left
        picked = tl.where(slot == t, m, picked)
        ids = tl.where(slot == t, i.to(tl.int64), ids)
        left = tl.where(e == i, float("-inf"), left)
    if RENORM:  # softmax of the picked logits (the first is the largest)
        p = tl.exp(picked - tl.max(picked, axis=0))
        w = p / tl.sum(p, axis=0)
    else:
        w = tl.exp(picked - m_all) / z_all
    keep = slot < TOP
    tl.store(idx_ptr + row * TOP + slot, ids, mask=keep)
    tl.store(w_ptr + row * TOP + slot, w.to(W_DTYPE), mask=keep)


def moe_route(logits: torch.Tensor, top_k: int, *, renorm: bool, w_dtype: torch.dtype = torch.float32,
              router: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (expert ids int64 [B, top_k], routing weights [B, top_k] in w_dtype) of router logits [B, E]: the
    top_k largest logits in decreasing order (the lowest id first among equals); weights softmax(logits) at them,
    renormalised to sum 1 with `renorm` (= the softmax of the picked logits). On the device, no host sync: a
    captured graph routes each step anew.

    router: the router's weight [E, D]; `logits` is then the normed hidden state [B, D] and the logits are
    formed in the same launch, x·routerᵀ rounded to x's dtype as `F.linear(x, router)` returns them (one launch
    instead of a GEMV and a routing launch)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D [B, E] and contiguous in E, got shape {tuple(logits.shape)}")
    if router is not None:
        if router.dim() != 2 or router.shape[1] != logits.shape[1] or router.stride(1) != 1:
            raise ValueError(f"router must be [E, D={logits.shape[1]}] and contiguous in D, got shape "
                             f"{tuple(router.shape)}")
        if logits.dtype not in TL_DTYPES:
            raise ValueError(f"x must be float32, float16 or bfloat16, got {logits.dtype}")
    b, e = logits.shape if router is None else (logits.shape[0], router.shape[0])
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in [1, E={e}], got {top_k}")
    if w_dtype not in TL_DTYPES:
        raise ValueError(f"w_dtype must be float32, float16 or bfloat16, got {w_dtype}")
    if router is not None:
        if b * e > MAX_ACC or b > MAX_TILES:
            raise ValueError(f"batch × experts must be at most {MAX_ACC}, got {b} × {e}")
        return torch.ops.actsparse.moe_route_gemv(logits, router, int(top_k), bool(renorm), w_dtype)
    return torch.ops.actsparse.moe_route(logits, int(top_k), bool(renorm), w_dtype)


@torch.library.custom_op("actsparse::moe_route_gemv", mutates_args=())
def _moe_route_gemv_op(x: torch.Tensor, router: torch.Tensor, top_k: int, renorm: bool,
                       w_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    b, d = x.shape
    e = router.shape[0]
    idx = torch.empty(b, top_k, device=x.device, dtype=torch.int64)
    w = torch.empty(b, top_k, device=x.device, dtype=w_dtype)
    rows = 4 if e > 16 else 1
    _route_gemv_kernel[(triton.cdiv(e, rows), b)](
        x, router, atomic_accumulator(x.device), tile_counters(x.device), idx, w, e, d, x.stride(0), router.stride(0),
        TOP=top_k, TOP_P2=triton.next_power_of_2(top_k), ROWS=rows, BLOCK_D=min(1024, triton.next_power_of_2(d)),
        BLOCK_E=triton.next_power_of_2(e), RENORM=renorm, W_DTYPE=TL_DTYPES[w_dtype], L_DTYPE=TL_DTYPES[x.dtype],
        num_warps=4, **pdl_args(x.device))
    return idx, w


@_moe_route_gemv_op.register_fake
def _(x, router, top_k, renorm, w_dtype):
    b = x.shape[0]
    return (x.new_empty((b, top_k), dtype=torch.int64), x.new_empty((b, top_k), dtype=w_dtype))


@torch.library.custom_op("actsparse::moe_route", mutates_args=())
def _moe_route_op(logits: torch.Tensor, top_k: int, renorm: bool,
                  w_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    b, e = logits.shape
    idx = torch.empty(b, top_k, device=logits.device, dtype=torch.int64)
    w = torch.empty(b, top_k, device=logits.device, dtype=w_dtype)
    _route_kernel[(b,)](logits, idx, w, e, logits.stride(0), TOP=top_k, TOP_P2=triton.next_power_of_2(top_k),
                        BLOCK_E=triton.next_power_of_2(e), RENORM=renorm, W_DTYPE=TL_DTYPES[w_dtype], num_warps=1,
                        **pdl_args(logits.device))
    return idx, w


@_moe_route_op.register_fake
def _(logits, top_k, renorm, w_dtype):
    b = logits.shape[0]
    return (logits.new_empty((b, top_k), dtype=torch.int64), logits.new_empty((b, top_k), dtype=w_dtype))
