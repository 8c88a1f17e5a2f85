"""Plots (PNG + SVG): Pareto curves, per-layer x per-role measured sparsity heat maps, speedup vs sparsity.

Every figure is written twice, `<stem>.png` (for the HTML page and the MLflow UI) and `<stem>.svg`
(for papers); functions return both paths, PNG first.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from .pareto import DENSE, groups
from .quality import Quality
from .tables import group_title

ROLE_ORDER = ("q", "k", "v", "o", "gate", "up", "down", "gate_act", "up_out", "inter")
_POINT = re.compile(r"^layers\.(\d+)\.(.+)$")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem: Path, dpi: int = 110) -> list[Path]:
    plt = _plt()
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=dpi)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def _colors(methods: list[str]) -> dict[str, tuple]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(sorted(m for m in methods if m != DENSE))}


def pareto_plot(fronts: dict[str, pd.DataFrame], q: Quality, stem: str | Path,
                thresholds: dict[tuple, float] | None = None) -> list[Path]:
    """Write quality vs each x axis (fronts: x column -> pareto.fronts() table), one row per model/eval group.

    Each method: its points (hollow when off its curve) and its curve; the overall front as a dashed
    step line; dense as a star; the iso-quality threshold (keyed by group title) as a dotted line.
    """
    plt = _plt()
    axes_x = [x for x, fr in fronts.items() if not fr.empty]
    keys = sorted({group_title(k) for x in axes_x for k, _ in groups(fronts[x])})
    if not axes_x or not keys:
        raise ValueError(f"nothing to plot for {q.name}")
    methods = sorted({m for x in axes_x for m in fronts[x]["method"].astype(str)})
    color = _colors(methods)
    fig, axes = plt.subplots(len(keys), len(axes_x), figsize=(6.2 * len(axes_x), 4.2 * len(keys)), squeeze=False)
    for j, x in enumerate(axes_x):
        for key, g in groups(fronts[x]):
            ax = axes[keys.index(group_title(key))][j]
            for method, m in g.groupby("method", sort=True):
                m = m.sort_values("x")
                if method == DENSE:
                    ax.plot(m["x"], m["q"], "k*", ms=12, label=DENSE, zorder=5)
                    ax.axhline(float(m["q"].mean()), color="grey", ls=":", lw=1)
                    continue
                c = color[str(method)]
                on = m[m["on_curve"]]
                off = m[~m["on_curve"]]
                d = g[(g["method"] == DENSE) & g["on_curve"]]   # the curve starts at dense, as iso-quality reads it
                line = pd.concat([d[["x", "q"]].iloc[:1], on[["x", "q"]]]).sort_values("x")
                ax.plot(line["x"], line["q"], "-", color=c, zorder=2)
                ax.plot(on["x"], on["q"], "o", color=c, label=str(method), zorder=3)
                if len(off):
                    ax.plot(off["x"], off["q"], "o", mfc="none", color=c, zorder=3)
            f = g[g["on_front"]].sort_values("x")
            if len(f):
                ax.step(f["x"], f["q"], where="post" if q.higher_is_better else "pre", color="black", ls="--",
                        lw=1, alpha=0.6, label="Pareto front")
            thr = (thresholds or {}).get(group_title(key))
            if thr is not None and thr == thr:
                ax.axhline(thr, color="tab:red", ls="-.", lw=1, alpha=0.7, label="iso-quality budget")
            if x == "speedup":
                ax.axvline(1.0, color="grey", lw=0.5)
            ax.set_title(group_title(key), fontsize=9)
            ax.set_xlabel("effective sparsity (fraction of weight reads skipped)" if x == "effective"
                          else "decode speedup over dense (×)")
            ax.set_ylabel(q.label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(stem))


def _grid(per_point: dict[str, float]) -> tuple[list[int], list[str], list[list[float]]]:
    """(layers, roles, matrix[layer][role]) of a {layers.<i>.<role>: sparsity} dict (NaN where absent)."""
    cells: dict[tuple[int, str], float] = {}
    for point, s in per_point.items():
        m = _POINT.match(point)
        if m:
            cells[(int(m[1]), m[2])] = float(s)
    layers = sorted({i for i, _ in cells})
    roles = sorted({r for _, r in cells},
                   key=lambda r: (ROLE_ORDER.index(r.rsplit(".", 1)[-1]) if r.rsplit(".", 1)[-1] in ROLE_ORDER
                                  else len(ROLE_ORDER), r))
    return layers, roles, [[cells.get((i, r), math.nan) for r in roles] for i in layers]


def heatmap_plot(rows: list[tuple[str, list[tuple[str, dict[str, float], float]]]], stem: str | Path,
                 title: str = "") -> list[Path]:
    """Write per-layer x per-role measured activation sparsity: one row of panels per method, one panel per cell.

    rows: [(method, [(panel label, {layers.<i>.<role>: s}, target), ...]), ...].
    """
    plt = _plt()
    import numpy as np

    rows = [(m, [p for p in ps if _grid(p[1])[0]]) for m, ps in rows]
    rows = [(m, ps) for m, ps in rows if ps]
    if not rows:
        raise ValueError("no per-layer sparsity to plot")
    nrow, ncol = len(rows), max(len(ps) for _, ps in rows)
    layers0, roles0, _ = _grid(rows[0][1][0][1])
    w = max(2.6, 0.45 * len(roles0) + 1.2, 6.0 / ncol)
    h = max(2.0, 0.28 * len(layers0) + 1.1)
    fig, axes = plt.subplots(nrow, ncol, figsize=(w * ncol + 1.0, h * nrow + 0.6), squeeze=False,
                             layout="constrained")   # keeps the shared colour bar next to the panels
    im = None
    for r, (method, panels) in enumerate(rows):
        for k in range(ncol):
            ax = axes[r][k]
            if k >= len(panels):
                ax.axis("off")
                continue
            label, pp, target = panels[k]
            layers, roles, mat = _grid(pp)
            a = np.array(mat, dtype=float)
            im = ax.imshow(a, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
            ax.set_xticks(range(len(roles)), roles, rotation=45, ha="right", fontsize=7)
            step = max(1, len(layers) // 16)
            ax.set_yticks(range(0, len(layers), step), [str(i) for i in layers[::step]], fontsize=7)
            if k == 0:
                ax.set_ylabel(f"{method}\nlayer", fontsize=8)
            ax.set_title(label + (f" (target {target:g})" if target == target else ""), fontsize=8)
            if a.size <= 120:  # small grids: print the numbers, readable in a paper
                for (i, j), v in np.ndenumerate(a):
                    if v == v:
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=axes, shrink=0.9, label="measured activation sparsity")
    if title:
        import textwrap

        fig.suptitle("\n".join(textwrap.wrap(title, int(11 * fig.get_size_inches()[0]))), fontsize=9)
    return _save(fig, Path(stem))


def search_plot(df: pd.DataFrame, q: Quality, thresholds: dict[str, float], stem: str | Path) -> list[Path]:
    """Each searched method's probes: quality vs target in probe order, inside/outside the budget, and the
    budget line (thresholds keyed by group title); one panel per model/eval group."""
    plt = _plt()
    s = df[df["search_id"].notna() & df[q.name].notna()] if "search_id" in df.columns and q.name in df.columns \
        else df.iloc[:0]
    if s.empty:
        raise ValueError("no search probes to plot")
    gs = list(groups(s))
    fig, axes = plt.subplots(1, len(gs), figsize=(6.2 * len(gs), 4.2), squeeze=False)
    colors = _colors(s["method"].astype(str).unique().tolist())
    for ax, (key, g) in zip(axes[0], gs):
        thr = thresholds.get(group_title(key))
        for method, m in g.groupby("method", sort=True):
            m = m.sort_values("search_probe") if "search_probe" in m.columns else m
            ok = (m[q.name] >= thr) if (thr is not None and q.higher_is_better) else \
                (m[q.name] <= thr) if thr is not None else pd.Series(True, index=m.index)
            c = colors.get(str(method), "k")
            ax.plot(m["target"], m[q.name], ":", color=c, alpha=0.5)
            ax.scatter(m.loc[ok, "target"], m.loc[ok, q.name], color=c, label=f"{method} (within budget)", zorder=3)
            ax.scatter(m.loc[~ok, "target"], m.loc[~ok, q.name], facecolors="none", edgecolors=c,
                       label=f"{method} (outside)", zorder=3)
            for i, (t, v) in enumerate(zip(m["target"], m[q.name])):
                ax.annotate(str(i + 1), (t, v), textcoords="offset points", xytext=(4, 4), fontsize=8, color=c)
        if thr is not None:
            ax.axhline(thr, color="grey", ls="--", lw=1, label="budget")
        ax.set_xlabel("target sparsity (probe order numbered)")
        ax.set_ylabel(q.label)
        ax.set_title(group_title(key), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(stem))


def speed_plot(df: pd.DataFrame, stem: str | Path) -> list[Path]:
    """Write decode speedup vs effective sparsity per method and group, with the ideal 1/(1-s) line."""
    plt = _plt()
    import numpy as np

    d = df.dropna(subset=["speedup", "effective"])
    d = d[d["method"] != DENSE]
    if d.empty:
        raise ValueError("no decode/speedup metric to plot")
    gl = list(groups(d))
    color = _colors(d["method"].astype(str).unique().tolist())
    fig, axes = plt.subplots(1, len(gl), figsize=(6 * len(gl), 4.2), squeeze=False)
    for ax, (key, g) in zip(axes[0], gl):
        smax = min(0.97, max(0.6, float(g["effective"].max()) * 1.1))
        s = np.linspace(0, smax, 200)
        ax.plot(s, 1 / (1 - s), color="grey", ls="--", lw=1, label="ideal 1/(1−s)")
        for method, m in g.groupby("method", sort=True):
            m = m.sort_values("effective")
            ax.plot(m["effective"], m["speedup"], "o-", color=color[str(method)], label=str(method))
        ax.plot([0], [1], "k*", ms=12, label=DENSE)
        ax.set_ylim(0, max(float(g["speedup"].max()) * 1.2, 1 / (1 - min(smax, float(g["effective"].max()) + 0.05))))
        ax.set_xlabel("effective sparsity")
        ax.set_ylabel("decode speedup over dense (×)")
        ax.set_title(group_title(key), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(stem))
