"""PNG plots: the Pareto plot of a sweep, and the per-layer measured sparsity of one cell."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .pareto import GROUP
from .tables import DENSE


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def pareto_plot(df: pd.DataFrame, front: pd.DataFrame, path: str | Path) -> Path:
    """Write ppl vs effective sparsity: one curve per method, the dense level, the front; return the path."""
    plt = _plt()
    cols = [c for c in GROUP if c in df.columns]
    groups = list(df.groupby(cols, dropna=False, sort=True)) if cols else [((), df)]
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(6 * max(len(groups), 1), 4.2), squeeze=False)
    for ax, (key, g) in zip(axes[0], groups):
        for method, m in g.groupby("method", sort=True):
            m = m.dropna(subset=["effective", "ppl"]).sort_values("effective")
            if method == DENSE:
                continue
            ax.plot(m["effective"], m["ppl"], "o-", label=method)
        dense = g["ppl_dense"].dropna()
        if len(dense):
            ax.axhline(float(dense.iloc[0]), color="grey", ls=":", lw=1)
            ax.plot([0.0], [float(dense.iloc[0])], "k*", ms=10, label=DENSE)
        f = front.merge(g[["run_id"]], on="run_id") if "run_id" in front else front
        f = f.sort_values("effective")
        if len(f):
            ax.step(f["effective"], f["ppl"], where="pre", color="black", ls="--", lw=1, alpha=0.6,
                    label="Pareto front")
        key = key if isinstance(key, tuple) else (key,)
        ax.set_title(" · ".join(str(k) for k in key if k is not None and k == k), fontsize=9)
        ax.set_xlabel("effective sparsity (fraction of weight reads skipped)")
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def layer_sparsity_plot(per_point: dict[str, float], target: float, path: str | Path, title: str = "") -> Path:
    """Write measured activation sparsity per layer, one line per role, with the target; return the path."""
    plt = _plt()
    roles: dict[str, dict[int, float]] = {}
    for point, s in per_point.items():
        _, layer, role = point.split(".", 2)
        roles.setdefault(role, {})[int(layer)] = s
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for role, by_layer in roles.items():
        layers = sorted(by_layer)
        ax.plot(layers, [by_layer[i] for i in layers], "o-", ms=3, label=role)
    ax.axhline(target, color="black", ls="--", lw=1, label=f"target {target:g}")
    ax.set_xlabel("layer")
    ax.set_ylabel("measured activation sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
