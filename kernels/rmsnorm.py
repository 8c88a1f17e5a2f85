"""RMSNorm with an optional fused residual add (the dense engine's glue between cuBLAS GEMMs).

add_rmsnorm(x, delta, g) returns (x + delta, rmsnorm(x + delta)·g) in one pass: one launch
instead of an add, a norm and a cast. One program per row; rows are at most a few thousand wide.
Rounding follows HF Llama (normalise, cast, scale by g) or, with scale_in_f32, Gemma (normalise and scale in
float32, one cast: Gemma's g is 1 + w, which the engine keeps in float32).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import TL_DTYPES, new_output
from .pdl import pdl_args, pdl_prologue


@triton.jit
def _rmsnorm_kernel(x_ptr, d_ptr, g_ptr, res_ptr, y_ptr, K, stride_x, stride_d, stride_r, stride_y, eps,
                    HAS_DELTA: tl.constexpr, SCALE_F32: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x += tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0).to(tl.float32)
        # Round the new residual to the stream's dtype before normalising it, as the eager model does.
        xr = x.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + offs, xr, mask=mask)
        x = xr.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd
    if not SCALE_F32:
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
    y = y * g
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_normed_kernel(x_ptr, y_ptr, g_ptr, K, stride_x, stride_y, eps, SCALE_F32: tl.constexpr,
                       OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """x[row] += cast(rmsnorm(y[row])·g), then y[row] = 0 (its producer adds into it again next step)."""
    pdl_prologue(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    y = tl.load(y_ptr + row * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    n = y * tl.rsqrt(tl.sum(y * y, axis=0) / K + eps)
    if not SCALE_F32:
        n = n.to(y_ptr.dtype.element_ty).to(tl.float32)
    n = (n * tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(OUT_DTYPE).to(tl.float32)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    tl.store(x_ptr + row * stride_x + offs, (x.to(tl.float32) + n).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + row * stride_y + offs, tl.zeros([BLOCK], dtype=tl.float32).to(y_ptr.dtype.element_ty),
             mask=mask)




@torch.library.custom_op("actsparse::add_normed", mutates_args=("x", "y"))
def _add_normed_op(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, eps: float, scale_in_f32: bool,
                   out_dtype: torch.dtype) -> None:
    b, k = x.shape
    block = triton.next_power_of_2(k)
    _add_normed_kernel[(b,)](x, y, g, k, x.stride(0), y.stride(0), eps, SCALE_F32=scale_in_f32,
                             OUT_DTYPE=TL_DTYPES[out_dtype], BLOCK=block, num_warps=8 if block >= 4096 else 4,
                             **pdl_args(x.device))


@_add_normed_op.register_fake
def _(x, y, g, eps, scale_in_f32, out_dtype):
    return None


def _launch(x, delta, g, eps, scale_in_f32=False):
    b, k = x.shape
    y = new_output(tuple(x.shape), x.device, x.dtype)
    res = new_output(tuple(x.shape), x.device, x.dtype) if delta is not None else y
    block = triton.next_power_of_2(k)
    _rmsnorm_kernel[(b,)](x, delta if delta is not None else x, g, res, y, k, x.stride(0),
                          delta.stride(0) if delta is not None else 0, res.stride(0), y.stride(0), eps,
                          HAS_DELTA=delta is not None, SCALE_F32=scale_in_f32, BLOCK=block,
                          num_warps=8 if block >= 4096 else 4, **pdl_args(x.device))
    return res, y


@torch.library.custom_op("actsparse::rmsnorm", mutates_args=())
def _rmsnorm_op(x: torch.Tensor, g: torch.Tensor, eps: float, scale_in_f32: bool = False) -> torch.Tensor:
    return _launch(x, None, g, eps, scale_in_f32)[1]


@_rmsnorm_op.register_fake
def _(x, g, eps, scale_in_f32=False):
    return torch.empty_like(x)


@torch.library.custom_op("actsparse::add_rmsnorm", mutates_args=())
def _add_rmsnorm_op(x: torch.Tensor, delta: torch.Tensor, g: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, delta, g, eps)


@_add_rmsnorm_op.register_fake
def _(x, delta, g, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _check(x: torch.Tensor, g: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D [rows, K] and contiguous in K, got shape {tuple(x.shape)}")
    if tuple(g.shape) != (x.shape[1],):
        raise ValueError(f"g must have shape [{x.shape[1]}], got {tuple(g.shape)}")


def rmsnorm(x: torch.Tensor, g: torch.Tensor, eps: float = 1e-6, scale_in_f32: bool = False) -> torch.Tensor:
    """Return rmsnorm(x)·g [B, K] in x's dtype (HF Llama rounding: normalise, cast, then scale; scale_in_f32:
    Gemma's, normalise and scale in float32, then cast)."""
    _check(x, g)
    return torch.ops.actsparse.rmsnorm(x, g, float(eps), bool(scale_in_f32))


def add_rmsnorm(x: torch.Tensor, delta: Optional[torch.Tensor], g: torch.Tensor,
                eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (r, rmsnorm(r)·g) with r = x + delta (the new residual stream), both [B, K]."""
    _check(x, g)
    if delta is None:
        return x, rmsnorm(x, g, eps)
    if delta.shape != x.shape or delta.stride(1) != 1:
        raise ValueError(f"delta must match x's shape {tuple(x.shape)} and be contiguous, got {tuple(delta.shape)}")
    return torch.ops.actsparse.add_rmsnorm(x, delta, g, float(eps))


def add_normed(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, eps: float = 1e-6, scale_in_f32: bool = False,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """x += rmsnorm(y)·g in place and return x, zeroing y: a post-norm between an op and the residual add
    (Gemma's sandwich norms) in one launch, where the op added its raw sums into the zeroed y. The norm rounds as
    `rmsnorm(y, g, eps, scale_in_f32)` does, then to out_dtype (default x's: the model's dtype where x is an fp32
    stream) before the add."""
    _check(y, g)
    if x.shape != y.shape or x.stride(1) != 1:
        raise ValueError(f"x must match y's shape {tuple(y.shape)} and be contiguous in K, got {tuple(x.shape)}")
    dt = x.dtype if out_dtype is None else out_dtype
    if dt not in TL_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {dt}")
    torch.ops.actsparse.add_normed(x, y, g, float(eps), bool(scale_in_f32), dt)
    return x
