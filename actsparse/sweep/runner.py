"""Run a validated grid: MLflow parent run, skip finished cells, Ray DAG, child runs, report, summary.

Order matters: everything is validated (cells.validate_cells) before MLflow is opened or Ray is
started, so bad input leaves nothing behind. Only this driver process writes to MLflow.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ActsparseError
from .cells import Cell, validate_cells
from .compose import Grid
from .dag import SweepDag, build_dag

FINISHED, SKIPPED, FAILED = "finished", "skipped", "failed"
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
    n_tasks: int = 0                                      # Ray tasks submitted (0: no model work)

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
            where += f"; report: {self.report.markdown}"
        elif self.report_error:
            where += f"; report failed: {self.report_error}"
        return (f"cells: {self.count(FINISHED)} finished, {self.count(SKIPPED)} skipped, "
                f"{self.count(FAILED)} failed — {where}")


def plan_sweep(grid: Grid) -> tuple[list[Cell], SweepDag, dict]:
    """Validate every grid point and build the DAG; return (cells, dag, the sweep-wide settings)."""
    if not grid.points:
        raise ActsparseError("the grid is empty")
    cells = validate_cells(grid.points)
    shared = {k: cells[0].config[k] for k in _SHARED}
    for c in cells[1:]:
        for k in _SHARED:
            if c.config[k] != shared[k]:
                raise ActsparseError(f"{k}.* must be the same for every cell of a sweep (it is not sweepable); "
                                     f"cell {' '.join(c.overrides)} differs from the first cell")
    return cells, build_dag(cells), shared


def run_sweep(grid: Grid, console=None) -> Outcome:
    """Run every cell of a composed grid that has no FINISHED run yet; return the Outcome (report included)."""
    from rich.console import Console
    from rich.markup import escape

    from ..tracking.mlflow_runs import Tracker

    console = console or Console(soft_wrap=True)
    cells, dag, shared = plan_sweep(grid)            # raises on bad input: nothing opened or started yet
    tr, launcher = shared["tracking"], dict(shared["launcher"], ray=shared["ray"])
    sweep_id = f"{grid.name}-{dag.sweep_key}"
    tracker = Tracker(tr["uri"], tr["experiment"], tr["artifact_location"])
    done = tracker.finished_cells()
    todo = {k for k in dag.cells if k not in done}
    out = Outcome(sweep_id, None, tr["uri"], tr["experiment"])
    by_key: dict[str, dict] = {k: {"status": SKIPPED, "run_id": done[k], "why": "already finished"}
                               for k in dag.cells if k in done}
    sub = dag.only(todo)
    console.print(f"[bold]sweep {sweep_id}[/]: {len(cells)} grid points, {len(dag.cells)} unique cells "
                  f"({len(dag.duplicates)} duplicate grid points), {len(dag.cells) - len(todo)} already finished; "
                  f"to run: {len(sub.cells)} cells, {len(sub.stats)} calibrations, {len(sub.plans)} fits, "
                  f"{len(sub.dense)} dense evaluations")
    parent = tracker.start_sweep(sweep_id, grid.name,
                                 params={"name": grid.name, "overrides": grid.overrides, "grid": grid.sweep_params,
                                         "n_grid_points": len(cells), "n_cells": len(dag.cells)},
                                 tags={"n_grid_points": len(cells)})
    out.parent_run_id = parent
    try:
        if todo:
            out.n_tasks = len(sub.stats) + len(sub.plans) + len(sub.dense) + len(sub.cells)
            out.ray_started = _execute(sub, launcher, tracker, parent, sweep_id, by_key, console)
        else:
            console.print("nothing to run: every cell has a FINISHED run (Ray not started)")
        out.statuses = _grid_statuses(dag, by_key)
        results = Path(shared["report"]["dir"]) / sweep_id
        results.mkdir(parents=True, exist_ok=True)
        (results / "cells.json").write_text(json.dumps(out.statuses, indent=1))
        tracker.log_artifact(parent, results / "cells.json")
        if shared["report"]["enabled"]:
            try:
                out.report = _report(tr, results, sweep_id, out.statuses, tracker, parent, console)
            except Exception as e:  # the cells are recorded already; say what broke, fail the exit status
                out.report_error = f"{type(e).__name__}: {e}"
                console.print(f"[red]report failed:[/] {escape(out.report_error)}")
                traceback.print_exc()
        tracker.end_run(parent, "FAILED" if out.exit_code else "FINISHED",
                        {"cells/finished": out.count(FINISHED), "cells/skipped": out.count(SKIPPED),
                         "cells/failed": out.count(FAILED)})
    except KeyboardInterrupt:
        tracker.end_run(parent, "KILLED")
        raise
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    return out


def _grid_statuses(dag: SweepDag, by_key: dict[str, dict]) -> list[dict]:
    rows = []
    for c in dag.grid:
        first = dag.cells[c.key]
        st = dict(by_key[c.key])
        if first is not c:
            st = {"status": SKIPPED, "run_id": st.get("run_id"), "why": f"duplicate of grid point {first.index}"}
        rows.append({"index": c.index, "overrides": list(c.overrides), "label": c.label, "cell_key": c.key,
                     "stats_key": c.stats.key, "plan_key": c.plan.key, **st})
    return rows


# -- Ray ------------------------------------------------------------------------------------------------
def _start_ray(launcher: dict, console) -> bool:
    """Connect to Ray (reusing an initialised session); return True when this call started it."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    r = launcher["ray"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    kw = dict(include_dashboard=False, log_to_driver=r["log_to_driver"], logging_level=logging.WARNING)
    t0 = time.perf_counter()
    local = r["address"] in (None, "", "local")
    try:
        if local:  # num_cpus None: Ray counts the cores this process may use (cgroup limits included)
            ray.init(address="local", num_cpus=r["num_cpus"], num_gpus=r["num_gpus"], **kw)
        else:
            ray.init(address=r["address"], log_to_driver=r["log_to_driver"], logging_level=logging.WARNING)
    except Exception as e:
        raise ActsparseError(f"cannot {'start a local Ray cluster' if local else 'connect to Ray at ' + repr(r['address'])}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; check ray.address "
                             "(null for an embedded cluster, auto or host:port for a running one)") from e
    res = ray.cluster_resources()
    console.print(f"ray: {'local cluster' if local else 'connected to ' + r['address']} with "
                  f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs ({time.perf_counter() - t0:.1f} s)")
    return True


def _execute(dag: SweepDag, launcher: dict, tracker, parent: str, sweep_id: str, by_key: dict, console) -> bool:
    """Submit the DAG to Ray, log each cell as it completes; return True when Ray was started here."""
    import ray

    from . import tasks

    started = _start_ray(launcher, console)
    try:
        store = str(Path(launcher["store"]).expanduser().resolve())
        retries, cache = launcher["max_retries"], launcher["model_cache"]

        def opts(stage: str, name: str) -> dict:
            res = launcher[stage]
            return {"num_cpus": res["num_cpus"], "num_gpus": res["num_gpus"], "max_retries": retries,
                    "retry_exceptions": False, "name": name}

        def threads(stage: str) -> float:
            return launcher[stage]["num_cpus"]

        calibrate = ray.remote(tasks.calibrate_task)
        fit = ray.remote(tasks.fit_task)
        dense = ray.remote(tasks.dense_task)
        evaluate = ray.remote(tasks.cell_task)
        stats_refs = {k: calibrate.options(**opts("calibrate", f"calibrate:{k[:8]}")).remote(
            n, store, dag.first_cell[k].device, threads("calibrate"), cache) for k, n in dag.stats.items()}
        plan_refs = {k: fit.options(**opts("fit", f"fit:{k[:8]}")).remote(
            n, store, stats_refs[n.stats_key], dag.first_cell[k].device, threads("fit"), cache)
            for k, n in dag.plans.items()}
        dense_refs = {k: dense.options(**opts("evaluate", f"dense:{k[:8]}")).remote(
            n, store, dag.first_cell[k].device, threads("evaluate"), cache) for k, n in dag.dense.items()}
        pending = {}
        for k, c in dag.cells.items():
            deps = {"calibration": stats_refs[c.stats.key], "fit": plan_refs[c.plan.key],
                    "dense evaluation": dense_refs[c.dense.key]}
            ref = evaluate.options(**opts("evaluate", f"cell:{k[:8]}")).remote(
                c, deps["calibration"], deps["fit"], deps["dense evaluation"], threads("evaluate"), cache)
            pending[ref] = (c, deps)
        _collect(pending, tracker, parent, sweep_id, by_key, console)
    finally:
        if started:
            ray.shutdown()
    return started


def _collect(pending: dict, tracker, parent: str, sweep_id: str, by_key: dict, console) -> None:
    import ray
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("[bold]cells"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.description}"), console=console, transient=False) as prog:
        bar = prog.add_task("", total=len(pending))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                cell, deps = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # a failing cell becomes a FAILED run; the sweep goes on
                    msg, tb = _describe_failure(e, deps)
                    rid = _log_failed(tracker, parent, sweep_id, cell, msg, tb)
                    by_key[cell.key] = {"status": FAILED, "run_id": rid, "error": msg}
                    prog.console.print(f"[red]✗[/] {escape(cell.label)}  {escape(msg.splitlines()[0][:160])}  "
                                       f"[dim]\\[{cell.key}][/]")
                else:
                    rid = _log_finished(tracker, parent, sweep_id, cell, result)
                    by_key[cell.key] = {"status": FINISHED, "run_id": rid}
                    prog.console.print(f"[green]✓[/] {escape(cell.label)}  ppl {result['ppl']:.3f} "
                                       f"(x{result['ppl_ratio']:.3f} dense)  effective sparsity "
                                       f"{result['effective']:.3f}  [dim]\\[{cell.key}][/]")
                prog.update(bar, advance=1, description=escape(f"last: {cell.label}"))


def _describe_failure(e: Exception, deps: dict) -> tuple[str, str]:
    """(one-paragraph message naming the failed stage, full remote traceback)."""
    import ray
    from ray.exceptions import RayTaskError

    stage = "evaluation"
    for name, ref in deps.items():  # did a node this cell depends on fail?
        try:
            ray.get(ref, timeout=0)
        except Exception:
            stage = name
            break
    cause = e.cause if isinstance(e, RayTaskError) and e.cause is not None else e
    text = str(cause).strip().splitlines()
    return f"{stage} failed: {type(cause).__name__}: {text[0] if text else ''}", str(e)


# -- MLflow child runs ----------------------------------------------------------------------------------
def _tags(cell: Cell, sweep_id: str, device: str) -> dict:
    return {"cell_key": cell.key, "stats_key": cell.stats.key, "plan_key": cell.plan.key, "sweep_id": sweep_id,
            "token_policy": cell.eval.token_policy, "device": device, "model": cell.config["model"]["name"],
            "method": cell.plan.method}


def _log_finished(tracker, parent: str, sweep_id: str, cell: Cell, r: dict) -> str:
    from ..report.plots import layer_sparsity_plot

    metrics = {"ppl": r["ppl"], "ppl_dense": r["ppl_dense"], "ppl_ratio": r["ppl_ratio"],
               "sparsity/effective": r["effective"], "sparsity/effective_expected": r["expected_effective"],
               "sparsity/target": r["target"], "sparsity/act_mean": r["act_mean"],
               "time/calibrate_s": r["calibrate_s"], "time/fit_s": r["fit_s"], "time/eval_s": r["eval_s"]}
    metrics.update({f"sparsity/act/{role}": v for role, v in r["per_role"].items()})
    tags = {**_tags(cell, sweep_id, r["device"]), "stats_source": r["stats_source"], "host": r["host"]}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _write_config(cell, d)
        (d / "plan_summary.txt").write_text(r["plan_summary"] + "\n")
        (d / "measured_sparsity.json").write_text(json.dumps(r["per_point"], indent=1, sort_keys=True))
        if r["per_point"]:
            layer_sparsity_plot(r["per_point"], r["target"], d / "sparsity_per_layer.png", title=cell.label)
        return tracker.log_cell(parent, cell.label, cell.config, metrics, tags, d, "FINISHED",
                                r["t_start"], r["t_end"])


def _log_failed(tracker, parent: str, sweep_id: str, cell: Cell, msg: str, tb: str) -> str:
    tags = {**_tags(cell, sweep_id, cell.device), "error": msg[:4900]}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _write_config(cell, d)
        (d / "error.txt").write_text(tb)
        return tracker.log_cell(parent, cell.label, cell.config, {}, tags, d, "FAILED")


def _write_config(cell: Cell, d: Path) -> None:
    from omegaconf import OmegaConf

    (d / "config.yaml").write_text(f"# overrides: {' '.join(cell.overrides)}\n" + OmegaConf.to_yaml(cell.config))


def _report(tr: dict, results: Path, sweep_id: str, statuses: list[dict], tracker, parent: str, console):
    from ..report.build import build_report
    from ..report.runs import runs_frame

    ids = list(dict.fromkeys(s["run_id"] for s in statuses if s.get("run_id")))
    df = runs_frame(tr["uri"], tr["experiment"], ids)
    rep = build_report(df, results, f"Sweep {sweep_id}")
    tracker.log_artifacts(parent, rep.dir, "report")
    for text in (rep.table, rep.front):
        if text:
            console.print(text + "\n", markup=False, highlight=False)
    return rep
