"""What the sparse decode path does, per layer and role: the engine's typed plan.

`EnginePlan.layers[i][role]` is a `SiteRule` (a threshold, scalar or per-channel [K], or an N:M pattern; an
optional shift, SCAP's x_s = (x − m)·1[|x − m| > t] with W·m folded into a bias; and the fraction of weight
rows it is expected to skip, which decides cuBLAS vs the kernels). Roles are the engine's sites q k v o gate up
down, plus `gate_act` (CATS: a threshold on act(gate) that selects the up and down rows) and `up_out`
(M-COUNTDOWN: a threshold on up's output that selects the gate and down rows). In a mixture-of-experts layer gate,
up and down are every routed expert's (one rule for all), and `shared_down` is the down input of Qwen2-MoE's shared
expert, whose gate and up read the routed experts' input, under `shared_gate` / `shared_up` or else gate's and up's.
`expert{e}.gate` / `up` / `down` is routed expert e's own rule, over the layer's. A role left out keeps every input.

`from_plan` translates a fitted `SparsityPlan` (actsparse.eval.speed) and `from_names` the name-keyed dicts of
the benchmarks and tests; both build the same structure, which is all `Engine.set_plan` reads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "gate_act", "up_out", "shared_gate", "shared_up", "shared_down")
# one routed expert's own site in a mixture-of-experts layer (a fitted plan's per-expert rules)
EXPERT_ROLE = re.compile(r"^expert(\d+)\.(gate|up|down)$")
Threshold = Union[float, torch.Tensor]
_SITE = re.compile(r"^layers\.(\d+)\.([\w.]+)$")


@dataclass
class SiteRule:
    """One site of one layer: keep x where |x − shift| > thresh."""
    thresh: Threshold = 0.0
    shift: Optional[Threshold] = None
    expected: Optional[float] = None    # fraction of weight rows skipped; None: trust the threshold to pay off
    nm: Optional[tuple[int, int]] = None  # keep the N largest |x − shift| of every M channels instead (thresh unused)
    lowrank: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # R-Sparse: (V [K, r], U·S [N, r]) on what it drops
    # Per-token Top-K instead of the threshold: zero each token's `topk` smallest |x| (or |x_i|·topk_w_i, WINA's
    # score with topk_w [K]); the level is found on the device every step (kernels/topk.py). Batch 1.
    topk: Optional[int] = None
    topk_w: Optional[torch.Tensor] = None


@dataclass
class EnginePlan:
    """One {role: SiteRule} per layer, and the rotated residual stream's bases where a plan rotates (LaRoSA, WINA's
    transform): {(layer, "attn" | "mlp"): (Q [D, D], g [D] the norm weight it folds)}; the rules of q, k, v (attn)
    and gate, up (mlp) then select on the rotated input (engine/rotation.py)."""
    layers: list[dict[str, SiteRule]] = field(default_factory=list)
    rotations: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def empty(cls, n_layers: int) -> "EnginePlan":
        return cls([{} for _ in range(n_layers)])

    def site(self, layer: int, role: str) -> SiteRule:
        """The rule of (layer, role), created empty (threshold 0) when absent; raise ValueError on a bad site."""
        if not 0 <= layer < len(self.layers) or (role not in ROLES and not EXPERT_ROLE.match(role)):
            raise ValueError(f"unknown site layers.{layer}.{role}: expected 'layers.{{i}}.{{role}}' with "
                             f"i < {len(self.layers)} and role in {ROLES} or expert{{e}}.gate/up/down")
        return self.layers[layer].setdefault(role, SiteRule())

    @property
    def expected_sparsity(self) -> dict[str, float]:
        """{layers.i.role: expected skip} of the sites that carry one (for reports)."""
        return {f"layers.{i}.{r}": s.expected for i, L in enumerate(self.layers) for r, s in L.items()
                if s.expected is not None}

    @classmethod
    def from_names(cls, n_layers: int, thresholds: dict[str, Threshold],
                   shifts: Optional[dict[str, Threshold]] = None,
                   expected: Optional[dict[str, float]] = None) -> "EnginePlan":
        """Build a plan from dicts keyed `layers.{i}.{role}` (thresholds, optional shifts, expected skips)."""
        plan = cls.empty(n_layers)

        def at(name: str) -> SiteRule:
            m = _SITE.match(name)
            if not m:
                raise ValueError(f"unknown site {name!r}: expected 'layers.{{i}}.{{role}}' with i < {n_layers} "
                                 f"and role in {ROLES}")
            return plan.site(int(m.group(1)), m.group(2))

        for name, t in thresholds.items():
            at(name).thresh = t
        for name, s in (shifts or {}).items():
            at(name).shift = s
        for name, e in (expected or {}).items():
            at(name).expected = e   # also a skip without a threshold (CATS' up and down)
        return plan
