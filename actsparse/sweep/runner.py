"""Run a validated grid: MLflow parent run, skip finished cells, Ray DAG, child runs, report, summary.

Order matters: everything is validated (cells.validate_cells, the launcher settings, the store URL, the
fault hook) before MLflow is opened or Ray is started, so bad input leaves nothing behind; Ray is
started, and the cluster checked for the resources the launcher asks for, before the parent run is
created. Only this driver process writes to MLflow, and it writes a child run whole, once its cell
has a result: an interrupted sweep (Ctrl-C) leaves FINISHED runs intact and no half-written one.

Execution: with `launcher.affinity` (the default) the DAG runs on per-model actors (affinity.py);
otherwise as a DAG of independent Ray tasks chained by ObjectRefs (`_execute_tasks`).
"""
from __future__ import annotations

import json
import os
import tempfile
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
    nodes: dict = field(default_factory=dict)             # {"calibrations_computed": n, ...} (see _node_counts)
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
    check_launcher(shared["launcher"])
    return cells, build_dag(cells), shared


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
    from .store import open_store

    t_start = time.perf_counter()
    console = console or Console(soft_wrap=True)
    cells, dag, shared = plan_sweep(grid)            # raises on bad input: nothing opened or started yet
    faults = fault_hook.from_env()
    tr, launcher = shared["tracking"], dict(shared["launcher"], ray=shared["ray"])
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
                  f"already finished; to run: {len(sub.cells)} cells{_to_compute(sub, launcher['store'])}")
    for note in target_notes(cells):
        console.print(f"[yellow]{escape(note)}[/]")
    if todo:  # connect first: a cluster without the resources asked for fails before any run exists
        out.ray_started = _start_ray(launcher, console)
    try:
        if todo:
            _check_resources(launcher, console)
        parent = tracker.start_sweep(sweep_id, grid.name,
                                     params={"name": grid.name, "overrides": grid.overrides,
                                             "grid": grid.sweep_params, "n_grid_points": len(cells),
                                             "n_cells": len(dag.cells)},
                                     tags={"n_grid_points": len(cells), "affinity": str(bool(launcher["affinity"])),
                                           "store": launcher["store"]})
    except BaseException:
        _stop_ray(out.ray_started)
        raise
    out.parent_run_id = parent
    with parent_run_guard(tracker, parent):
        if todo:
            out.n_tasks = len(sub.stats) + len(sub.plans) + len(sub.dense) + len(sub.cells)
            store = open_store(launcher["store"], launcher["store_cache"])
            try:
                nodes = _execute(sub, launcher, store, faults, tracker, parent, sweep_id, by_key, console)
            finally:
                _stop_ray(out.ray_started)
            out.nodes, out.model = _node_counts(nodes), _model_counts(nodes)
            tracker.set_tags(parent, {k: v for k, v in out.nodes.items()})
            console.print(_nodes_line(out))
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
        out.wall_s = time.perf_counter() - t_start
        end_parent(tracker, parent, out, {**{f"nodes/{k}": v for k, v in out.nodes.items()},
                                          **{f"model/{k}": v for k, v in out.model.items()}})
    return out


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


def _grid_statuses(dag: SweepDag, by_key: dict[str, dict]) -> list[dict]:
    rows = []
    for c in dag.grid:
        first = dag.cells[c.key]
        st = dict(by_key[c.key])
        if first is not c:
            st = {"status": MERGED, "run_id": st.get("run_id"), "why": f"repeats grid point {first.index}"}
        rows.append({"index": c.index, "overrides": list(c.overrides), "label": c.label, "cell_key": c.key,
                     "stats_key": c.stats.key, "plan_key": c.plan.key, **st})
    return rows


def _to_compute(sub: SweepDag, store_spec: str) -> str:
    """`, computing N calibrations, N fits, N dense evaluations` for the nodes whose artifact is not in the store."""
    if not sub.cells:
        return ""
    try:
        from .store import open_store

        store = open_store(store_spec)
        have = {kind: set(store.keys(kind)) for kind in ("stats", "plans", "dense")}
    except Exception:    # an unreachable store is reported when the nodes run; here only the count is lost
        have = {"stats": set(), "plans": set(), "dense": set()}
    parts = []
    for kind, nodes, what in (("stats", sub.stats, "calibration"), ("plans", sub.plans, "fit"),
                              ("dense", sub.dense, "dense evaluation")):
        stored = sum(k in have[kind] for k in nodes)
        parts.append(f"{len(nodes) - stored} {what}(s)" + (f" (+{stored} from the store)" if stored else ""))
    return ", computing " + ", ".join(parts)


