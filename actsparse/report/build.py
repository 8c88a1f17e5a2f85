"""Write a sweep's report and log it to the parent run.

Into one folder (next to the sweep's results): report.html (one static page: tables, plots,
configuration, versions, links to the MLflow runs), report.md, tables/*.md and *.tex (one per
model and metric, plus tables.tex with all of them), plots/*.png and *.svg, pareto.png (the headline
plot), runs.csv (every run, every column).
"""
from __future__ import annotations

import math
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd

from ..errors import ActsparseError
from . import html as H
from .iso import default_levels, headline, iso_quality, iso_sparsity, ratios
from .pareto import DENSE, fronts, groups
from .plots import heatmap_plot, pareto_plot, search_plot, speed_plot
from .quality import EFFECTIVE, SPEEDUP, Quality, default_qualities, parse_budget, parse_quality, quality_columns
from .runs import RunFilter, find_sweep, layer_sparsity, run_info, run_link, runs_frame
from .tables import (Table, front_tables, group_slug, group_title, iso_quality_table, iso_sparsity_table,
                     ratio_table, same_meaning, slug, sparsity_table, task_table)

_VERSIONS = ("actsparse", "torch", "transformers", "triton", "numpy", "pandas", "matplotlib", "mlflow", "ray",
             "hydra-core", "lm_eval")


@dataclass
class ReportOptions:
    """What a report computes: quality metrics (None: the recorded headline ones), budgets, iso-sparsity levels."""
    qualities: list[str] | None = None          # ppl, acc_avg, acc/<task>, fidelity/cos, name:min|max
    budgets: dict[str, str] = field(default_factory=dict)   # metric -> 1.02x | 1pt | 0.5abs; "" = the first metric
    levels: list[float] | None = None           # effective sparsities of the iso-sparsity tables (None: the targets)
    embed_images: bool = True                   # inline the PNGs: the page works alone (and in the MLflow UI)
    layer_data: dict[str, dict] | None = None   # {run_id: {layers.<i>.<role>: s}}; None: read the runs' artifacts
    filters: str = ""                           # the filters that selected the runs, in words (for the header)


@dataclass
class Report:
    """Where a report was written and what it says (Markdown of the headline tables)."""
    dir: Path
    markdown: Path
    plot: Path | None
    csv: Path
    table: str                    # the first quality by method x requested sparsity (Markdown)
    front: str                    # its Pareto front (Markdown)
    front_rows: pd.DataFrame
    html: Path | None = None
    iso: str = ""                 # the iso-quality tables (Markdown)
    iso_rows: pd.DataFrame = field(default_factory=pd.DataFrame)
    headline: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    lead: list[Table] = field(default_factory=list)     # what the console shows, in order

    def print_to(self, console) -> None:
        """Print the lead tables as terminal tables (no Markdown), the headline, and where the page is."""
        for t in self.lead:
            console.print(t.rich())
            console.print()
        for h in self.headline:
            console.print(h, markup=False, highlight=False)
        console.print(f"HTML report: {self.html.resolve()}" if self.html else f"report: {self.markdown}",
                      markup=False, highlight=False, soft_wrap=True)

    def console_text(self) -> str:
        """What a sweep prints at its end: the paper table, the iso-quality table, and where the page is."""
        parts = [p for p in (self.table, self.iso) if p]
        parts += ["\n".join(self.headline)] if self.headline else []
        parts.append(f"HTML report: {self.html.resolve()}" if self.html else f"report: {self.markdown}")
        return "\n\n".join(parts)


def _qualities(ok: pd.DataFrame, names: list[str] | None) -> list[Quality]:
    if not names:
        return default_qualities(ok)
    qs = [parse_quality(n) for n in names]
    recorded = quality_columns(ok)
    missing = [q.name for q in qs if q.name not in ok.columns or not ok[q.name].notna().any()]
    if missing and len(ok):
        raise ActsparseError(f"quality metric(s) {missing} are not recorded by any finished run of this report; "
                             f"recorded: {', '.join(recorded) or 'none'}")
    return qs


