"""Pareto fronts over a run table: the cells no other cell beats on both quality and sparsity (or speedup).

Results are comparable only within one model and eval spec (GROUP). Every method has its own curve
(its non-dominated points, with the dense model as the anchor at zero sparsity / speedup 1), and the
overall front is taken over every method's points together.
"""
from __future__ import annotations

import math
from typing import Iterator

import pandas as pd

from ..eval.measures import self_reference
from .quality import Quality

GROUP = ("model", "eval_data", "token_policy")   # results are comparable only within one model and eval spec
DENSE = "dense"
AXES = {"effective": ("effective sparsity", 0.0), "speedup": ("decode speedup", 1.0)}   # x column -> (label, dense x)


def pareto_front(df: pd.DataFrame, x: str = "effective", y: str = "ppl", maximize_x: bool = True,
                 minimize_y: bool = True, by: tuple[str, ...] = GROUP) -> pd.DataFrame:
    """Return the non-dominated rows per group (`by`), sorted by x ascending.

    A row is dominated when another row of its group is at least as good on x and on y and strictly
    better on one of them; of exact duplicates one row is kept.
    """
    keep = []
    cols = [c for c in by if c in df.columns]
    d = df.dropna(subset=[x, y])
    for _, g in (d.groupby(cols, dropna=False, sort=True) if cols else [(None, d)]):
        # best x first; among equal x, best y first -> a row is on the front iff its y beats every row before it
        order = g.sort_values([x, y], ascending=[not maximize_x, minimize_y], kind="mergesort")
        best = None
        for idx, yv in order[y].items():
            if best is None or (yv < best if minimize_y else yv > best):
                keep.append(idx)
                best = yv
    front = df.loc[keep]
    return front.sort_values(cols + [x], kind="mergesort")


def groups(df: pd.DataFrame) -> Iterator[tuple[dict, pd.DataFrame]]:
    """Yield (key dict, rows) per model x eval spec, in a stable order."""
    cols = [c for c in GROUP if c in df.columns]
    if not cols:
        yield {}, df
        return
    for key, g in df.groupby(cols, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        yield {c: (None if (isinstance(k, float) and math.isnan(k)) else k) for c, k in zip(cols, key)}, g


def dense_value(g: pd.DataFrame, q: Quality) -> float:
    """Return dense's value of quality q in one group: its dense run, else a `<q>_dense` column; NaN if none."""
    if "method" in g.columns:
        d = g.loc[g["method"] == DENSE, q.name].dropna() if q.name in g.columns else pd.Series(dtype=float)
        if len(d):
            return float(d.mean())
    col = f"{q.name}_dense"
    if col in g.columns and g[col].notna().any():
        return float(g[col].dropna().iloc[0])
    ref = self_reference()
    if q.name in ref and q.name in g.columns and g[q.name].notna().any():
        return ref[q.name]      # fidelity compares with the dense model: dense scores itself exactly
    return float("nan")


def method_points(g: pd.DataFrame, q: Quality, x: str) -> dict[str, pd.DataFrame]:
    """Return each sparse method's measured (x, quality) points in one group, sorted by x (duplicates averaged)."""
    out = {}
    if q.name not in g.columns or x not in g.columns:
        return out
    for method, m in g[g["method"] != DENSE].groupby("method", sort=True):
        pts = m[[x, q.name]].dropna()
        if len(pts):
            pts = pts.groupby(x, as_index=False)[q.name].mean().sort_values(x)
            out[str(method)] = pts.rename(columns={x: "x", q.name: "q"}).reset_index(drop=True)
    return out


def curve(points: pd.DataFrame, q: Quality, anchor: tuple[float, float] | None = None) -> pd.DataFrame:
    """Return a method's curve: its non-dominated (x, q) points, plus the dense anchor, sorted by x.

    Along the curve x rises and quality strictly worsens, so a quality budget is crossed at most once.
    """
    pts = points[["x", "q"]]
    if anchor is not None and not math.isnan(anchor[1]):
        pts = pd.concat([pd.DataFrame([anchor], columns=["x", "q"]), pts], ignore_index=True)
    f = pareto_front(pts, x="x", y="q", maximize_x=True, minimize_y=not q.higher_is_better, by=())
    return f.sort_values("x", kind="mergesort").reset_index(drop=True)


def fronts(df: pd.DataFrame, q: Quality, x: str = "effective") -> pd.DataFrame:
    """Return every finished point with (x, q) and two flags: on its method's curve, on the overall front.

    The dense run (x = 0 sparsity, or speedup 1) takes part in both, as the anchor every curve starts from.
    """
    rows = []
    x0 = AXES.get(x, ("", float("nan")))[1]
    for key, g in groups(df):
        if q.name not in g.columns or x not in g.columns:
            continue
        g = g.copy()
        dense = g["method"] == DENSE
        g.loc[dense & g[x].isna(), x] = x0          # dense has no decode/speedup metric of its own: it is 1
        pts = g.dropna(subset=[x, q.name])
        if pts.empty:
            continue
        on_front = set(pareto_front(pts, x=x, y=q.name, minimize_y=not q.higher_is_better, by=()).index)
        on_curve = set()
        dense_idx = pts.index[pts["method"] == DENSE]
        for _, m in pts.groupby("method", sort=False):
            f = pareto_front(pts.loc[m.index.union(dense_idx)], x=x, y=q.name, minimize_y=not q.higher_is_better, by=())
            on_curve |= {i for i in f.index if i in m.index}
        pts = pts.assign(x=pts[x], q=pts[q.name], on_curve=pts.index.isin(on_curve),
                         on_front=pts.index.isin(on_front))
        rows.append(pts)
    if not rows:
        return pd.DataFrame(columns=list(df.columns) + ["x", "q", "on_curve", "on_front"])
    out = pd.concat(rows)
    cols = [c for c in GROUP if c in out.columns]
    return out.sort_values(cols + ["method", "x"], kind="mergesort")
