"""Markdown tables of a run table: methods x target sparsity -> perplexity, and the Pareto front."""
from __future__ import annotations

import math

import pandas as pd

from .pareto import GROUP

DENSE = "dense"


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _groups(df: pd.DataFrame):
    cols = [c for c in GROUP if c in df.columns]
    return df.groupby(cols, dropna=False, sort=True) if cols else [((), df)]


def _title(key) -> str:
    key = key if isinstance(key, tuple) else (key,)
    names = [c for c in GROUP][: len(key)]
    return ", ".join(f"{n} `{k}`" for n, k in zip(names, key) if k is not None and k == k)


def ppl_table(df: pd.DataFrame, value: str = "ppl") -> str:
    """Return Markdown: per model and eval spec, methods (rows, dense first) x requested sparsity -> `value`."""
    out = []
    for key, g in _groups(df):
        sparse = g[g["method"] != DENSE]
        cols = sorted(sparse["sparsity"].dropna().unique()) or sorted(g["sparsity"].dropna().unique())
        rows = []
        dense = g["ppl_dense"].dropna()
        if value == "ppl" and len(dense):
            rows.append([DENSE] + [_fmt(float(dense.iloc[0]))] * len(cols))
        for method, m in sparse.groupby("method", sort=True):
            by_s = m.groupby("sparsity")[value].mean()
            rows.append([method] + [_fmt(float(by_s[s])) if s in by_s else "–" for s in cols])
        if not rows:
            continue
        header = ["method"] + [f"{s:g}" for s in cols]
        out.append(f"**{value}** ({_title(key)}; columns: target sparsity)\n\n" + _markdown(header, rows))
    return "\n\n".join(out)


def front_table(front: pd.DataFrame) -> str:
    """Return Markdown rows of a Pareto front: method, target, effective sparsity, ppl, ppl ratio."""
    out = []
    for key, g in _groups(front):
        rows = [[r.method, _fmt(r.target, 2), _fmt(r.effective), _fmt(r.ppl), _fmt(r.ppl_ratio)]
                for r in g.itertuples()]
        out.append(f"Pareto front, ppl vs effective sparsity ({_title(key)})\n\n"
                   + _markdown(["method", "target", "effective sparsity", "ppl", "ppl / dense"], rows))
    return "\n\n".join(out)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=header, tablefmt="github", disable_numparse=True)