def build_report(df: pd.DataFrame, out_dir: str | Path, title: str, options: ReportOptions | None = None, *,
                 uri: str | None = None, parent_run_id: str | None = None) -> Report:
    """Write the report of a run table (runs.runs_frame) into out_dir; return the Report.

    uri (default: where runs_frame read the table) is used for per-layer artifacts, the parent run's
    configuration and the links to the runs; without one the page says so and shows the rest.
    """
    opt = options or ReportOptions()
    uri = uri or df.attrs.get("tracking_uri")
    ok = df[df["status"] == "FINISHED"] if "status" in df else df
    failed = df[df["status"] == "FAILED"] if "status" in df else df.iloc[:0]
    qs = _qualities(ok, opt.qualities)
    budgets = [parse_budget(opt.budgets.get(q.name) or (opt.budgets.get("") if i == 0 else None), q)
               for i, q in enumerate(qs)]                       # bad input fails here, before anything is written
    has_speed = "speedup" in ok.columns and ok["speedup"].notna().any()
    levels = opt.levels if opt.levels is not None else default_levels(ok)
    out = Path(out_dir)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    csv = out / "runs.csv"
    df.to_csv(csv, index=False)

    # -- numbers: fronts, iso-quality, iso-sparsity, per quality metric ----------------------------------------
    per_q = {}
    for q, budget in zip(qs, budgets):
        fr = {"effective": fronts(ok, q, "effective")}
        if has_speed:
            fr["speedup"] = fronts(ok, q, "speedup")
        iso = iso_quality(ok, q, budget)
        per_q[q.name] = {"q": q, "budget": budget, "fronts": fr, "iso": iso,
                         "ratios": {"effective": ratios(iso, "effective"),
                                    "speedup": ratios(iso, "speedup") if has_speed else pd.DataFrame()},
                         "iso_sparsity": iso_sparsity(ok, q, levels) if levels else pd.DataFrame()}

    # -- tables, per model/eval group ---------------------------------------------------------------------
    tasks = [parse_quality(c) for c in quality_columns(ok) if c.startswith(("acc/", "acc_norm/"))]
    by_group: dict[str, list[Table]] = {}
    tables: list[Table] = []
    lead = {"table": [], "front": [], "iso": []}          # what the console shows: the first quality's tables
    for key, g in groups(ok):
        comparable = same_meaning(g)
        ts: list[Table | None] = [sparsity_table(g, key, q, compete=comparable) for q in qs]
        ts += [sparsity_table(g, key, EFFECTIVE)] + ([sparsity_table(g, key, SPEEDUP)] if has_speed else [])
        ts.append(task_table(g, key, tasks))
        for name, d in per_q.items():
            q = d["q"]
            sel = lambda t: _in_group(t, key)  # noqa: E731
            ts.append(iso_quality_table(sel(d["iso"]), key, q))
            lead["iso"].append(ts[-1])
            ts.append(ratio_table(sel(d["ratios"]["effective"]), key, q, "effective sparsity", d["budget"].describe(q)))
            if has_speed:
                ts.append(ratio_table(sel(d["ratios"]["speedup"]), key, q, "decode speedup", d["budget"].describe(q)))
            if len(d["iso_sparsity"]):
                ts.append(iso_sparsity_table(sel(d["iso_sparsity"]), key, q))
            fts = front_tables(sel(d["fronts"]["effective"]), q, "effective")
            if q == qs[0]:      # results lead with effective sparsity: the first quality's front opens the group
                lead["front"] += fts
                ts = fts + ts
            else:
                ts += fts
        ts = [t for t in ts if t is not None]
        by_group[group_title(key)] = ts
        tables += ts
    files = [csv]
    for t in tables:
        for ext, text in (("md", t.markdown()), ("tex", t.latex())):
            p = out / "tables" / f"{t.name}.{ext}"
            p.write_text(text + "\n")
            files.append(p)
    tex = out / "tables" / "tables.tex"
    tex.write_text("% actsparse report tables; needs \\usepackage{booktabs}\n\n"
                   + "\n\n".join(t.latex() for t in tables) + "\n")
    files.append(tex)

    # -- plots --------------------------------------------------------------------------------------------
    plots: list[tuple[str, Path]] = []          # (caption, png)
    for i, (name, d) in enumerate(per_q.items()):
        q = d["q"]
        if all(f.empty for f in d["fronts"].values()):
            continue
        thr = {group_title(_key_of(r)): r["threshold"] for _, r in d["iso"].drop_duplicates(
            [c for c in ("model", "eval_data", "token_policy") if c in d["iso"].columns]).iterrows()} \
            if len(d["iso"]) else {}
        stem = out / "pareto" if i == 0 else out / "plots" / slug("pareto", q.name)
        paths = pareto_plot(d["fronts"], q, stem, thr)
        files += paths
        plots.append((f"Pareto curves: {q.label} vs effective sparsity"
                      + (" and decode speedup" if has_speed else "") + f"; budget line: {d['budget'].describe(q)}",
                      paths[0]))
        if "search_id" in ok.columns and ok["search_id"].notna().any():
            try:
                paths = search_plot(ok, q, thr, out / "plots" / slug("search", q.name))
            except ValueError:   # no probe recorded this quality
                paths = []
            if paths:
                files += paths
                plots.append((f"Search probes: {q.label} vs target sparsity, in probe order; budget line: "
                              f"{d['budget'].describe(q)}", paths[0]))
    if has_speed:
        paths = speed_plot(ok, out / "plots" / "speedup_vs_sparsity")
        files += paths
        plots.append(("Decode speedup vs effective sparsity, with the ideal 1/(1−s)", paths[0]))
    layer = opt.layer_data
    if layer is None and uri:
        sparse_ids = ok.loc[ok["method"] != DENSE, "run_id"].dropna().astype(str).tolist()
        layer = layer_sparsity(uri, sparse_ids) if sparse_ids else {}
    heat = []
    for key, g in groups(ok):
        rows = []
        for method, m in g[g["method"] != DENSE].groupby("method", sort=True):
            panels = [(f"s={r.sparsity:g}", (layer or {}).get(str(r.run_id)), float(r.target))
                      for r in m.sort_values(["target", "sparsity"]).itertuples()]
            rows.append((str(method), [p for p in panels if p[1]]))
        try:
            paths = heatmap_plot(rows, out / "plots" / slug("sparsity", group_slug(key)),
                                 f"Measured activation sparsity per layer and role ({group_title(key)})")
        except ValueError:  # no run of this group has per-layer data
            continue
        files += paths
        heat.append((f"Measured sparsity per layer × role, one row per method ({group_title(key)})", paths[0]))
    pareto_png = out / "pareto.png" if (out / "pareto.png").exists() and plots else None

    # -- Markdown ---------------------------------------------------------------------------------------------
    first = per_q[qs[0].name] if qs else None
    lead["table"] = [ts[0] for ts in ([t for t in g if t.name.startswith("table_")] for g in by_group.values()) if ts]
    table_md, front_md, iso_md = ("\n\n".join(t.markdown() for t in lead[k] if t is not None)
                                  for k in ("table", "front", "iso"))
    heads = [s for d in per_q.values() for s in headline(d["iso"])]
    md = [f"# {title}", "", f"{len(ok)} finished cell runs, {len(failed)} failed."
          + (f" Filters: {opt.filters}." if opt.filters else ""), ""]
    if heads:
        md += ["## Headline", ""] + [f"- {h}" for h in heads] + [""]
    for gt, ts in by_group.items():
        md += [f"## {gt}", ""]
        for t in ts:
            md += [t.markdown(), ""]
    md += ["## Plots", ""] + [f"![{c}]({p.relative_to(out).as_posix()})" for c, p in plots + heat] + [""]
    if len(failed):
        md += ["## Failed cells", "", "| method | sparsity | error |", "|---|---|---|"]
        md += [f"| {r.method} | {r.sparsity:g} | {str(r.error).splitlines()[0] if r.error else ''} |"
               for r in failed.itertuples()]
        md.append("")
    mdp = out / "report.md"
    mdp.write_text("\n".join(md))
    files.append(mdp)

    # -- HTML ---------------------------------------------------------------------------------------------------
    htmlp = out / "report.html"
    htmlp.write_text(_html(title, ok, failed, df, by_group, plots, heat, heads, opt, uri, parent_run_id, out))
    files.append(htmlp)
    front_rows = first["fronts"]["effective"] if first else pd.DataFrame()
    front_rows = front_rows[front_rows["on_front"]] if "on_front" in front_rows else front_rows
    iso_rows = pd.concat([d["iso"] for d in per_q.values()], ignore_index=True) if per_q else pd.DataFrame()
    return Report(out, mdp, pareto_png, csv, table_md, front_md, front_rows, htmlp, iso_md, iso_rows, heads, tables,
                  files, [t for k in ("front", "iso") for t in lead[k] if t is not None])


