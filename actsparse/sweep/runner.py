"""Run a validated grid: MLflow parent run, skip finished cells, Ray DAG, child runs, report, summary.

Order matters: everything is validated (cells.validate_cells, the launcher settings, the store URL, the
fault hook) before MLflow is opened or Ray is started, so bad input leaves nothing behind; Ray is
started, and the cluster checked for the resources the launcher asks for, before the parent run is
created. Only this driver process writes to MLflow, and it writes a child run whole, once its cell
has a result: an interrupted sweep (Ctrl-C) leaves FINISHED runs intact and no half-written one.

The work is done elsewhere: Ray's session in ray_session.py, the DAG's scheduling in affinity.py (per-model
actors, or plain tasks with `launcher.affinity=false`), each node in tasks.py, node counts in counts.py, a
cell's child run in tracking/child_runs.py, the report in report/build.py. search.py runs its rounds through
the same functions.
"""
from __future__ import annotations

import json
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ActsparseError
from .affinity import Failure
from .cells import Cell, target_notes, validate_cells
from .compose import Grid
from .dag import SweepDag, build_dag
from .placement import place

# skipped: the cell already had a FINISHED run; merged: a grid point that repeats another point's cell
# (dense at several sparsities), reported once under the first point
FINISHED, SKIPPED, FAILED, MERGED = "finished", "skipped", "failed", "merged"
_SHARED = ("tracking", "report", "launcher", "ray")   # one value per sweep: not sweepable


@dataclass
class Outcome:
    """What a sweep did: counts over grid points, where its results and report are."""
    sweep_id: str
    parent_run_id: str | None
    tracking_uri: str
    experiment: str
    statuses: list[dict] = field(default_factory=list)   # one per grid point
    report: object | None = None
    report_error: str | None = None
    ray_started: bool = False
    n_tasks: int = 0                                      # DAG nodes submitted (0: no model work)
    nodes: dict = field(default_factory=dict)             # {"calibrations_computed": n, ...} (see counts.node_counts)
    model: dict = field(default_factory=dict)             # model loads, cache hits, seconds loading and saved
    wall_s: float = 0.0
    view: str = ""                                        # how to open the runs table in the MLflow UI

    def count(self, status: str) -> int:
        return sum(s["status"] == status for s in self.statuses)

    @property
    def exit_code(self) -> int:
        return 1 if self.count(FAILED) or self.report_error else 0

    def summary_line(self) -> str:
        """`cells: N finished, M skipped, K failed` and where the results and the report are."""
        where = f"results: MLflow {self.tracking_uri} (experiment {self.experiment!r}, sweep {self.sweep_id}"
        where += f", parent run {self.parent_run_id})" if self.parent_run_id else ")"
        if self.report is not None:
            where += f"; report: {self.report.html}"
        elif self.report_error:
            where += f"; report failed: {self.report_error}"
        merged = self.count(MERGED)
        merged = f", {merged} merged grid point(s) that repeat a cell" if merged else ""
        return (f"cells: {self.count(FINISHED)} finished, {self.count(SKIPPED)} skipped, "
                f"{self.count(FAILED)} failed{merged} — {where}")


def plan_sweep(grid: Grid, estimate_all: bool = False) -> tuple[list[Cell], SweepDag, dict]:
    """Validate every grid point, size each cell's GPUs and build the DAG; return (cells, dag, the sweep-wide
    settings, with `placement`: placement.Placement; estimate_all: CPU cells' memory estimates too)."""
    if not grid.points:
        raise ActsparseError("the grid is empty")
    cells = validate_cells(grid.points)
    shared = {k: cells[0].config[k] for k in _SHARED}
    for c in cells[1:]:
        for k in _SHARED:
            if c.config[k] != shared[k]:
                raise ActsparseError(f"{k}.* must be the same for every cell of a sweep (it is not sweepable); "
                                     f"cell {' '.join(c.overrides)} differs from the first cell")
    check_launcher(shared["launcher"])
    shared["placement"] = place(cells, shared["launcher"], shared["ray"], estimate_all)  # refuses a cell no node holds
    return cells, build_dag(cells), shared


def worker_launcher(shared: dict) -> dict:
    """The launcher settings the scheduler reads: launcher.*, ray.*, and the GPUs of each model's workers."""
    return dict(shared["launcher"], ray=shared["ray"], model_gpus=shared["placement"].model_gpus)


def check_launcher(launcher: dict) -> None:
    """Raise ActsparseError for launcher settings no cluster can run (negative resources, a bad store URL, ...)."""
    from .store import check_store

    for stage in ("calibrate", "fit", "evaluate"):
        for res in ("num_cpus", "num_gpus"):
            if launcher[stage][res] < 0:
                raise ActsparseError(f"launcher.{stage}.{res} must be >= 0, got {launcher[stage][res]}")
    for k in ("max_retries", "oom_retries"):
        if launcher[k] < 0:
            raise ActsparseError(f"launcher.{k} must be >= 0, got {launcher[k]}")
    for k in ("workers_per_model", "max_workers"):
        if launcher[k] is not None and launcher[k] < 1:
            raise ActsparseError(f"launcher.{k} must be >= 1 or null (automatic), got {launcher[k]}")
    if launcher["model_cache"] < 0:
        raise ActsparseError(f"launcher.model_cache must be >= 0, got {launcher['model_cache']}")
    check_store(launcher["store"])


