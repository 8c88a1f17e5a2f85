"""act(gate) ⊙ up from a fused [B, 2I] gate/up projection output (the dense engine's MLP glue): silu (SwiGLU) by
default, gelu-tanh for Gemma's GeGLU."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import new_output
from .gemv_common import activate
from .pdl import pdl_args, pdl_prologue
from .sparse_gemv import ACTS


@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, I, stride_gu, stride_y, ACT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_prologue(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + I + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (activate(g, ACT) * u).to(y_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("actsparse::silu_mul", mutates_args=())
def _silu_mul_op(gu: torch.Tensor, act: int) -> torch.Tensor:
    b, two_i = gu.shape
    i = two_i // 2
    y = new_output((b, i), gu.device, gu.dtype)
    block = 1024
    _silu_mul_kernel[(b, triton.cdiv(i, block))](gu, y, i, gu.stride(0), y.stride(0), ACT=act, BLOCK=block,
                                                  num_warps=4, **pdl_args(gu.device))
    return y


@_silu_mul_op.register_fake
def _(gu, act):
    return gu.new_empty((gu.shape[0], gu.shape[1] // 2))


def silu_mul(gu: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """Return act(gu[:, :I]) ⊙ gu[:, I:] as [B, I] for a [B, 2I] gate/up output (act: "silu" or "gelu_tanh")."""
    if gu.dim() != 2 or gu.shape[1] % 2 or gu.stride(1) != 1:
        raise ValueError(f"gu must be a contiguous [B, 2I] tensor (gate then up), got shape {tuple(gu.shape)}")
    if act not in ACTS or act == "none":
        raise ValueError(f"act must be 'silu' or 'gelu_tanh', got {act!r}")
    return torch.ops.actsparse.silu_mul(gu, ACTS[act])