def _in_group(t: pd.DataFrame, key: dict) -> pd.DataFrame:
    if t.empty:
        return t
    m = pd.Series(True, index=t.index)
    for c, v in key.items():
        if c in t.columns:
            m &= t[c].isna() if v is None else t[c].eq(v)
    return t[m]


def _key_of(r) -> dict:
    return {c: (None if isinstance(r.get(c), float) and math.isnan(r.get(c)) else r.get(c))
            for c in ("model", "eval_data", "token_policy") if c in r}


# -- the HTML page ----------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Versions of python, the packages a report depends on, and the repository commit (where known)."""
    out = {"python": platform.python_version(), "platform": platform.platform(terse=True)}
    for p in _VERSIONS:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            continue
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            out["actsparse commit"] = commit.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _config(ok: pd.DataFrame) -> tuple[dict, list[str]]:
    """(params equal across the finished runs, names of params that vary): the resolved configuration."""
    cols = [c for c in ok.columns if c.startswith("params.")]
    same, varies = {}, []
    for c in sorted(cols):
        vals = ok[c].dropna().astype(str).unique()
        if len(vals) == 1:
            same[c[len("params."):]] = vals[0]
        elif len(vals) > 1:
            varies.append(c[len("params."):])
    return same, varies


def _html(title: str, ok: pd.DataFrame, failed: pd.DataFrame, df: pd.DataFrame, by_group: dict[str, list[Table]],
          plots: list[tuple[str, Path]], heat: list[tuple[str, Path]], heads: list[str], opt: ReportOptions,
          uri: str | None, parent_run_id: str | None, out: Path) -> str:
    e = H.e
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parents = [p for p in df.get("parent_run_id", pd.Series(dtype=object)).dropna().astype(str).unique()]
    parent = parent_run_id or (parents[0] if len(parents) == 1 else None)
    exp_ids = df.get("experiment_id", pd.Series(dtype=object)).dropna().astype(str).unique()
    exp_id = exp_ids[0] if len(exp_ids) else "0"
    served = bool(uri and uri.startswith(("http://", "https://")))
    sub = f"{len(ok)} finished cell runs, {len(failed)} failed · written {now}"
    if uri:
        sub += f" · MLflow <code>{e(uri)}</code>"
    if parent:
        sub += f' · parent run <a href="{e(run_link(uri, exp_id, parent))}">{e(parent[:12])}</a>'
    if opt.filters:
        sub += f" · filters: {e(opt.filters)}"
    sections = []
    if heads:
        sections.append(("headline", "Headline", "".join(f'<p class="headline">{e(h)}</p>' for h in heads)))
    for i, (gt, ts) in enumerate(by_group.items()):
        body = "".join(t.html_block(t.title.replace(f" ({gt})", "")) for t in ts)
        sections.append((f"group{i}", gt or "Results", f'<div class="tables">{body}</div>'))
    if plots:
        sections.append(("plots", "Pareto curves and speed",
                         "".join(H.figure(p, out, c, opt.embed_images) for c, p in plots)))
    if heat:
        sections.append(("sparsity", "Measured sparsity per layer and role",
                         "".join(H.figure(p, out, c, opt.embed_images) for c, p in heat)))
    elif len(ok[ok["method"] != DENSE]) if len(ok) else False:
        sections.append(("sparsity", "Measured sparsity per layer and role",
                         '<p class="warn">No per-layer data: the runs have no measured_sparsity.json artifact '
                         "(or the tracking URI was not given).</p>"))
    if len(failed):
        rows = "".join(f"<tr><td>{e(str(r.method))}</td><td>{e(f'{r.sparsity:g}' if r.sparsity == r.sparsity else '')}"
                       f"</td><td>{e(str(r.error or '').splitlines()[0] if r.error else '')}</td></tr>"
                       for r in failed.itertuples())
        sections.append(("failed", "Failed cells", '<table class="runs"><thead><tr><th>method</th><th>sparsity</th>'
                         f"<th>error</th></tr></thead><tbody>{rows}</tbody></table>"))
    qcols = [c for c in quality_columns(ok)][:6]
    cols = [("run", "run_id"), ("status", "status"), ("model", "model"), ("method", "method"),
            ("requested", "sparsity"), ("target", "target"), ("effective", "effective"), ("act mean", "act_mean")]
    cols += [(c, c) for c in qcols] + ([("speedup", "speedup")] if "speedup" in df and df["speedup"].notna().any()
                                       else [])
    cols += [("device", "device"), ("started", "start_time"), ("error", "error")]

    def link(r):
        return run_link(uri, r.get("experiment_id") or exp_id, str(r["run_id"]))

    def artifacts(r):
        a = r.get("artifact_uri")
        if isinstance(a, str) and a.startswith("/"):
            return "file://" + a
        return a if isinstance(a, str) and a.startswith("file://") else None
    note = "" if served else (f'<p class="note">Run links open the MLflow UI once it serves this store: '
                              f"<code>mlflow ui --backend-store-uri {e(uri or '<tracking uri>')}</code> "
                              "(then http://127.0.0.1:5000).</p>")
    sections.append(("runs", "Runs", note + H.runs_table(df, cols, link, artifacts)))
    cfg = []
    if uri and parent:
        try:
            info = run_info(uri, parent)
            cfg.append("<h3>Sweep (parent run)</h3>" + H.kv_table({**info["params"], **info["tags"]}))
        except Exception as ex:  # a deleted parent or an unreachable server: the rest of the page still stands
            cfg.append(f'<p class="warn">cannot read the parent run {e(parent)}: {e(str(ex).splitlines()[0])}</p>')
    same, varies = _config(ok)
    if same:
        cfg.append("<h3>Resolved configuration shared by every finished cell</h3>"
                   + H.pre("\n".join(f"{k}: {v}" for k, v in same.items())))
    if varies:
        cfg.append("<p>Varies across cells (see the runs): " + ", ".join(f"<code>{e(v)}</code>" for v in varies)
                   + "</p>")
    sections.append(("config", "Configuration", "".join(cfg) or "<p>No parameters recorded.</p>"))
    sections.append(("versions", "Versions", "<p class=\"note\">Of the environment that wrote this report.</p>"
                     + H.kv_table(versions()) + H.kv_table({"generated": now})))
    return H.page(title, sub, sections)