# -- Ray ------------------------------------------------------------------------------------------------
def _stop_ray(started: bool) -> None:
    if started:
        import ray

        ray.shutdown()


def _check_resources(launcher: dict, console) -> None:
    """Raise ActsparseError when no Ray node can run a stage's resource request (it would wait forever).

    On a cluster joined by address the autoscaler may still add such a node: there it is a warning.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes) or "none"
    asks = {s: launcher[s] for s in ("calibrate", "fit", "evaluate")}
    if launcher["affinity"]:  # one actor runs calibrations and evaluations: it asks for the larger of the two
        asks["calibrate/evaluate worker"] = {r: max(launcher["calibrate"][r], launcher["evaluate"][r])
                                             for r in ("num_cpus", "num_gpus")}
    for stage, ask in asks.items():
        if not any(r.get("CPU", 0) >= ask["num_cpus"] and r.get("GPU", 0) >= ask["num_gpus"] for r in nodes):
            where = f"launcher.{stage}" if "/" not in stage else "launcher.calibrate/evaluate"
            msg = (f"{where} asks for {ask['num_cpus']:g} CPU(s) and {ask['num_gpus']:g} GPU(s) per task, but no "
                   f"node of the Ray cluster has that much (nodes: {have}); on a CPU-only machine use "
                   "launcher=local (no GPU request), else lower launcher.*.num_gpus / num_cpus or add nodes")
            if launcher["ray"]["address"] in (None, "", "local"):
                raise ActsparseError(msg)
            console.print(f"[yellow]warning:[/] {msg} (waiting for the cluster to grow)")
            return


def _start_ray(launcher: dict, console) -> bool:
    """Connect to Ray (reusing an initialised session); return True when this call started it."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    # the embedded cluster's token authentication is on by design; its notice on every start is noise
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
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