def run_sweep(grid: Grid, console=None) -> Outcome:
    """Run every cell of a composed grid that has no FINISHED run yet; return the Outcome (report included)."""
    from rich.console import Console
    from rich.markup import escape

    from ..tracking.mlflow_runs import Tracker, runs_view
    from . import faults as fault_hook
    from .counts import model_counts, node_counts, nodes_line, to_compute
    from .ray_session import stop_ray
    from .store import open_store

    t_start = time.perf_counter()
    console = console or Console(soft_wrap=True)
    cells, dag, shared = plan_sweep(grid)            # raises on bad input: nothing opened or started yet
    faults = fault_hook.from_env()
    tr, launcher = shared["tracking"], worker_launcher(shared)
    sweep_id = f"{grid.name}-{dag.sweep_key}"
    tracker = Tracker(tr["uri"], tr["experiment"], tr["artifact_location"])
    done = tracker.finished_cells()
    todo = {k for k in dag.cells if k not in done}
    out = Outcome(sweep_id, None, tr["uri"], tr["experiment"])
    out.view = runs_view(tr["uri"], tracker.experiment_id)
    by_key: dict[str, dict] = {k: {"status": SKIPPED, "run_id": done[k], "why": "already finished"}
                               for k in dag.cells if k in done}
    sub = dag.only(todo)
    console.print(f"[bold]sweep {sweep_id}[/]: {len(cells)} grid points, {len(dag.cells)} unique cells "
                  f"({len(dag.duplicates)} grid points merged: they repeat a cell), {len(dag.cells) - len(todo)} "
                  f"already finished; to run: {len(sub.cells)} cells{to_compute(sub, launcher['store'])}")
    for note in [*target_notes(cells), *shared["placement"].notes]:
        console.print(f"[yellow]{escape(note)}[/]")
    parent = start_parent(out, tracker, launcher, console, bool(todo), grid.name,
                          params={"name": grid.name, "overrides": grid.overrides, "grid": grid.sweep_params,
                                  "n_grid_points": len(cells), "n_cells": len(dag.cells)},
                          tags={"n_grid_points": len(cells), "affinity": str(bool(launcher["affinity"])),
                                "store": launcher["store"]})
    with parent_run_guard(tracker, parent):
        if todo:
            out.n_tasks = len(sub.stats) + len(sub.plans) + len(sub.dense) + len(sub.cells)
            store = open_store(launcher["store"], launcher["store_cache"])
            try:
                nodes = run_dag(sub, launcher, store, faults, tracker, parent, sweep_id, by_key, console)
            finally:
                stop_ray(out.ray_started)
            out.nodes, out.model = node_counts(nodes), model_counts(nodes)
            tracker.set_tags(parent, out.nodes)
            console.print(nodes_line(out.nodes, out.model))
        else:
            console.print("nothing to run: every cell has a FINISHED run (Ray not started)")
        out.statuses = grid_statuses(dag, by_key)
        save_statuses(out, shared, tracker)
        write_report(out, shared, console)
        out.wall_s = time.perf_counter() - t_start
        end_parent(tracker, parent, out, {**{f"nodes/{k}": v for k, v in out.nodes.items()},
                                          **{f"model/{k}": v for k, v in out.model.items()}})
    return out


def start_parent(out: Outcome, tracker, launcher: dict, console, with_ray: bool, name: str, params: dict,
                 tags: dict) -> str:
    """Start Ray and check its resources (with_ray: there is model work), then create the sweep's parent run;
    return its id. Ray is stopped again when either fails, so a cluster too small leaves no run behind."""
    from .ray_session import check_resources, start_ray, stop_ray

    if with_ray:  # connect first: a cluster without the resources asked for fails before any run exists
        out.ray_started = start_ray(launcher, console)
    try:
        if with_ray:
            check_resources(launcher, console)
        out.parent_run_id = tracker.start_sweep(out.sweep_id, name, params=params, tags=tags)
    except BaseException:
        stop_ray(out.ray_started)
        raise
    return out.parent_run_id


@contextmanager
def parent_run_guard(tracker, parent: str):
    """On Ctrl-C end the sweep's parent run KILLED, on any other error FAILED, and re-raise."""
    try:
        yield
    except KeyboardInterrupt:
        tracker.end_run(parent, "KILLED")
        raise
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise


def end_parent(tracker, parent: str, out: Outcome, extra: dict) -> None:
    """End the parent run with the sweep's counts: FAILED when a cell or the report failed."""
    tracker.end_run(parent, "FAILED" if out.exit_code else "FINISHED",
                    {"cells/finished": out.count(FINISHED), "cells/skipped": out.count(SKIPPED),
                     "cells/merged": out.count(MERGED), "cells/failed": out.count(FAILED),
                     "time/sweep_s": out.wall_s, **extra})


