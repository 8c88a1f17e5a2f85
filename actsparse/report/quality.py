"""Quality metrics: which way is better (read from the metric's name), how to print them, and budgets vs dense.

Any loss*, */ppl*, */loss*, *loss or */rel_err* is lower-is-better; otherwise the measures declare their quality
metrics' directions (eval/builtin_measures.py: ppl* lower is better, acc* and fidelity* higher). Any other
metric needs an explicit direction (`name:min` or `name:max`), because guessing wrong would silently invert
every front.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable

import pandas as pd

from ..errors import ActsparseError
from ..eval.measures import headline_metrics

_LABELS = {"effective": "effective sparsity", "speedup": "decode speedup (×)", "target": "target sparsity",
           "act_mean": "mean activation sparsity"}


@dataclass(frozen=True)
class Quality:
    """A quality metric of the run table and its direction."""
    name: str                 # column of the run table: ppl, acc/<task>, acc_avg, fidelity/cos, ...
    higher_is_better: bool

    @property
    def is_accuracy(self) -> bool:
        """Whether the metric is an accuracy (printed in percent, budgets in points)."""
        return self.name.lower().startswith("acc")

    @property
    def arrow(self) -> str:
        """↑ when higher is better, ↓ when lower is."""
        return "↑" if self.higher_is_better else "↓"

    @property
    def label(self) -> str:
        """The metric as a column header: `acc/arc_easy (%) ↑`, `ppl ↓`, `decode speedup (×) ↑`."""
        name = _LABELS.get(self.name, self.name)
        return f"{name}{' (%)' if self.is_accuracy else ''} {self.arrow}"

    def better(self, a: float, b: float) -> bool:
        """Whether a is strictly better than b."""
        return a > b if self.higher_is_better else a < b

    def best(self, values: Iterable) -> float:
        """The best of some values (NaN ignored; NaN when there is none)."""
        v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
        if not v:
            return float("nan")
        return max(v) if self.higher_is_better else min(v)

    def fmt(self, v: float | None) -> str | None:
        """The value as printed in every table of the report (one precision per metric); None when missing."""
        if v is None or math.isnan(float(v)):
            return None
        v = float(v)
        if self.name in _LABELS and self.name != "speedup" or self.name.startswith("sparsity"):
            return f"{v:.3f}"                # fractions of weight reads / activations
        if self.is_accuracy and abs(v) <= 1.0:
            return f"{100 * v:.2f}"          # lm-eval accuracies are fractions; papers print percent
        if self.name.lower().startswith("fidelity"):
            return f"{v:.4f}"
        if "ratio" in self.name:
            return f"{v:.3f}"
        return f"{v:.2f}"


def direction_of(name: str) -> bool | None:
    """Return True when higher is better, False when lower is, None when the name does not say."""
    from ..eval.measures import direction_of as declared

    n = name.lower()
    if n.startswith("loss") or n.rsplit("/", 1)[-1].startswith(("ppl", "loss", "rel_err")) or n.endswith("loss"):
        return False       # whoever records it: a perplexity, a loss or an error is lower-is-better
    return declared(name)


def parse_quality(spec: str) -> Quality:
    """Return the Quality for `name` or `name:min` / `name:max` (explicit direction)."""
    spec = spec.strip()
    name, _, how = spec.rpartition(":") if spec.endswith((":min", ":max")) else (spec, "", "")
    if not name:
        raise ActsparseError(f"empty quality metric in {spec!r}; expected e.g. ppl, acc_avg, acc/arc_easy, "
                             "fidelity/cos or name:min / name:max")
    if how:
        return Quality(name, how == "max")
    d = direction_of(name)
    if d is None:
        raise ActsparseError(f"cannot tell whether higher or lower is better for quality metric {name!r}: names "
                             "starting with ppl/loss are lower-is-better, acc/fidelity higher-is-better; "
                             f"say which with {name}:min or {name}:max")
    return Quality(name, d)


def quality_columns(df: pd.DataFrame) -> list[str]:
    """Return the recorded quality metrics of a run table (columns with at least one value), headline ones first."""
    found = [c for c in df.columns if isinstance(c, str) and direction_of(c) is not None
             and not c.endswith(("_dense", "_ratio")) and "_stderr" not in c and pd.api.types.is_numeric_dtype(df[c])
             and df[c].notna().any()]
    head = [c for c in headline_metrics() if c in found]
    return head + sorted(c for c in found if c not in head)


def stderr_name(name: str) -> str:
    """The column of a metric's standard error: acc/x -> acc_stderr/x, acc_norm/x -> acc_norm_stderr/x,
    acc_avg -> acc_avg_stderr."""
    head, sep, tail = name.partition("/")
    return f"{head}_stderr{sep}{tail}"


def default_qualities(df: pd.DataFrame) -> list[Quality]:
    """Return the qualities a report shows when none is asked for: each measure's headline metric (ppl, acc_avg,
    fidelity/cos), else any acc*."""
    found = quality_columns(df)
    head = [c for c in headline_metrics() if c in found]
    if not head:
        head = [c for c in found if c.startswith("acc")][:1] or found[:1]
    return [parse_quality(c) for c in head]


# -- budgets ------------------------------------------------------------------------------------------------
_BUDGET = re.compile(r"^\s*(?P<v>[0-9]*\.?[0-9]+(?:e[-+]?\d+)?)\s*(?P<unit>x|pt|pts|points?|abs)\s*$", re.I)


EFFECTIVE = Quality("effective", True)      # the x axes, as columns of the paper tables
SPEEDUP = Quality("speedup", True)


@dataclass(frozen=True)
class Budget:
    """How much worse than dense a result may be: `1.02x` (ratio), `1pt` (accuracy points) or `0.5abs`."""
    kind: str     # ratio | points | abs
    value: float

    def threshold(self, q: Quality, dense: float, values: Iterable | None = None) -> float:
        """Return the worst quality value inside the budget, given dense's value (and the metric's values)."""
        if self.kind == "ratio":
            if (self.value < 1.0 and not q.higher_is_better) or (self.value > 1.0 and q.higher_is_better):
                want = "at least 1 (e.g. 1.02x)" if not q.higher_is_better else "at most 1 (e.g. 0.99x)"
                raise ActsparseError(f"budget {self.spec} on {q.name} ({'higher' if q.higher_is_better else 'lower'}"
                                     f" is better) would ask for better than dense; the ratio must be {want}")
            return self.value * dense
        step = self.value
        if self.kind == "points":
            vals = [abs(float(v)) for v in (values if values is not None else [dense]) if v == v]
            step *= 0.01 if all(v <= 1.0 for v in vals + [abs(dense)]) else 1.0   # fractions vs percent
        return dense - step if q.higher_is_better else dense + step

    @property
    def spec(self) -> str:
        """The budget as written on the command line (1.02x, 1pt, 0.5abs)."""
        return f"{self.value:g}{'x' if self.kind == 'ratio' else 'pt' if self.kind == 'points' else 'abs'}"

    def describe(self, q: Quality) -> str:
        """The budget in words: `ppl ≤ 1.02 × dense`, `acc_avg drop ≤ 1 point`."""
        if self.kind == "ratio":
            return f"{q.name} {'≥' if q.higher_is_better else '≤'} {self.value:g} × dense"
        if self.kind == "points":
            return f"{q.name} drop ≤ {self.value:g} point{'s' if self.value != 1 else ''}"
        return f"{q.name} {'drop' if q.higher_is_better else 'rise'} ≤ {self.value:g}"


def parse_budget(spec: str | None, q: Quality | None) -> Budget:
    """Return the budget for spec (None: 1.02x for lower-is-better, 1pt for accuracies, 0.99x otherwise).

    With q None only the syntax is checked (the metric is not known yet).
    """
    if spec is None:
        if q is None or not q.higher_is_better:
            return Budget("ratio", 1.02)
        return Budget("points", 1.0) if q.is_accuracy else Budget("ratio", 0.99)
    what = f" for {q.name}" if q else ""
    m = _BUDGET.match(str(spec))
    if not m:
        raise ActsparseError(f"bad quality budget {spec!r}{what}; expected RATIOx (ppl ≤ 1.02 × dense: 1.02x), "
                             "Npt (accuracy drop ≤ 1 point: 1pt) or Nabs (absolute: 0.5abs)")
    v, unit = float(m["v"]), m["unit"].lower()
    kind = "ratio" if unit == "x" else "abs" if unit == "abs" else "points"
    if kind == "ratio" and v <= 0:
        raise ActsparseError(f"budget {spec!r}: a ratio must be positive, e.g. 1.02x")
    b = Budget(kind, v)
    if q is not None:
        if kind == "points" and not q.is_accuracy:
            raise ActsparseError(f"budget {spec!r}: points are for accuracies, and {q.name} is not one; "
                                 "use a ratio (1.02x) or an absolute budget (0.5abs)")
        b.threshold(q, 1.0)   # a ratio on the wrong side of 1 asks for better than dense: say so now
    return b