def _execute(dag: SweepDag, launcher: dict, store, faults: dict, tracker, parent: str, sweep_id: str, by_key: dict,
             console, extra_tags=None, pool=None) -> dict:
    """Run the DAG (on model actors, or as chained tasks), logging each cell as it completes; return node results.

    extra_tags(cell, result or None) adds tags to a cell's child run (a search tags its probes); pool (an
    affinity.WorkerPool) keeps the model workers for the caller's next DAG instead of closing them.
    """
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..eval.measures import cell_line, measures

    with Progress(SpinnerColumn(), TextColumn("[bold]cells"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.description}"), console=console, transient=False) as prog:
        bar = prog.add_task("", total=len(dag.cells))

        def record(cell: Cell, result: dict | None, failure: Failure | None) -> None:
            if failure is not None:  # a failing cell becomes a FAILED run; the sweep goes on
                rid = _log_failed(tracker, parent, sweep_id, cell, failure.message, failure.traceback,
                                  extra_tags(cell, None) if extra_tags else {})
                by_key[cell.key] = {"status": FAILED, "run_id": rid, "error": failure.message}
                prog.console.print(f"[red]✗[/] {escape(cell.label)}  {escape(failure.message.splitlines()[0])}  "
                                   f"[dim]\\[{cell.key}][/]")
            else:
                rid = _log_finished(tracker, parent, sweep_id, cell, result,
                                    extra_tags(cell, result) if extra_tags else {})
                by_key[cell.key] = {"status": FINISHED, "run_id": rid}
                prog.console.print(f"[green]✓[/] {escape(cell.label)}  {escape(cell_line(result))}  "
                                   f"[dim]\\[{cell.key}][/]")
                for m in measures().values():   # a measure's detail under the line (lm-eval: per-task table)
                    if m.key in result and (t := m.details(result[m.key], result.get("dense", {}).get(m.key))):
                        prog.console.print(t, soft_wrap=False)
            prog.update(bar, advance=1, description=escape(f"last: {cell.label}"))

        if launcher["affinity"]:
            from .affinity import AffinityScheduler

            sched = AffinityScheduler(dag, launcher, store, faults, record, pool)
            sched.run()
            return {"results": sched.results, "actors": sched.actors_started, "actor_deaths": sched.actor_deaths}
        return _execute_tasks(dag, launcher, store, faults, record)


def _execute_tasks(dag: SweepDag, launcher: dict, store, faults: dict, record) -> dict:
    """The DAG as independent Ray tasks chained by ObjectRefs (launcher.affinity=false); return node results."""
    import ray

    from . import tasks

    retries, cache, oom = launcher["max_retries"], launcher["model_cache"], launcher["oom_retries"]

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
        n, store, dag.first_cell[k].device, threads("calibrate"), cache, faults, oom) for k, n in dag.stats.items()}
    plan_refs = {k: fit.options(**opts("fit", f"fit:{k[:8]}")).remote(
        n, store, stats_refs[n.stats_key], dag.first_cell[k].device, threads("fit"), cache, faults)
        for k, n in dag.plans.items()}
    dense_refs = {k: dense.options(**opts("evaluate", f"dense:{k[:8]}")).remote(
        n, store, dag.first_cell[k].device, threads("evaluate"), cache, faults, oom) for k, n in dag.dense.items()}
    pending = {}
    for k, c in dag.cells.items():
        deps = {"calibration": stats_refs[c.stats.key], "fit": plan_refs[c.plan.key],
                "dense evaluation": dense_refs[c.dense.key]}
        ref = evaluate.options(**opts("evaluate", f"cell:{k[:8]}")).remote(
            c, store, deps["calibration"], deps["fit"], deps["dense evaluation"], threads("evaluate"), cache,
            faults, oom)
        pending[ref] = (c, deps)
    results: dict[tuple, dict] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                cell, deps = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:
                    msg, tb = _describe_failure(e, deps)
                    record(cell, None, Failure(msg, tb))
                else:
                    results[("cell", cell.key)] = result
                    record(cell, result, None)
    except BaseException:  # Ctrl-C or an error: leave nothing running on the cluster
        for ref in [*pending, *stats_refs.values(), *plan_refs.values(), *dense_refs.values()]:
            ray.cancel(ref, force=True)
        raise
    for kind, refs in (("stats", stats_refs), ("plan", plan_refs), ("dense", dense_refs)):
        for k, ref in refs.items():
            try:
                results[(kind, k)] = ray.get(ref, timeout=0)
            except Exception:
                pass
    return {"results": results, "actors": 0, "actor_deaths": 0}


def _node_counts(nodes: dict) -> dict:
    """{calibrations,fits,dense_evals}_{computed,cached}, OOM retries, actors, Ray nodes used: for tags and metrics."""
    out = {}
    for kind, name in (("stats", "calibrations"), ("plan", "fits"), ("dense", "dense_evals")):
        rs = [r for (k, _), r in nodes["results"].items() if k == kind]
        out[f"{name}_computed"] = sum(r["source"] == "computed" for r in rs)
        out[f"{name}_cached"] = sum(r["source"] == "cache" for r in rs)
    out["oom_retries"] = sum(r.get("oom_retries", 0) for r in nodes["results"].values())
    out["actors"], out["actor_deaths"] = nodes["actors"], nodes["actor_deaths"]
    out["ray_nodes"] = len({r["worker"]["node"] for r in nodes["results"].values() if r.get("worker", {}).get("node")})
    return out


def _model_counts(nodes: dict) -> dict:
    """Model loads, cache hits, seconds spent loading, and the seconds the hits saved (hits x mean load time)."""
    ms = [r["model"] for r in nodes["results"].values() if "model" in r]
    loads, hits, load_s = sum(m["loads"] for m in ms), sum(m["hits"] for m in ms), sum(m["load_s"] for m in ms)
    return {"loads": loads, "cache_hits": hits, "load_s": load_s,
            "load_s_saved": hits * load_s / loads if loads else 0.0}


