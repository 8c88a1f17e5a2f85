"""Paper-style tables: methods x sparsity (or x task), the dense row, the best entry per column in bold.

A Table is data (rows of formatted cells with bold and footnote marks); it renders as Markdown,
LaTeX (booktabs, escaped) and HTML, so the three always show the same numbers. Each metric has one
precision (Quality.fmt), and "best" is decided on the printed value, so ties that look equal are
all bold. The dense row is the reference, never a competitor: it is not bolded.
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field

import pandas as pd

from .iso import EXTRAPOLATED, LOWER_BOUND, NOT_REACHED
from .pareto import DENSE, GROUP, dense_value, groups
from .quality import EFFECTIVE, SPEEDUP, Quality

DAGGER = "†"
EXTRAPOLATION_NOTE = (f"{DAGGER} extrapolated past the sparsest measured point (≥: at least; no second point to "
                      "extend from); extrapolated values are never bold")


@dataclass
class Cell:
    """One table entry as printed: text (None: missing), bold, and a footnote mark."""
    text: str | None
    bold: bool = False
    mark: str = ""                 # after the value: † (extrapolated), n.s. (within 2 stderr of dense)
    prefix: str = ""               # before it: ≥ (a lower bound)
    err: str = ""                  # its standard error, printed as `± err`


@dataclass
class Row:
    """A labelled row of cells."""
    label: str
    cells: list[Cell]
    rule_before: bool = False      # a \midrule above this row (blocks of sparsity; after the dense row)


@dataclass
class Table:
    """A titled table; `name` is its file stem, `key` the model/eval group it belongs to."""
    title: str
    header: list[str]
    rows: list[Row]
    name: str
    key: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """Return the table as GitHub Markdown, title in bold above it and notes below."""
        def cell(c: Cell) -> str:
            t = "–" if c.text is None else md_escape(c.text)
            t = f"**{t}**" if c.bold and c.text is not None else t
            return c.prefix + t + (f" ± {c.err}" if c.err and c.text is not None else "") + c.mark
        lines = [f"**{md_escape(self.title)}**", "",
                 "| " + " | ".join(md_escape(h) for h in self.header) + " |",
                 "|" + "|".join(["---"] + ["--:"] * (len(self.header) - 1)) + "|"]
        lines += ["| " + " | ".join([md_escape(r.label)] + [cell(c) for c in r.cells]) + " |" for r in self.rows]
        return "\n".join(lines + ([""] + [md_escape(n) for n in self.notes] if self.notes else []))

    def latex(self) -> str:
        """Return the table as a LaTeX `table` with booktabs rules; every text is escaped."""
        def cell(c: Cell) -> str:
            if c.text is None:
                return "--"
            t = latex_escape(c.text)
            err = f"$\\pm${latex_escape(c.err)}" if c.err else ""
            return latex_escape(c.prefix) + (f"\\textbf{{{t}}}" if c.bold else t) + err + latex_escape(c.mark)
        cols = "l" + "r" * (len(self.header) - 1)
        out = ["\\begin{table}[t]", "\\centering", "\\small", f"\\caption{{{latex_escape(self.title)}}}",
               f"\\begin{{tabular}}{{{cols}}}", "\\toprule",
               " & ".join(latex_escape(h) for h in self.header) + " \\\\", "\\midrule"]
        for i, r in enumerate(self.rows):
            if r.rule_before and i > 0:
                out.append("\\midrule")
            out.append(" & ".join([latex_escape(r.label)] + [cell(c) for c in r.cells]) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}"]
        out += [f"\\par\\smallskip{{\\footnotesize {latex_escape(n)}}}" for n in self.notes]
        return "\n".join(out + ["\\end{table}"])

    def html(self) -> str:
        """Return the table as an HTML <table> (caption, header, bold best, rules between blocks)."""
        e = html.escape

        def cell(c: Cell) -> str:
            if c.text is None:
                return '<td class="missing">–</td>'
            t = f"<strong>{e(c.text)}</strong>" if c.bold else e(c.text)
            err = f' <span class="err">± {e(c.err)}</span>' if c.err else ""
            return f"<td>{e(c.prefix)}{t}{err}{f'<sup>{e(c.mark)}</sup>' if c.mark else ''}</td>"
        body = []
        for i, r in enumerate(self.rows):
            cls = [c for c, on in (("rule", r.rule_before and i > 0), ("ref", r.label == DENSE)) if on]
            attr = f' class="{" ".join(cls)}"' if cls else ""
            body.append(f"<tr{attr}><th scope=\"row\">{e(r.label)}</th>{''.join(cell(c) for c in r.cells)}</tr>")
        notes = "".join(f'<p class="note">{e(n)}</p>' for n in self.notes)
        return (f'<table class="paper" id="{e(self.name)}"><caption>{e(self.title)}</caption><thead><tr>'
                + "".join(f"<th>{e(h)}</th>" for h in self.header) + "</tr></thead><tbody>"
                + "".join(body) + "</tbody></table>" + notes)

    def rich(self):
        """Return the table as a rich Table for the terminal: plain text (no Markdown escapes), best in bold."""
        from rich.table import Table as RichTable
        from rich.text import Text

        t = RichTable(title=self.title, title_justify="left", title_style="bold",
                      caption="\n".join(self.notes) or None, caption_justify="left")
        for i, h in enumerate(self.header):
            t.add_column(h, justify="left" if i == 0 else "right")
        for i, r in enumerate(self.rows):
            if r.rule_before and i > 0:
                t.add_section()
            cells = [Text(c.prefix) + Text("–" if c.text is None else c.text, style="bold" if c.bold else "")
                     + Text((f" ± {c.err}" if c.err and c.text is not None else "") + c.mark) for c in r.cells]
            t.add_row(r.label, *cells)
        return t

    def html_block(self, title: str | None = None) -> str:
        """The table with its title above it (not as a narrow caption) and its LaTeX source folded below."""
        e = html.escape
        tbl = self.html().replace(f"<caption>{e(self.title)}</caption>", "", 1)
        return (f'<div class="tblock"><div class="ttitle">{e(title or self.title)}</div>{tbl}'
                f"<details><summary>LaTeX</summary><pre>{e(self.latex())}</pre></details></div>")


# -- escaping -----------------------------------------------------------------------------------------------
_LATEX = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
          "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
          "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
          "×": r"$\times$", "≤": r"$\leq$", "≥": r"$\geq$", "↑": r"$\uparrow$", "↓": r"$\downarrow$",
          "–": "--", "—": "---", "†": r"\textsuperscript{\dag}", "·": r"$\cdot$", "≈": r"$\approx$"}
_LATEX_RE = re.compile("|".join(re.escape(k) for k in _LATEX))


def latex_escape(text: str) -> str:
    """Return text with every LaTeX special character (and the symbols the report prints) made literal."""
    return _LATEX_RE.sub(lambda m: _LATEX[m.group(0)], str(text))


_MD_RE = re.compile(r"([\\`*_|\[\]<>])")


def md_escape(text: str) -> str:
    """Return text with the characters that Markdown tables would interpret backslash-escaped."""
    return _MD_RE.sub(r"\\\1", str(text))


# -- titles and names ---------------------------------------------------------------------------------------
def short_model(name: object) -> str:
    """A model as titles show it: a local folder by its last component, a hub id or bundled name as is."""
    s = str(name)
    return s.rstrip("/").rsplit("/", 1)[-1] if s.startswith(("/", ".", "~")) else s


def group_title(key: dict) -> str:
    """`model tiny-llama, eval bundled:eval, token policy all` for a group key."""
    parts = [("model", short_model(key["model"])) if key.get("model") is not None else None,
             ("eval", key.get("eval_data")) if key.get("eval_data") is not None else None,
             ("token policy", key.get("token_policy")) if key.get("token_policy") is not None else None]
    return ", ".join(f"{a} {b}" for a, b in (p for p in parts if p))


def slug(*parts) -> str:
    """A file-name-safe stem for some parts (model names, metrics)."""
    s = "_".join(re.sub(r"[^A-Za-z0-9._+-]+", "-", short_model(p) if i == 0 else str(p)).strip("-")
                 for i, p in enumerate(parts) if p is not None and str(p) != "")
    return s[:120] or "all"


def group_slug(key: dict) -> str:
    """The file-name stem of a model/eval group."""
    return slug(key.get("model"), key.get("eval_data"), key.get("token_policy"))


# -- cells --------------------------------------------------------------------------------------------------
def _num(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return v


def best_mask(texts: list[str | None], q: Quality) -> list[bool]:
    """Which printed values are the best of their column (ties on the printed value: all); none if < 2 compete."""
    vals = [_num(t) for t in texts]
    if sum(not math.isnan(v) for v in vals) < 2:
        return [False] * len(vals)
    best = q.best(vals)
    return [not math.isnan(best) and v == best for v in vals]


def column_cells(values: list[float | None], q: Quality, marks: list[str] | None = None,
                 compete: list[bool] | None = None) -> list[Cell]:
    """Format one column and bold its best entry among the rows that compete (not the dense row)."""
    texts = [q.fmt(v) for v in values]
    compete = compete or [True] * len(values)
    bold = best_mask([t if c else None for t, c in zip(texts, compete)], q)
    marks = marks or [""] * len(values)
    return [Cell(t, b, "" if t is None or m == "≥" else m, "≥ " if t is not None and m == "≥" else "")
            for t, b, m in zip(texts, bold, marks)]


def _assemble(labels: list[str], columns: list[list[Cell]], rules: list[bool]) -> list[Row]:
    return [Row(lab, [col[i] for col in columns], rule) for i, (lab, rule) in enumerate(zip(labels, rules))]


def _fmt_level(v: float) -> str:
    return f"{v:g}"


# -- the paper tables ---------------------------------------------------------------------------------------
def sparsity_table(g: pd.DataFrame, key: dict, q: Quality, by: str = "sparsity", compete: bool = True) -> Table | None:
    """Methods (dense first) x requested sparsity -> q, best per column in bold (unless not `compete`: the methods
    do not mean the same by a requested sparsity); None when nothing to show."""
    if q.name not in g.columns or not g[q.name].notna().any():
        return None
    sparse = g[(g["method"] != DENSE) & g[q.name].notna()]
    levels = sorted(sparse[by].dropna().unique())
    if not levels:
        return None
    methods = sorted(sparse["method"].dropna().unique())
    dense = 0.0 if q == EFFECTIVE else 1.0 if q == SPEEDUP else dense_value(g, q)
    has_dense = not math.isnan(dense) and (q not in (EFFECTIVE, SPEEDUP) or (g["method"] == DENSE).any())
    labels = ([DENSE] if has_dense else []) + methods
    columns = []
    for lv in levels:
        vals = [dense] if has_dense else []
        for m in methods:
            v = sparse.loc[(sparse["method"] == m) & (sparse[by] == lv), q.name]
            vals.append(float(v.mean()) if len(v) else None)
        columns.append(column_cells(vals, q, compete=[compete and (not has_dense or i > 0) for i in range(len(vals))]))
    rules = ([False] if has_dense else []) + [has_dense and i == 0 for i in range(len(methods))]
    what = {"sparsity": "requested sparsity", "target": "target sparsity"}.get(by, by)
    notes = [] if compete else [NOT_COMPARABLE]
    return Table(f"{q.label} by method and {what} ({group_title(key)})",
                 ["method"] + [_fmt_level(lv) for lv in levels], _assemble(labels, columns, rules),
                 slug("table", group_slug(key), q.name), key, notes)


NOT_COMPARABLE = ("No entry is bold: at one requested sparsity these methods skip different fractions of the weight "
                  "reads (see effective sparsity); compare them on the Pareto front and iso-quality tables.")


def same_meaning(g: pd.DataFrame, by: str = "sparsity", tol: float = 0.02) -> bool:
    """Whether, at every requested sparsity, the methods reach effective sparsities within tol of each other."""
    sparse = g[(g["method"] != DENSE)].dropna(subset=[by, "effective"]) if "effective" in g else g.iloc[:0]
    for _, block in sparse.groupby(by):
        eff = block.groupby("method")["effective"].mean()
        if len(eff) > 1 and eff.max() - eff.min() > tol:
            return False
    return True


def task_table(g: pd.DataFrame, key: dict, tasks: list[Quality], by: str = "sparsity") -> Table | None:
    """Methods x tasks (accuracies ± standard error), one block of rows per requested sparsity; best per column and
    block in bold; a value within 2 standard errors of dense marked n.s."""
    from ..eval.accuracy import significant
    from .quality import stderr_name

    tasks = [t for t in tasks if t.name in g.columns and g[t.name].notna().any()]
    if not tasks:
        return None
    sparse = g[(g["method"] != DENSE)].dropna(subset=[by])
    labels, rules, per_col = [], [], [[] for _ in tasks]
    ses = [Quality(stderr_name(t.name), True) for t in tasks]
    dense = [dense_value(g, t) for t in tasks]
    dense_se = [dense_value(g, s) for s in ses]
    pts = lambda v: None if v is None or math.isnan(v) else f"{100 * v:.2f}"  # noqa: E731
    if not all(math.isnan(d) for d in dense):
        labels.append(DENSE)
        rules.append(False)
        for j, t in enumerate(tasks):
            per_col[j].append(Cell(t.fmt(dense[j]), err=pts(dense_se[j]) or ""))
    n_ns = 0
    for lv in sorted(sparse[by].unique()):
        block = sparse[sparse[by] == lv]
        methods = sorted(block["method"].unique())
        for j, t in enumerate(tasks):
            vals = [block.loc[block["method"] == m, t.name].mean() for m in methods]
            errs = [block.loc[block["method"] == m, ses[j].name].mean() if ses[j].name in block else float("nan")
                    for m in methods]
            cells = column_cells([None if math.isnan(v) else v for v in vals], t)
            for c, v, se in zip(cells, vals, errs):
                c.err = pts(se) or ""
                if significant(v, None if math.isnan(se) else se, dense[j],
                               None if math.isnan(dense_se[j]) else dense_se[j]) is False:
                    c.mark, n_ns = c.mark + " n.s.", n_ns + 1
            per_col[j] += cells
        labels += [f"{m} @ {_fmt_level(lv)}" for m in methods]
        rules += [i == 0 for i in range(len(methods))]
    rows = [Row(lab, [col[i] for col in per_col], rule) for i, (lab, rule) in enumerate(zip(labels, rules))]
    notes = ["± one standard error (lm-eval's, or binomial over the items scored)"] if any(
        c.err for col in per_col for c in col) else []
    notes += ["n.s.: within 2 standard errors of dense, not a significant difference"] if n_ns else []
    cut = g["tags.lm_eval_subsampled"].dropna().unique() if "tags.lm_eval_subsampled" in g else []
    notes += [f"{cut[0]}: figures from a subsample of each task" + (" (in some runs)" if len(cut) > 1 else "")] \
        if len(cut) else []
    return Table(f"Accuracy (%) by task, per requested sparsity ({group_title(key)})",
                 ["method @ sparsity"] + [t.label for t in tasks], rows, slug("tasks", group_slug(key)), key,
                 notes)


def iso_quality_table(iso: pd.DataFrame, key: dict, q: Quality) -> Table | None:
    """Each method's largest effective sparsity and decode speedup within the quality budget, best in bold."""
    if iso.empty:
        return None
    r0 = iso.iloc[0]
    has_speed = iso["speedup"].notna().any()
    marks = {EXTRAPOLATED: DAGGER, LOWER_BOUND: "≥"}

    def col(name: str, quality: Quality, dense: float) -> list[Cell]:
        vals = [dense] + iso[name].tolist()
        status = iso[f"{name}_status"].tolist()
        cells = column_cells([None if v != v else v for v in vals], quality,
                             marks=[""] + [marks.get(s, "") for s in status],
                             compete=[False] + [s not in marks for s in status])   # extrapolations never win
        for c, s in zip(cells[1:], iso[f"{name}_status"]):
            if s == NOT_REACHED:
                c.text, c.bold = "not reached", False
        return cells
    columns = [col("effective", EFFECTIVE, 0.0)] + ([col("speedup", SPEEDUP, 1.0)] if has_speed else [])
    columns.append([Cell(str(int(n)) if i else "–") for i, n in enumerate([0] + iso["n_points"].tolist())])
    labels = [DENSE] + iso["method"].tolist()
    header = ["method", "max effective sparsity ↑"] + (["max decode speedup (×) ↑"] if has_speed else []) + \
        ["measured points"]
    notes = [f"Budget: {r0['budget']} (dense {q.fmt(r0['dense'])}, so {q.name} "
             f"{'≥' if q.higher_is_better else '≤'} {q.fmt(r0['threshold'])}{' %' if q.is_accuracy else ''}); "
             "linear interpolation along each method's Pareto curve from the dense point."]
    if iso[["effective_status", "speedup_status"]].isin([EXTRAPOLATED, LOWER_BOUND]).any().any():
        notes.append(EXTRAPOLATION_NOTE)
    if "searched" in iso.columns and iso["searched"].any():
        found = ", ".join(iso.loc[iso["searched"], "method"].astype(str))
        notes.append(f"Searched ({found}): the effective sparsity of the largest measured target within the budget, "
                     "with a probe outside the budget at most the search's tolerance above it (not interpolated).")
    return Table(f"Iso-quality: {r0['budget']} ({group_title(key)})", header,
                 _assemble(labels, columns, [False, True] + [False] * (len(iso) - 1)),
                 slug("iso_quality", group_slug(key), q.name), key, notes)


