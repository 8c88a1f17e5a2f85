"""Pareto fronts over a run table: the cells no other cell beats on both quality and sparsity."""
from __future__ import annotations

import pandas as pd

GROUP = ("model", "eval_data", "token_policy")   # results are comparable only within one model and eval spec


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