# -- entry points -------------------------------------------------------------------------------------------------
def report_sweep(uri: str, experiment: str, sweep_id: str | None = None, out_root: str | Path = "sweep_results",
                 all_runs: bool = False, log_to_parent: bool = True, filters: RunFilter | None = None,
                 options: ReportOptions | None = None) -> Report:
    """Build the report of a sweep (the latest, or sweep_id; or every finished cell run) from MLflow; return it."""
    opt = options or ReportOptions()
    filters = filters or RunFilter()
    if filters:
        opt.filters = filters.describe()
    if all_runs:
        df = filters.apply(runs_frame(uri, experiment))
        name = "all" if not filters else slug("all", filters.describe())[:80]
        what = "every finished cell" + (f" matching {filters.describe()}" if filters else "")
        return build_report(df, Path(out_root) / name, f"Report of {what} in experiment {experiment}", opt, uri=uri)
    sweep = find_sweep(uri, experiment, sweep_id)
    return sweep_report(uri, experiment, sweep["sweep_id"], sweep["run_id"],
                        [c["run_id"] for c in sweep["cells"] if c.get("run_id")], out_root, opt, filters,
                        log_to_parent=log_to_parent)


def sweep_report(uri: str, experiment: str, sweep_id: str, parent_run_id: str, run_ids: list[str],
                 out_root: str | Path, options: ReportOptions | None = None, filters: RunFilter | None = None, *,
                 own: bool = False, log_to_parent: bool = True) -> Report:
    """Build the report of a sweep's cell runs into <out_root>/<sweep_id>/ and log it to its parent run; return it.

    The sweep's own report is <out_root>/<sweep_id>/ and report/ on the parent run; options other than the
    defaults write beside it, never over it: <out_root>/<sweep_id>/variants/<options>/ and report-<options>/.
    own: these options are the ones the sweep itself reports with (a search's budget), so they are its own report.
    """
    opt = options or ReportOptions()
    df = runs_frame(uri, experiment, list(dict.fromkeys(run_ids)))
    df = filters.apply(df) if filters else df
    variant = "" if own else variant_name(opt, df)
    out = Path(out_root) / sweep_id / ("variants/" + variant if variant else "")
    title = f"Sweep {sweep_id}" + (f" ({variant})" if variant else "")
    rep = build_report(df, out, title, opt, uri=uri, parent_run_id=parent_run_id)
    if log_to_parent:
        log_report(uri, experiment, parent_run_id, rep, "report" + (f"-{variant}" if variant else ""))
    return rep


