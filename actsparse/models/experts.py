"""Fused MoE experts seen per expert: virtual linears and MLPs over transformers 5's 3-D expert weights.

transformers 5 stores each MoE layer's experts as 3-D parameters (`gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I]) with no per-expert modules. Discovery (sites.find_blocks) lists one *virtual* linear per expert and
role (`ExpertLinear`: a view of the fused weight) when a per-expert loop over them reproduces the module's own
forward on random routing; the views are built once per experts module and remembered here, beside the
module, not on it. A layout the loop does not reproduce keeps its experts dense, with a warning. Making the
experts run through that loop is routing's job (moe.py), done only by what hooks a model.
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ActsparseError

# experts module -> its virtual expert MLPs, or None when its layout cannot be routed per expert
_ROUTABLE: "weakref.WeakKeyDictionary[nn.Module, list | None]" = weakref.WeakKeyDictionary()


def is_fused_experts(m: nn.Module) -> bool:
    """transformers 5 experts: 3-D `down_proj` plus 3-D `gate_up_proj` (gated) or `up_proj` parameters."""
    down = getattr(m, "down_proj", None)
    up = getattr(m, "gate_up_proj", None)
    if up is None:
        up = getattr(m, "up_proj", None)
    return (isinstance(down, torch.Tensor) and down.dim() == 3 and isinstance(up, torch.Tensor)
            and up.dim() == 3 and not isinstance(down, nn.Module))


class ExpertLinear(nn.Module):
    """A virtual linear: one expert's rows of a fused 3-D weight, callable (and hookable) like nn.Linear."""

    def __init__(self, experts: nn.Module, param: str, expert: int, rows: slice, in_features: int,
                 out_features: int):
        super().__init__()
        # a plain attribute, not a submodule: the experts module stays the only owner of the weight
        object.__setattr__(self, "_experts", experts)
        self.param, self.expert, self.rows = param, expert, rows
        self.in_features, self.out_features = in_features, out_features

    @property
    def weight(self) -> torch.Tensor:
        """[out, in] view of this expert's slice of the fused parameter."""
        w = getattr(self._experts, self.param)[self.expert]  # [out_all, in], or [in, out_all] if transposed
        if getattr(self._experts, "is_transposed", False):
            w = w.t()
        return w[self.rows]

    @property
    def bias(self) -> torch.Tensor | None:
        if not getattr(self._experts, "has_bias", False):
            return None
        return getattr(self._experts, f"{self.param}_bias")[self.expert][self.rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.param}[{self.expert}][{self.rows.start}:{self.rows.stop}:{self.rows.step}], " \
               f"in_features={self.in_features}, out_features={self.out_features}"


