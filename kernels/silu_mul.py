"""silu(gate) ⊙ up from a fused [B, 2I] gate/up projection output (the dense engine's MLP glue)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import new_output


@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, I, stride_gu, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + I + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("actsparse::silu_mul", mutates_args=())
def _silu_mul_op(gu: torch.Tensor) -> torch.Tensor:
    b, two_i = gu.shape
    i = two_i // 2
    y = new_output((b, i), gu.device, gu.dtype)
    block = 1024
    _silu_mul_kernel[(b, triton.cdiv(i, block))](gu, y, i, gu.stride(0), y.stride(0), BLOCK=block, num_warps=4)
    return y


@_silu_mul_op.register_fake
def _(gu):
    return gu.new_empty((gu.shape[0], gu.shape[1] // 2))


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """Return silu(gu[:, :I]) ⊙ gu[:, I:] as [B, I] for a [B, 2I] gate/up output."""
    if gu.dim() != 2 or gu.shape[1] % 2 or gu.stride(1) != 1:
        raise ValueError(f"gu must be a contiguous [B, 2I] tensor (gate then up), got shape {tuple(gu.shape)}")
    return torch.ops.actsparse.silu_mul(gu)