def ratio_table(rat: pd.DataFrame, key: dict, q: Quality, what: str = "effective sparsity",
                budget: str = "") -> Table | None:
    """Method (row) / method (column) ratios of the value reached at iso-quality."""
    if rat.empty or rat["ratio"].isna().all():
        return None
    methods = sorted(set(rat["method"]) | set(rat["vs"]))
    rows = []
    for a in methods:
        cells = []
        for b in methods:
            r = rat[(rat["method"] == a) & (rat["vs"] == b)]
            if a == b or r.empty or r["ratio"].isna().all():
                cells.append(Cell("1.00" if a == b else None))
            else:
                text = f"{float(r['ratio'].iloc[0]):.2f}"
                cells.append(Cell(text, float(text) > 1.0, DAGGER if bool(r["extrapolated"].iloc[0]) else ""))
        rows.append(Row(a, cells))
    notes = [f"Row method's {what} at iso-quality ({budget}) divided by the column method's; bold: row beats column."]
    if rat["extrapolated"].any():
        notes.append(f"{DAGGER} one of the two values is extrapolated")
    return Table(f"Iso-quality {what} ratios ({group_title(key)})", ["method"] + [f"÷ {m}" for m in methods], rows,
                 slug("ratios", group_slug(key), q.name, what.split()[-1]), key, notes)