def grid_statuses(dag: SweepDag, by_key: dict[str, dict]) -> list[dict]:
    """One status row per grid point (cells.json): its overrides, keys, and what became of its cell."""
    rows = []
    for c in dag.grid:
        first = dag.cells[c.key]
        st = dict(by_key[c.key])
        if first is not c:
            st = {"status": MERGED, "run_id": st.get("run_id"), "why": f"repeats grid point {first.index}"}
        rows.append({"index": c.index, "overrides": list(c.overrides), "label": c.label, "cell_key": c.key,
                     "stats_key": c.stats.key, "plan_key": c.plan.key, **st})
    return rows


def save_statuses(out: Outcome, shared: dict, tracker) -> Path:
    """Write out.statuses to <report.dir>/<sweep_id>/cells.json and log it to the parent run; return that folder."""
    results = Path(shared["report"]["dir"]) / out.sweep_id
    results.mkdir(parents=True, exist_ok=True)
    (results / "cells.json").write_text(json.dumps(out.statuses, indent=1))
    tracker.log_artifact(out.parent_run_id, results / "cells.json")
    return results


def write_report(out: Outcome, shared: dict, console, budgets: dict | None = None) -> None:
    """Build the sweep's report of out.statuses, log it to the parent run and print it (when report.enabled); a
    failure is recorded in out.report_error (the cells are recorded already) and fails the exit status."""
    from rich.markup import escape

    from ..report.build import ReportOptions, sweep_report

    if not shared["report"]["enabled"]:
        return
    tr = shared["tracking"]
    try:
        rep = sweep_report(tr["uri"], tr["experiment"], out.sweep_id, out.parent_run_id,
                           [s["run_id"] for s in out.statuses if s.get("run_id")], shared["report"]["dir"],
                           ReportOptions(budgets=dict(budgets or {})), own=True)
        rep.print_to(console)
        console.print()
        out.report = rep
    except Exception as e:
        out.report_error = f"{type(e).__name__}: {e}"
        console.print(f"[red]report failed:[/] {escape(out.report_error)}")
        traceback.print_exc()


def run_dag(dag: SweepDag, launcher: dict, store, faults: dict, tracker, parent: str, sweep_id: str, by_key: dict,
            console, extra_tags=None, pool=None, verdict=None) -> dict:
    """Run the DAG (affinity.AffinityScheduler), logging each cell as it completes; return the node results.

    extra_tags(cell, result or None) adds tags to a cell's child run (a search tags its probes); pool (an
    affinity.WorkerPool) keeps the model workers for the caller's next DAG instead of closing them;
    verdict(cell, result) -> (ok, why) marks a finished cell's console line (a search: within its budget or not).
    """
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..eval.measures import measures
    from ..tracking.child_runs import log_failed, log_finished
    from .affinity import AffinityScheduler

    with Progress(SpinnerColumn(), TextColumn("[bold]cells"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.description}"), console=console, transient=False) as prog:
        bar = prog.add_task("", total=len(dag.cells))

        def record(cell: Cell, result: dict | None, failure: Failure | None) -> None:
            if failure is not None:  # a failing cell becomes a FAILED run; the sweep goes on
                rid = log_failed(tracker, parent, sweep_id, cell, failure.message, failure.traceback,
                                 extra_tags(cell, None) if extra_tags else {})
                by_key[cell.key] = {"status": FAILED, "run_id": rid, "error": failure.message}
                prog.console.print(f"[red]✗[/] {escape(cell.label)}  {escape(failure.message.splitlines()[0])}  "
                                   f"[dim]\\[{cell.key}][/]")
            else:
                rid = log_finished(tracker, parent, sweep_id, cell, result,
                                   extra_tags(cell, result) if extra_tags else {})
                by_key[cell.key] = {"status": FINISHED, "run_id": rid}
                prog.console.print(finished_line(cell, result, verdict))
                for m in measures().values():   # a measure's detail under the line (lm-eval: per-task table)
                    if m.key in result and (t := m.details(result[m.key], result.get("dense", {}).get(m.key))):
                        prog.console.print(t, soft_wrap=False)
            prog.update(bar, advance=1, description=escape(f"last: {cell.label}"))

        sched = AffinityScheduler(dag, launcher, store, faults, record, pool)
        sched.run()
        return {"results": sched.results, "actors": sched.actors_started, "actor_deaths": sched.actor_deaths}


def finished_line(cell: Cell, result: dict, verdict=None) -> str:
    """A finished cell's console line (rich markup): ✓ and its measures' figures, or, under a verdict (see run_dag),
    ✓ when it holds and ✗ when it does not, with why."""
    from rich.markup import escape

    from ..eval.measures import cell_line

    mark, why = "[green]✓[/]", ""
    if verdict is not None:
        ok, text = verdict(cell, result)
        color = "green" if ok else "yellow"
        mark, why = f"[{color}]{'✓' if ok else '✗'}[/]", f"  [{color}]{escape(text)}[/]"
    return f"{mark} {escape(cell.label)}  {escape(cell_line(result))}{why}  [dim]\\[{cell.key}][/]"