def variant_name(opt: ReportOptions, df: pd.DataFrame) -> str:
    """A file-name-safe name of the options that differ from a sweep's default report ('' when none do)."""
    ok = df[df["status"] == "FINISHED"] if "status" in df else df
    default_q = [q.name for q in default_qualities(ok)]
    qs = [parse_quality(n) for n in opt.qualities] if opt.qualities else [parse_quality(n) for n in default_q]
    parts = []
    if opt.qualities and [q.name for q in qs] != default_q:
        parts.append("quality-" + "+".join(opt.qualities))
    changed = {}
    for k, spec in opt.budgets.items():
        q = qs[0] if not k and qs else next((x for x in qs if x.name == k), parse_quality(k) if k else None)
        if parse_budget(spec, q) != parse_budget(None, q):
            changed[k] = spec
    if changed:
        parts.append("budget-" + "+".join(f"{k}={v}" if k else v for k, v in sorted(changed.items())))
    if opt.levels is not None and [round(v, 4) for v in opt.levels] != default_levels(ok):
        parts.append("iso-" + "+".join(f"{v:g}" for v in opt.levels))
    if opt.filters:
        parts.append(opt.filters)
    return slug("_".join(parts))[:100] if parts else ""


def log_report(uri: str, experiment: str, parent_run_id: str, rep: Report, artifact_path: str = "report") -> None:
    """Upload the report's files to the sweep's parent run under report/ (or the variant's folder)."""
    from ..tracking.mlflow_runs import Tracker

    Tracker(uri, experiment).log_artifacts(parent_run_id, rep.dir, artifact_path)