def iso_sparsity_table(iso: pd.DataFrame, key: dict, q: Quality) -> Table | None:
    """Methods x effective sparsity -> quality read off each method's curve (interpolated), best in bold."""
    if iso.empty:
        return None
    levels = sorted(iso["level"].unique())
    methods = sorted(iso["method"].unique())
    dense = float(iso["dense"].iloc[0])
    has_dense = not math.isnan(dense)
    columns = []
    for lv in levels:
        vals, marks = ([dense], [""]) if has_dense else ([], [])
        for m in methods:
            r = iso[(iso["method"] == m) & (iso["level"] == lv)]
            vals.append(None if r.empty or r["value"].isna().all() else float(r["value"].iloc[0]))
            marks.append(DAGGER if not r.empty and r["status"].iloc[0] == EXTRAPOLATED else "")
        compete = [(not has_dense or i > 0) and not mk for i, mk in enumerate(marks)]  # extrapolations never win
        columns.append(column_cells(vals, q, marks, compete=compete))
    labels = ([DENSE] if has_dense else []) + methods
    notes = ["Quality at equal effective sparsity, linearly interpolated along each method's Pareto curve."]
    if (iso["status"] == EXTRAPOLATED).any():
        notes.append(f"{DAGGER} extrapolated outside the method's measured sparsities (never bold)")
    return Table(f"Iso-sparsity: {q.label} at effective sparsity ({group_title(key)})",
                 ["method"] + [_fmt_level(lv) for lv in levels],
                 _assemble(labels, columns,
                           ([False] if has_dense else []) + [has_dense and i == 0 for i in range(len(methods))]),
                 slug("iso_sparsity", group_slug(key), q.name), key, notes)


