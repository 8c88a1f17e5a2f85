"""Write a sweep's report (Markdown tables, Pareto front, PNG plot, CSV of the runs) and log it to the parent run."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .pareto import pareto_front
from .plots import pareto_plot
from .runs import find_sweep, runs_frame
from .tables import front_table, ppl_table


@dataclass
class Report:
    """Where a report was written, and its two tables as Markdown."""
    dir: Path
    markdown: Path
    plot: Path | None
    csv: Path
    table: str
    front: str
    front_rows: pd.DataFrame


def build_report(df: pd.DataFrame, out_dir: str | Path, title: str) -> Report:
    """Write report.md, pareto.png and runs.csv for a run table into out_dir; return the Report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = df[df["status"] == "FINISHED"] if "status" in df else df
    failed = df[df["status"] == "FAILED"] if "status" in df else df.iloc[:0]
    front = pareto_front(ok)
    table, ftable = ppl_table(ok), front_table(front)
    plot = pareto_plot(ok, front, out / "pareto.png") if len(ok) else None
    csv = out / "runs.csv"
    df.to_csv(csv, index=False)
    lines = [f"# {title}", "", f"{len(ok)} finished cell runs, {len(failed)} failed.", "",
             "## Perplexity by method and target sparsity", "", table or "(no finished runs)", "",
             "## Pareto front: perplexity vs effective sparsity", "", ftable or "(no finished runs)", ""]
    if plot is not None:
        lines += ["![Pareto plot](pareto.png)", ""]
    if len(failed):
        lines += ["## Failed cells", "", "| method | sparsity | error |", "|---|---|---|"]
        lines += [f"| {r.method} | {r.sparsity:g} | {str(r.error).splitlines()[0][:200]} |" for r in failed.itertuples()]
        lines.append("")
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return Report(out, md, plot, csv, table, ftable, front)


def report_sweep(uri: str, experiment: str, sweep_id: str | None = None, out_root: str | Path = "sweep_results",
                 all_runs: bool = False, log_to_parent: bool = True) -> Report:
    """Build the report of a sweep (the latest, or sweep_id; or every finished cell run) from MLflow; return it."""
    if all_runs:
        df = runs_frame(uri, experiment)
        return build_report(df, Path(out_root) / "all", f"All finished cells of experiment {experiment}")
    sweep = find_sweep(uri, experiment, sweep_id)
    ids = [c["run_id"] for c in sweep["cells"] if c.get("run_id")]
    df = runs_frame(uri, experiment, list(dict.fromkeys(ids)))
    rep = build_report(df, Path(out_root) / sweep["sweep_id"], f"Sweep {sweep['sweep_id']}")
    if log_to_parent:
        log_report(uri, experiment, sweep["run_id"], rep)
    return rep


def log_report(uri: str, experiment: str, parent_run_id: str, rep: Report) -> None:
    """Upload the report's files to the sweep's parent run under report/."""
    from ..tracking.mlflow_runs import Tracker

    Tracker(uri, experiment).log_artifacts(parent_run_id, rep.dir, "report")