def _nodes_line(out: Outcome) -> str:
    n, m = out.nodes, out.model
    return (f"nodes: {n['calibrations_computed']} calibration(s) computed + {n['calibrations_cached']} from the store, "
            f"{n['fits_computed']} + {n['fits_cached']} fit(s), {n['dense_evals_computed']} + "
            f"{n['dense_evals_cached']} dense evaluation(s); model: {m['loads']} load(s) ({m['load_s']:.1f} s), "
            f"{m['cache_hits']} reuse(s) saving ~{m['load_s_saved']:.1f} s"
            + (f"; {n['actors']} model worker(s)" if n["actors"] else "")
            + (f", {n['actor_deaths']} died and were replaced" if n["actor_deaths"] else ""))


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
            "method": cell.plan.method, "method_label": cell.method_label or cell.plan.method}


def _log_finished(tracker, parent: str, sweep_id: str, cell: Cell, r: dict, extra: dict | None = None) -> str:
    from ..eval.measures import measures, quality_metrics
    from ..report.plots import layer_sparsity_plot

    metrics = {"sparsity/effective": r["effective"], "sparsity/effective_expected": r["expected_effective"],
               "sparsity/target": r["target"], "sparsity/act_mean": r["act_mean"],
               "time/calibrate_s": r["calibrate_s"], "time/fit_s": r["fit_s"], "time/eval_s": r["eval_s"]}
    metrics.update({f"sparsity/act/{role}": v for role, v in r["per_role"].items()})
    metrics.update(quality_metrics(r))
    model, worker = r.get("model", {}), r.get("worker", {})
    metrics["time/model_load_s"] = model.get("load_s", 0.0)
    tags = {**_tags(cell, sweep_id, r["device"]), "stats_source": r["stats_source"], "host": r["host"],
            "model_cache": "miss" if model.get("loads") else "hit" if model.get("hits") else "none",
            "ray_node": worker.get("node", "")[:16], "worker_pid": worker.get("pid", ""),
            "eval_batch_size": r.get("eval_batch_size", cell.eval.batch_size), "oom_retries": r.get("oom_retries", 0),
            **(extra or {})}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _write_config(cell, d)
        (d / "plan_summary.txt").write_text(r["plan_summary"] + "\n")
        (d / "measured_sparsity.json").write_text(json.dumps(r["per_point"], indent=1, sort_keys=True))
        for m in measures().values():   # each measure's own tags and files (lm-eval: versions, per-task json)
            if m.key in r:
                mtags, files = m.record(r[m.key], r.get("dense", {}).get(m.key))
                tags.update(mtags)
                for name, text in files.items():
                    (d / name).write_text(text)
            if f"{m.name}_skipped" in r:
                tags[f"{m.name}_skipped"] = r[f"{m.name}_skipped"][:4900]
        if r["per_point"]:
            layer_sparsity_plot(r["per_point"], r["target"], d / "sparsity_per_layer.png", title=cell.label)
        return tracker.log_cell(parent, cell.label, cell.config, metrics, tags, d, "FINISHED",
                                r["t_start"], r["t_end"])


def _log_failed(tracker, parent: str, sweep_id: str, cell: Cell, msg: str, tb: str, extra: dict | None = None) -> str:
    tags = {**_tags(cell, sweep_id, cell.device), "error": msg[:4900], **(extra or {})}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _write_config(cell, d)
        (d / "error.txt").write_text(tb)
        return tracker.log_cell(parent, cell.label, cell.config, {}, tags, d, "FAILED")


def _write_config(cell: Cell, d: Path) -> None:
    from omegaconf import OmegaConf

    (d / "config.yaml").write_text(f"# overrides: {' '.join(cell.overrides)}\n" + OmegaConf.to_yaml(cell.config))


def _report(tr: dict, results: Path, sweep_id: str, statuses: list[dict], tracker, parent: str, console,
            budgets: dict | None = None):
    from ..report.build import ReportOptions, build_report
    from ..report.runs import runs_frame

    ids = list(dict.fromkeys(s["run_id"] for s in statuses if s.get("run_id")))
    df = runs_frame(tr["uri"], tr["experiment"], ids)
    rep = build_report(df, results, f"Sweep {sweep_id}", ReportOptions(budgets=dict(budgets or {})))
    tracker.log_artifacts(parent, rep.dir, "report")
    rep.print_to(console)
    console.print()
    return rep
