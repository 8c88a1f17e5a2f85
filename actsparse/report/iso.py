"""Iso-quality and iso-sparsity comparisons: linear interpolation along each method's curve.

Iso-quality: for a budget (ppl ≤ 1.02 × dense, accuracy drop ≤ 1 point), the largest effective
sparsity and decode speedup each method reaches, walking its curve (pareto.curve: dense anchor
first, quality strictly worsening) to where the budget is crossed. Past the sparsest measured point
the last segment is extended, and the value says so. Iso-sparsity: each method's quality at given
effective sparsities, read off the same curves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from .pareto import AXES, DENSE, curve, dense_value, groups, method_points
from .quality import Budget, Quality

INTERPOLATED, MEASURED, EXTRAPOLATED = "interpolated", "measured", "extrapolated"
LOWER_BOUND, NOT_REACHED, NO_DATA = "lower bound", "not reached", "no data"


@dataclass(frozen=True)
class Reach:
    """A value read off a curve and how: measured, interpolated, extrapolated, a lower bound, or none."""
    value: float
    status: str

    @property
    def extrapolated(self) -> bool:
        """Whether the value lies past the measured points (extended, or only a lower bound)."""
        return self.status in (EXTRAPOLATED, LOWER_BOUND)

    @property
    def ok(self) -> bool:
        """Whether there is a value at all."""
        return not math.isnan(self.value)


def _lerp(x0: float, y0: float, x1: float, y1: float, y: float) -> float:
    """x where the line through (x0, y0), (x1, y1) takes the value y."""
    return x0 + (y - y0) * (x1 - x0) / (y1 - y0)


def reach(c: pd.DataFrame, q: Quality, threshold: float, x_max: float = math.inf) -> Reach:
    """Return the largest x on curve c (columns x, q; x ascending) whose quality stays within threshold."""
    if c.empty or math.isnan(threshold):
        return Reach(float("nan"), NO_DATA)
    xs, qs = c["x"].tolist(), c["q"].tolist()
    ok = [(v >= threshold) if q.higher_is_better else (v <= threshold) for v in qs]
    if not ok[0]:
        return Reach(float("nan"), NOT_REACHED)        # even its least sparse point misses the budget
    if all(ok):
        if len(xs) < 2:
            return Reach(xs[-1], LOWER_BOUND)
        x = _lerp(xs[-1], qs[-1], xs[-2], qs[-2], threshold)   # extend the last segment to the budget
        return Reach(min(x, x_max), EXTRAPOLATED)
    i = ok.index(False)                                   # first point outside: the budget is crossed in (i-1, i]
    x = _lerp(xs[i - 1], qs[i - 1], xs[i], qs[i], threshold)
    return Reach(x, MEASURED if x == xs[i - 1] else INTERPOLATED)


def value_at(c: pd.DataFrame, x: float) -> Reach:
    """Return the curve's quality at x: interpolated between its points, else extended from its end segment."""
    if c.empty:
        return Reach(float("nan"), NO_DATA)
    xs, qs = c["x"].tolist(), c["q"].tolist()
    for xi, qi in zip(xs, qs):
        if xi == x:
            return Reach(qi, MEASURED)
    if len(xs) < 2:
        return Reach(float("nan"), NO_DATA)
    if xs[0] < x < xs[-1]:
        i = next(j for j, xj in enumerate(xs) if xj > x)
        return Reach(_lerp(qs[i - 1], xs[i - 1], qs[i], xs[i], x), INTERPOLATED)
    a, b = (0, 1) if x < xs[0] else (-2, -1)
    return Reach(_lerp(qs[a], xs[a], qs[b], xs[b], x), EXTRAPOLATED)


def searched_reach(m: pd.DataFrame, q: Quality, threshold: float) -> Reach | None:
    """A search's answer for one method's runs, as a measured point: the effective sparsity of the largest
    passing probe, when a failing probe brackets it at most the search's tolerance above; else None."""
    if "search_id" not in m.columns or q.name not in m.columns:
        return None
    s = m[m["search_id"].notna() & m[q.name].notna() & m["target"].notna()]
    if s.empty:
        return None
    ok = (s[q.name] >= threshold) if q.higher_is_better else (s[q.name] <= threshold)
    good, bad = s[ok], s[~ok]
    if good.empty or bad.empty:
        return None
    best = good.loc[good["target"].idxmax()]
    gap = float(bad.loc[bad["target"] > best["target"], "target"].min()) - float(best["target"])
    tol = float(s["search_tol"].max()) if "search_tol" in s.columns and s["search_tol"].notna().any() else 0.0
    if not (gap == gap and gap <= tol + 1e-9):
        return None
    return Reach(float(best["effective"]), MEASURED)


def _curves(g: pd.DataFrame, q: Quality, x: str) -> dict[str, pd.DataFrame]:
    anchor = (AXES[x][1], dense_value(g, q))
    return {m: curve(p, q, anchor) for m, p in method_points(g, q, x).items()}


