"""A plan is data: one rule per hook point, plus what is needed to account for effective sparsity."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..artifacts import load_tensors_json, save_tensors_json
from ..errors import ActsparseError


@dataclass
class Rule:
    """How one hook point is sparsified.

    point: a site name `layers.{i}.{role}` (the rule acts on that site's input and may replace its
        output computation) or an MLP probe `layers.{i}.gate_act` / `layers.{i}.up_out` (acts on that
        module's output).
    kind: a registered rule kind (kinds.py; the shared ones in rules.py) that gives the rule its arithmetic.
    skips: sites whose weight reads a decode step skips in proportion to this point's activation sparsity.
    extra_params: weight elements read per decode step beyond the sparse path (predictors, low-rank factors).
    """
    point: str
    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    skips: list[str] = field(default_factory=list)
    expected_sparsity: float = 0.0
    extra_params: int = 0


@dataclass
class SparsityPlan:
    """The output of fit(): rules by point, the method's params, and site sizes for accounting."""
    method: str
    params: dict
    target: float
    rules: dict[str, Rule]
    site_params: dict[str, int]        # every site of the model -> in*out weight elements
    meta: dict = field(default_factory=dict)
    rule_modules: dict[str, str] = field(default_factory=dict)  # rule kind -> defining module, from load()

    @property
    def key(self) -> str:
        return self.meta.get("plan_key", "")

    @property
    def effective_sparsity(self) -> float:
        """Expected fraction of site weight reads a decode step skips (net of extra reads), from calibration."""
        return effective_sparsity(self, {p: r.expected_sparsity for p, r in self.rules.items()})

    def site_sparsity(self) -> dict[str, float]:
        """Expected skipped fraction of each site's weight reads."""
        return _site_skip(self, {p: r.expected_sparsity for p, r in self.rules.items()})

    def summary(self) -> str:
        """Return a plain-text table: per role, mean expected skip fraction; plus the headline numbers."""
        per_site = self.site_sparsity()
        roles: dict[str, list[float]] = {}
        for site, s in per_site.items():
            roles.setdefault(site.split(".")[-1], []).append(s)
        lines = [f"plan: method={self.method} target={self.target:.3f} "
                 f"effective_sparsity={self.effective_sparsity:.4f} rules={len(self.rules)}",
                 f"params: {self.params}", "role   mean_skip  sites"]
        for role, v in roles.items():
            lines.append(f"{role:<6} {sum(v) / len(v):9.4f}  {len(v)}")
        return "\n".join(lines)

    def save(self, path) -> None:
        """Write the plan to a directory: tensors in safetensors, everything else in JSON (never pickle)."""
        tensors, rules, aliases, first = {}, {}, {}, {}
        for p, r in self.rules.items():
            for k, v in r.tensors.items():
                # a tensor shared by several rules (LaRoSA's per-layer rotation) is written once
                if id(v) in first:
                    aliases[f"{p}/{k}"] = first[id(v)]
                    continue
                first[id(v)] = f"{p}/{k}"
                tensors[f"{p}/{k}"] = v
            rules[p] = {"kind": r.kind, "attrs": r.attrs, "skips": r.skips, "tensors": sorted(r.tensors),
                        "expected_sparsity": r.expected_sparsity, "extra_params": r.extra_params}
        from .kinds import rule_module

        # where each rule kind is defined, so a fresh interpreter can apply the plan without importing its method
        kind_modules = {k: rule_module(k) for k in sorted({r.kind for r in self.rules.values()})}
        save_tensors_json(path, tensors, {"kind": "plan", "method": self.method, "params": self.params,
                                          "target": self.target, "site_params": self.site_params,
                                          "meta": self.meta, "rules": rules, "rule_modules": kind_modules,
                                          "tensor_aliases": aliases})

    @classmethod
    def load(cls, path) -> "SparsityPlan":
        """Read a plan written by save(); raise ActsparseError if missing or corrupt."""
        t, m = load_tensors_json(path)
        if m.get("kind") != "plan":
            raise ActsparseError(f"{path} is not a plan artifact (kind={m.get('kind')!r})")
        for name, target in m.get("tensor_aliases", {}).items():
            t[name] = t[target]
        rules = {p: Rule(p, r["kind"], {k: t[f"{p}/{k}"] for k in r["tensors"]}, r["attrs"], r["skips"],
                         r["expected_sparsity"], r["extra_params"]) for p, r in m["rules"].items()}
        return cls(m["method"], m["params"], m["target"], rules, m["site_params"], m["meta"],
                   {k: v for k, v in m.get("rule_modules", {}).items() if v})


def _site_skip(plan: SparsityPlan, point_sparsity: dict[str, float]) -> dict[str, float]:
    skip = {s: 0.0 for s in plan.site_params}
    for p, r in plan.rules.items():
        for s in r.skips:
            skip[s] = min(1.0, skip.get(s, 0.0) + point_sparsity.get(p, 0.0))
    return skip


def effective_sparsity(plan: SparsityPlan, point_sparsity: dict[str, float]) -> float:
    """Skipped site weight elements minus extra elements read, over all site weight elements."""
    total = sum(plan.site_params.values())
    if total == 0:
        return 0.0
    skip = _site_skip(plan, point_sparsity)
    skipped = sum(plan.site_params[s] * f for s, f in skip.items())
    extra = sum(r.extra_params for r in plan.rules.values())
    return (skipped - extra) / total
