"""Mixture-of-experts routing for decode: the router's logits to each token's top-k expert ids and weights, one
launch (torch takes three to five: top-k, softmax, renormalisation, casts).

One program per token holds its E logits in registers, picks the k largest one at a time (the lowest id among
equal logits) and forms the weights in float32: with `renorm`, the softmax of the k picked logits (softmax then
renormalising the top k, Mixtral's and Qwen-MoE's norm_topk_prob, is exactly that); without, the picked entries
of the softmax over all E (Qwen2-MoE's default).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import TL_DTYPES
from .pdl import pdl_args, pdl_prologue



@triton.jit
def _route_kernel(logit_ptr, idx_ptr, w_ptr, E, stride_l, TOP: tl.constexpr, TOP_P2: tl.constexpr,
                  BLOCK_E: tl.constexpr, RENORM: tl.constexpr, W_DTYPE: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    row = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    v = tl.load(logit_ptr + row * stride_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
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


def moe_route(logits: torch.Tensor, top_k: int, *, renorm: bool, w_dtype: torch.dtype = torch.float32
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (expert ids int64 [B, top_k], routing weights [B, top_k] in w_dtype) of router logits [B, E]: the
    top_k largest logits in decreasing order (the lowest id first among equals); weights softmax(logits) at them,
    renormalised to sum 1 with `renorm` (= the softmax of the picked logits). On the device, no host sync: a
    captured graph routes each step anew."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D [B, E] and contiguous in E, got shape {tuple(logits.shape)}")
    b, e = logits.shape
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in [1, E={e}], got {top_k}")
    if w_dtype not in TL_DTYPES:
        raise ValueError(f"w_dtype must be float32, float16 or bfloat16, got {w_dtype}")
    return torch.ops.actsparse.moe_route(logits, int(top_k), bool(renorm), w_dtype)


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