def iso_quality(df: pd.DataFrame, q: Quality, budget: Budget) -> pd.DataFrame:
    """Return one row per model/eval group x method: the largest effective sparsity and speedup within budget.

    Columns: the group keys, method, dense, threshold, budget, effective, effective_status, speedup,
    speedup_status, n_points (the method's measured points of this quality).
    """
    rows = []
    for key, g in groups(df):
        dense = dense_value(g, q)
        if math.isnan(dense) or q.name not in g.columns:
            continue
        thr = budget.threshold(q, dense, g[q.name].dropna().tolist())
        eff = _curves(g, q, "effective")
        spd = _curves(g, q, "speedup") if "speedup" in g.columns and g["speedup"].notna().any() else {}
        for method in sorted(eff):
            found = searched_reach(g[g["method"] == method], q, thr)
            e = found or reach(eff[method], q, thr, x_max=1.0)
            s = reach(spd[method], q, thr) if method in spd else Reach(float("nan"), NO_DATA)
            n = int(g.loc[g["method"] == method, q.name].notna().sum())
            rows.append({**key, "quality": q.name, "method": method, "dense": dense, "threshold": thr,
                         "budget": budget.describe(q), "effective": e.value, "effective_status": e.status,
                         "speedup": s.value, "speedup_status": s.status, "n_points": n,
                         "searched": bool(found)})
    return pd.DataFrame(rows)


def ratios(iso: pd.DataFrame, column: str = "effective") -> pd.DataFrame:
    """Return, per group, each ordered method pair (a, b): a's reach / b's, and whether either is extrapolated."""
    rows = []
    if iso.empty:
        return pd.DataFrame(columns=["method", "vs", "ratio", "extrapolated"])
    keys = [c for c in iso.columns if c in ("model", "eval_data", "token_policy", "quality")]
    for key, g in iso.groupby(keys, dropna=False, sort=True):
        key = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        for a in g.itertuples():
            for b in g.itertuples():
                if a.method == b.method:
                    continue
                va, vb = getattr(a, column), getattr(b, column)
                r = va / vb if (va == va and vb == vb and vb != 0) else float("nan")
                ex = getattr(a, f"{column}_status") in (EXTRAPOLATED, LOWER_BOUND) or \
                    getattr(b, f"{column}_status") in (EXTRAPOLATED, LOWER_BOUND)
                rows.append({**key, "method": a.method, "vs": b.method, "ratio": r, "extrapolated": ex})
    return pd.DataFrame(rows)


def iso_sparsity(df: pd.DataFrame, q: Quality, levels: list[float]) -> pd.DataFrame:
    """Return one row per group x method x effective-sparsity level: the quality read off the method's curve."""
    rows = []
    for key, g in groups(df):
        if q.name not in g.columns:
            continue
        dense = dense_value(g, q)
        for method, c in _curves(g, q, "effective").items():
            for lv in levels:
                r = value_at(c, lv)
                rows.append({**key, "quality": q.name, "method": method, "level": lv, "value": r.value,
                             "status": r.status, "dense": dense})
    return pd.DataFrame(rows)


def default_levels(df: pd.DataFrame) -> list[float]:
    """Return the iso-sparsity levels a report uses by default: the sweep's non-zero target sparsities."""
    col = "target" if "target" in df.columns and df["target"].notna().any() else "sparsity"
    if col not in df.columns:
        return []
    sparse = df[df["method"] != DENSE] if "method" in df.columns else df
    return sorted({round(float(v), 4) for v in sparse[col].dropna() if 0 < float(v) < 1})


def headline(iso: pd.DataFrame) -> list[str]:
    """Return the sentences an abstract quotes: per group, the best method's reach vs every other method.

    Only interpolated (or measured) reaches are compared when at least two methods have one; otherwise the
    sentences say that they rest on extrapolation.
    """
    out = []
    if iso.empty:
        return out
    keys = [c for c in ("model", "eval_data", "token_policy", "quality") if c in iso.columns]
    for _, g in iso.groupby(keys, dropna=False, sort=True):
        g = g[g["effective"].notna()]
        solid = g[g["effective_status"].isin([INTERPOLATED, MEASURED])]
        if len(g) >= 2 and solid.empty:   # nothing measured to compare: say so instead of a ratio of guesses
            b = g.iloc[0]
            out.append(f"At {b['budget']} on {b.get('model')}, no method's reach is measured: every one "
                       f"({', '.join(sorted(map(str, g['method'].unique())))}) is extrapolated past its sparsest cell, "
                       "so this budget does not rank them; add sparser cells or tighten the budget.")
            continue
        g = solid if len(solid) >= 2 else g
        if len(g) < 2:
            continue
        best = g.loc[g["effective"].idxmax()]
        for o in g[g["method"] != best["method"]].itertuples():
            s = f"{best['method']} reaches {best['effective'] / o.effective:.2f}× the effective sparsity of " \
                f"{o.method} ({best['effective']:.3f} vs {o.effective:.3f})"
            if best["speedup"] == best["speedup"] and o.speedup == o.speedup:
                s += f" and {best['speedup'] / o.speedup:.2f}× its decode speedup ({best['speedup']:.2f}× vs " \
                     f"{o.speedup:.2f}×)"
            s += f" at {best['budget']} on {best.get('model')}"
            if {best["effective_status"], o.effective_status} & {EXTRAPOLATED, LOWER_BOUND}:
                s += " (extrapolated past the sparsest measured point: add sparser cells to confirm)"
            out.append(s + ".")
    return out