class ExpertAct(nn.Module):
    """One expert's view of the shared activation, so its output can be probed per expert."""

    def __init__(self, act: nn.Module):
        super().__init__()
        object.__setattr__(self, "_act", act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._act(x)


class ExpertMLP(nn.Module):
    """One routed expert as an MLP module: gate_proj / up_proj / down_proj / act_fn, like a dense gated MLP."""

    def __init__(self, experts: nn.Module, e: int, gate: ExpertLinear | None, up: ExpertLinear,
                 down: ExpertLinear):
        super().__init__()
        object.__setattr__(self, "_experts", experts)
        self.expert = e
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        cls_gate = getattr(type(experts), "_apply_gate", None)
        # a model-specific gate (clamped SwiGLU, ...) is applied to the re-assembled gate_up output
        self.default_gate = cls_gate is None or getattr(cls_gate, "__name__", "") == "_default_apply_gate"
        act = getattr(experts, "act_fn", None)
        self.act_fn = ExpertAct(act) if act is not None else None
        if self.act_fn is None and (gate is None or self.default_gate):
            raise ActsparseError(f"{type(experts).__name__} has no act_fn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, H] -> [n, H]
        ex = self._experts
        if self.gate_proj is None:
            h = self.act_fn(self.up_proj(x))
        elif self.default_gate:
            h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        else:
            g, u = self.gate_proj(x), self.up_proj(x)  # [n, I] each
            gu = torch.cat([g, u], -1) if getattr(ex, "is_concatenated", True) else torch.stack([g, u], -1).flatten(-2)
            h = ex._apply_gate(gu)
        y = self.down_proj(h)
        if getattr(ex, "has_post_expert_norm", False):
            y = ex.post_expert_norm(y)
        return y


def _expert_mlps(experts: nn.Module) -> list[ExpertMLP]:
    """Build the virtual per-expert MLPs of a fused experts module."""
    gated = isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
    up_w = experts.gate_up_proj if gated else experts.up_proj
    transposed = getattr(experts, "is_transposed", False)
    n_exp, up_all, hidden = up_w.shape if not transposed else (up_w.shape[0], up_w.shape[2], up_w.shape[1])
    inter = up_all // 2 if gated else up_all
    concat = getattr(experts, "is_concatenated", True)
    if gated and concat:
        rows_gate, rows_up = slice(0, inter), slice(inter, 2 * inter)
    elif gated:
        rows_gate, rows_up = slice(0, None, 2), slice(1, None, 2)
    else:
        rows_gate, rows_up = None, slice(0, inter)
    out = []
    for e in range(n_exp):
        gate = ExpertLinear(experts, "gate_up_proj", e, rows_gate, hidden, inter) if gated else None
        up = ExpertLinear(experts, "gate_up_proj" if gated else "up_proj", e, rows_up, hidden, inter)
        down = ExpertLinear(experts, "down_proj", e, slice(0, hidden), inter, hidden)
        out.append(ExpertMLP(experts, e, gate, up, down))
    return out


def _routing_args(args, kwargs):
    names = {"hidden_states": 0, "top_k_index": 1, "router_indices": 1, "top_k_weights": 2, "routing_weights": 2}
    vals = list(args) + [None] * (3 - len(args))
    for k, v in kwargs.items():
        if k not in names:
            raise TypeError(f"unexpected argument {k!r} to a routed experts forward")
        vals[names[k]] = v
    return vals


def routed_loop(mlps: list[ExpertMLP], scope, *args, **kwargs) -> torch.Tensor:
    """The experts' forward as a loop over their virtual MLPs; the rows of the scope (moe._Scope: the rows to
    sparsify and the handle that does it), if any, are sparsified."""
    x, idx, w = _routing_args(args, kwargs)  # [N, H], [N, k] expert ids, [N, k] routing weights
    out = torch.zeros_like(x)
    rows, handle = (scope.rows, scope.handle()) if scope is not None else (None, None)
    for e in torch.unique(idx).tolist():
        if e < 0 or e >= len(mlps):
            continue  # expert-parallel sentinels
        tok, pos = torch.where(idx == e)  # token rows routed to e, and which of their k slots
        xe = x[tok]  # [n_e, H]
        if rows is None or handle is None:
            ye = mlps[e](xe)
        else:
            with handle.rows(rows[tok]):
                ye = mlps[e](xe)
        out.index_add_(0, tok, (ye * w[tok, pos, None]).to(out.dtype))
    return out


def _self_check(experts: nn.Module, mlps: list[ExpertMLP]) -> float:
    """Relative error of the routed loop against the experts module's own forward, on random routing."""
    p = experts.down_proj
    n_exp, hidden = len(mlps), mlps[0].down_proj.out_features
    k = min(2, n_exp)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, hidden, generator=g).to(p.device, p.dtype)
    idx = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(8)]).to(p.device)
    w = torch.rand(8, k, generator=g).to(p.device, p.dtype)
    with torch.no_grad():
        ref = type(experts).forward(experts, x, idx, w)
        got = routed_loop(mlps, None, x, idx, w)
    return float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def routable_experts(experts: nn.Module, where: str) -> list[ExpertMLP] | None:
    """The virtual expert MLPs of a fused experts module (built and checked once), or None with a warning
    when the per-expert loop does not reproduce its forward (its experts then stay dense)."""
    if experts in _ROUTABLE:
        return _ROUTABLE[experts]
    try:
        mlps = _expert_mlps(experts)
        err = _self_check(experts, mlps)
    except Exception as e:  # an unknown layout: say so, keep the model as it is
        mlps, err, why = None, float("inf"), f"{type(e).__name__}: {e}"
    else:
        why = f"relative error {err:.2e} against its own forward"
    tol = 1e-4 if experts.down_proj.dtype == torch.float32 else 3e-2
    if not err <= tol:
        warnings.warn(f"{type(experts).__name__} at {where}: the fused expert layout is not one actsparse can "
                      f"route per expert ({why}); its experts stay dense (no expert sites)")
        mlps = None
    _ROUTABLE[experts] = mlps
    return mlps
