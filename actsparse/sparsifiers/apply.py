"""sparsify(model, plan): install a plan's rules on a model in place, reversibly, for one backend."""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch

from ..errors import ActsparseError
from ..models.moe import install_routing
from ..models.sites import hook_points
from .plan import SparsityPlan, effective_sparsity
from .kinds import rule_fn

BACKENDS = ("torch", "triton")
_LAST_FRACTION = re.compile(r"^last_fraction=(0(\.\d+)?|1(\.0+)?|\.\d+)$")


def parse_token_policy(policy: str) -> tuple[str, float]:
    """Return (kind, fraction) for 'all', 'decode' or 'last_fraction=f' (0 < f <= 1)."""
    if policy in ("all", "decode"):
        return policy, 1.0
    m = _LAST_FRACTION.match(str(policy))
    if m:
        f = float(m.group(1))
        if 0.0 < f <= 1.0:
            return "last_fraction", f
    raise ActsparseError(f"token_policy must be 'all', 'decode' or 'last_fraction=f' with 0 < f <= 1, got {policy!r}")


class SparsifyHandle:
    """A plan installed on a model: counts measured sparsity; the token mask picks sparsified positions."""

    def __init__(self, model, plan: SparsityPlan, backend: str = "torch", token_policy: str = "all"):
        if not isinstance(plan, SparsityPlan):
            raise ActsparseError(f"plan must be a SparsityPlan (from asp.fit), got {type(plan).__name__}")
        if backend not in BACKENDS:
            raise ActsparseError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton":
            raise ActsparseError("backend='triton' runs in the decode engine (actsparse.engine), not on a "
                                 "transformers model; use backend='torch' for quality evaluation")
        self.model, self.plan, self.backend = model, plan, backend
        self.policy, self.fraction = parse_token_policy(token_policy)
        self.token_policy = token_policy
        install_routing(model)   # MoE experts run through hookable per-expert linears (a no-op elsewhere)
        points = hook_points(model)
        missing = [p for p in plan.rules if p not in points]
        if missing:
            raise ActsparseError(f"plan has rules for points this model lacks: {missing[:5]}; "
                                 "was the plan fitted on another model?")
        self._points = {p: points[p] for p in plan.rules}
        # resolve every rule kind now (importing where it is defined), so an unknown kind fails before hooking
        self._fns = {k: rule_fn(k, plan.rule_modules.get(k)) for k in {r.kind for r in plan.rules.values()}}
        self._undo: list = []
        self._explicit_mask: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self.reset_counters()

    # -- token selection ------------------------------------------------------------------------------
    @contextmanager
    def positions(self, mask: torch.Tensor | None):
        """Within the block, sparsify exactly the positions where mask [B, T] is True (for 'decode')."""
        prev, self._explicit_mask = self._explicit_mask, mask
        try:
            yield
        finally:
            self._explicit_mask = prev

    @contextmanager
    def rows(self, mask: torch.Tensor):
        """Within the block, sparsify exactly the rows where mask (the activations' leading shape) is True, whatever
        the token policy: an MoE block hands each expert the rows of its [B, T] token mask (models/moe.py)."""
        prev, self._rows = self._rows, mask
        try:
            yield
        finally:
            self._rows = prev

    def token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """[B, T] bool of the positions of x [B, T, C] to sparsify under the token policy, or None for all."""
        if self._rows is not None:
            return self._check_mask(self._rows, x)
        if self.policy == "all":
            return None
        t = x.shape[-2] if x.dim() >= 3 else 1
        if self.policy == "last_fraction":
            n = max(1, round(self.fraction * t)) if self.fraction < 1.0 else t
            if n >= t:
                return None
            mask = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
            mask[..., t - n:] = True
            return mask
        # decode: an explicit mask from the evaluator (continuation tokens), else one-token steps only
        if self._explicit_mask is not None:
            return self._check_mask(self._explicit_mask, x)
        return None if t == 1 else torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)

    @staticmethod
    def _check_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        m = mask.to(x.device)
        if m.shape != x.shape[:-1]:
            raise ActsparseError(f"positions mask has shape {tuple(m.shape)}, the activations {tuple(x.shape[:-1])}")
        return m

    # -- hooking --------------------------------------------------------------------------------------
    def _run(self, point: str, x: torch.Tensor, forward):
        rule = self.plan.rules[point]
        fn = self._fns[rule.kind]
        module = self._points[point][0]
        mask = self.token_mask(x)
        if mask is None:
            y, nz = fn(rule, x, forward, module)
            self._count(point, nz, x.numel())
            return y
        if not bool(mask.any()):
            return forward(x)
        y_dense = forward(x)
        y_sel, nz = fn(rule, x[mask], forward, module)  # [n_sel, C]
        self._count(point, nz, int(mask.sum()) * x.shape[-1])
        y = y_dense.clone()
        y[mask] = y_sel.to(y.dtype)
        return y

    def _count(self, point: str, n_zero: torch.Tensor, n: int) -> None:
        self._zeros[point] = self._zeros.get(point, 0) + n_zero
        self._total[point] = self._total.get(point, 0) + n

    def __enter__(self) -> "SparsifyHandle":
        if getattr(self.model, "_actsparse_handle", None) is not None:
            raise ActsparseError("this model already has a plan installed; exit the other sparsify() first")
        for point, (mod, where) in self._points.items():
            if where == "input":
                orig = mod.forward
                had_own = "forward" in mod.__dict__  # an instance-level forward (e.g. accelerate hooks)

                def fwd(x, *a, _p=point, _orig=orig, **k):
                    return self._run(_p, x, lambda t: _orig(t, *a, **k))
                mod.forward = fwd
                self._undo.append(lambda m=mod, o=orig, h=had_own: setattr(m, "forward", o) if h
                                  else m.__dict__.pop("forward", None))
            else:
                h = mod.register_forward_hook(lambda m, args, out, _p=point: self._run(_p, out, lambda t: t))
                self._undo.append(h.remove)
        self.model._actsparse_handle = self
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.model._actsparse_handle = None

    # -- measurement ----------------------------------------------------------------------------------
    def reset_counters(self) -> None:
        """Forget the activations seen so far."""
        self._zeros: dict[str, torch.Tensor] = {}
        self._total: dict[str, int] = {}

    def measured_sparsity(self) -> dict:
        """Return per-point measured activation sparsity, its model-wide mean, per-role means and effective sparsity."""
        per = {p: float(self._zeros[p]) / self._total[p] for p in self._total if self._total[p] > 0}
        roles: dict[str, list[float]] = {}
        for p, s in per.items():
            roles.setdefault(p.split(".", 2)[-1], []).append(s)
        return {"per_point": per,
                "mean": sum(per.values()) / len(per) if per else 0.0,
                "per_role": {r: sum(v) / len(v) for r, v in roles.items()},
                "effective": effective_sparsity(self.plan, per)}


def active_handle(model) -> SparsifyHandle | None:
    """The handle of the plan currently installed on `model`, if any."""
    return getattr(model, "_actsparse_handle", None)


def sparsify(model, plan: SparsityPlan, backend: str = "torch", token_policy: str = "all") -> SparsifyHandle:
    """Return a context manager that installs `plan` on `model` in place and removes it on exit."""
    return SparsifyHandle(model, plan, backend, token_policy)
