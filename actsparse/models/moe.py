"""MoE routing: makes fused experts' per-expert views (experts.py) run, hookable and token-policy aware.

Hooks on the virtual linears fire only when the experts run through the per-expert loop, and inside an MoE
block every expert sees rows of flattened tokens, so a token policy cannot tell prefill from decode by shape.
Both are set up by `install_routing(model)`, explicitly, by what hooks a model (sparsify, calibrate,
the fitting code that runs blocks): the experts' forward becomes the loop, and the MoE module's forward hands
the handle's [B, T] token mask to the rows of each call (`SparsifyHandle.rows`). Installing twice changes
nothing.
"""
from __future__ import annotations

import types
import weakref

import torch
from torch import nn

from ..errors import ActsparseError
from .experts import routable_experts, routed_loop
from .sites import find_blocks

# MoE module -> the routing state its wrapped forward reads
_SCOPES: "weakref.WeakKeyDictionary[nn.Module, _Scope]" = weakref.WeakKeyDictionary()


class _Scope:
    """What an MoE module's wrapped forward shares with its routed experts during one call."""

    def __init__(self, model: nn.Module, routed: nn.Module | None, opaque: bool):
        self.model = weakref.ref(model)
        self.routed, self.opaque = routed, opaque
        self.rows: torch.Tensor | None = None   # [N] rows of the flattened tokens to sparsify, during a call

    def handle(self):
        m = self.model()
        return getattr(m, "_actsparse_handle", None) if m is not None else None


def install_routing(model: nn.Module) -> None:
    """Route every MoE block of the model (fused experts through their virtual MLPs, token policies to the rows
    each expert sees); idempotent. A model without MoE blocks is left as it is."""
    for b in find_blocks(model):
        if b.moe is None or b.moe in _SCOPES:
            continue
        scope = _Scope(model, b.moe_routed, b.moe_opaque)
        if b.moe_routed is not None and "forward" not in b.moe_routed.__dict__:
            mlps = routable_experts(b.moe_routed, f"layers.{b.layer}")   # built and checked by discovery
            b.moe_routed.forward = lambda *a, _m=mlps, _s=scope, **k: routed_loop(_m, _s, *a, **k)
        inner = b.moe.__dict__.get("forward")   # an instance-level forward (accelerate hooks) stays inside
        b.moe.forward = types.MethodType(_scoped_forward(scope, inner), b.moe)
        _SCOPES[b.moe] = scope


def _scoped_forward(scope: _Scope, inner):
    def forward(self, hidden_states, *args, **kwargs):
        call = (lambda: inner(hidden_states, *args, **kwargs)) if inner is not None else \
            (lambda: type(self).forward(self, hidden_states, *args, **kwargs))
        handle = scope.handle()
        if handle is None or handle.policy == "all" or hidden_states.dim() < 3:
            return call()
        mask = handle.token_mask(hidden_states)  # [B, T] positions to sparsify, or None for all
        if mask is None:
            return call()  # 2-D rows under 'decode'/'last_fraction' with no mask are all sparsified: as wanted
        if scope.opaque:
            raise ActsparseError(f"{type(self).__name__}: token_policy={handle.token_policy!r} cannot be applied to "
                                 "experts kept as separate modules (their token rows are not visible); use "
                                 "token_policy='all' for this model")
        rows = mask.reshape(-1)  # [N]
        scope.rows = rows
        try:
            with handle.rows(rows):
                return call()
        finally:
            scope.rows = None
    return forward