def front_tables(fr: pd.DataFrame, q: Quality, x: str = "effective") -> list[Table]:
    """The overall Pareto front per group: method, requested sparsity, effective sparsity, speedup, q, q / dense."""
    out = []
    fr = fr[fr["on_front"]] if "on_front" in fr.columns else fr
    for key, g in groups(fr):
        g = g.sort_values("x")
        has_speed = "speedup" in g.columns and g["speedup"].notna().any()
        header = ["method", "requested", "effective sparsity"] + (["decode speedup (×)"] if has_speed else []) + \
            [q.label, f"{q.name} / dense"]
        dense = dense_value(g, q)
        rows = []
        for r in g.itertuples():
            v = getattr(r, "q")
            cells = [Cell(None if r.method == DENSE or r.sparsity != r.sparsity else f"{r.sparsity:g}"),
                     Cell(EFFECTIVE.fmt(r.effective))]
            cells += [Cell(SPEEDUP.fmt(r.speedup))] if has_speed else []
            cells += [Cell(q.fmt(v)), Cell(f"{v / dense:.3f}" if dense == dense and dense else None)]
            rows.append(Row(str(r.method), cells))
        axis = "effective sparsity" if x == "effective" else "decode speedup"
        out.append(Table(f"Pareto front, {q.name} vs {axis} ({group_title(key)})", header, rows,
                         slug("front", group_slug(key), q.name, x), key))
    return out


__all__ = ["Cell", "Row", "Table", "latex_escape", "md_escape", "sparsity_table", "task_table", "iso_quality_table",
           "ratio_table", "iso_sparsity_table", "front_tables", "GROUP", "DENSE"]
