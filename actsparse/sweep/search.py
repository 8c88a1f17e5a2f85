"""Search: per model and method, the largest target sparsity whose quality stays within a budget.

`actsparse sweep --search "ppl<=1.02x" -m method=teal,cats model=...` composes the grid as usual; every grid
point minus its `sparsity` is a *group* (model × method and its parameters × evaluation). Each group is searched
by bisection on the target in [0, max_sparsity]: a probe is an ordinary cell (calibration shared, plans and
dense evaluations from the store, a FINISHED child run in MLflow tagged `search_*`), and the probes of all
groups of a round run together on Ray. Dense quality is the dense cell's, measured once per model.

Bisection, not the secant method: quality along the target is monotone but far from linear (perplexity bends
up sharply past the knee), so secant steps overshoot, while bisection bounds the probes: after k probes the
crossing lies in an interval of max_sparsity / 2^k, i.e. 7 probes for 0.9 at the default tolerance 0.01. The
answer is the largest *measured* passing target, bracketed by a failing probe at most `tol` above it.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field

from ..artifacts import content_key
from ..errors import ActsparseError
from .cells import Cell, validate_cells
from .compose import Grid

FORMS = ("METRIC<=Rx (ratio to dense: ppl<=1.02x), METRIC>=dense-N (accuracy points: acc_avg>=dense-1), "
         "METRIC>=Rx (fidelity/cos>=0.99x), METRIC<=dense+Nabs (absolute: ppl<=dense+0.5abs), or the report's "
         "METRIC=SPEC (ppl=1.02x, acc_avg=1pt)")
_NUM = r"[0-9]*\.?[0-9]+(?:e[-+]?\d+)?"


@dataclass(frozen=True)
class SearchSpec:
    """A quality budget to search against, and the bisection's resolution and ceiling."""
    text: str                   # as given
    quality: object             # report.quality.Quality
    budget: object              # report.quality.Budget
    tol: float = 0.01
    max_sparsity: float = 0.9

    @property
    def max_probes(self) -> int:
        """Probes per group: bisection halves [0, max_sparsity] until it is no wider than tol."""
        return max(1, math.ceil(math.log2(self.max_sparsity / self.tol) - 1e-9))

    def describe(self) -> str:
        return self.budget.describe(self.quality)


def parse_search(text: str, tol: float = 0.01, max_sparsity: float = 0.9) -> SearchSpec:
    """Return the SearchSpec of a budget written as in FORMS; raise ActsparseError naming the accepted forms."""
    from ..report.quality import Budget, parse_budget, parse_quality

    if not (0 < tol < 0.5):
        raise ActsparseError(f"--tol must be in (0, 0.5), got {tol:g}")
    if not (0 < max_sparsity < 1):
        raise ActsparseError(f"--max-sparsity must be in (0, 1), got {max_sparsity:g}")
    if tol >= max_sparsity:
        raise ActsparseError(f"--tol ({tol:g}) must be smaller than --max-sparsity ({max_sparsity:g})")
    m = re.match(r"^\s*(?P<m>[A-Za-z_][\w/.-]*(?::(?:min|max))?)\s*(?P<op><=|>=|=)\s*(?P<rhs>.+?)\s*$", str(text))
    if not m:
        raise ActsparseError(f"bad search budget {text!r}; accepted forms: {FORMS}")
    q = parse_quality(m["m"])
    op, rhs = m["op"], re.sub(r"\s+", "", m["rhs"].lower())
    better = ">=" if q.higher_is_better else "<="
    if op not in ("=", better):
        raise ActsparseError(f"search budget {text!r} cannot be met: {q.name} is "
                             f"{'higher' if q.higher_is_better else 'lower'}-is-better, so the budget bounds it "
                             f"with {better} (e.g. {q.name}{better}{'0.99x' if q.higher_is_better else '1.02x'})")
    if op == "=":
        try:
            budget = parse_budget(rhs, q)
        except ActsparseError as e:
            raise ActsparseError(f"bad search budget {text!r} ({e}); accepted forms: {FORMS}") from None
    elif r := re.fullmatch(rf"(?P<v>{_NUM})(?:x|\*dense|xdense)", rhs):
        budget = parse_budget(f"{r['v']}x", q)
    elif r := re.fullmatch(rf"dense(?P<s>[-+])(?P<v>{_NUM})(?P<u>pt|pts|points?|abs)?", rhs):
        worse = "-" if q.higher_is_better else "+"
        if r["s"] != worse:
            raise ActsparseError(f"search budget {text!r} cannot be met: it asks {q.name} to be better than dense; "
                                 f"write dense{worse}{r['v']}")
        unit = r["u"] or ("pt" if q.is_accuracy else "abs")
        budget = parse_budget(f"{r['v']}{'abs' if unit == 'abs' else 'pt'}", q)
    else:
        raise ActsparseError(f"bad search budget {text!r}: cannot read {m['rhs']!r}; accepted forms: {FORMS}")
    if budget.kind == "ratio" and budget.value == 1.0 or budget.kind != "ratio" and budget.value == 0:
        raise ActsparseError(f"search budget {text!r} allows no loss at all, so only dense meets it; give a "
                             f"tolerance, e.g. {q.name}{better}{'0.99x' if q.higher_is_better else '1.02x'}")
    assert isinstance(budget, Budget)
    return SearchSpec(str(text), q, budget, tol, max_sparsity)


@dataclass
class Group:
    """One searched model × method (its grid point without the sparsity) and its bisection state."""
    key: str
    label: str
    base: tuple[list[str], dict]             # a grid point of the group: (overrides, resolved config)
    lo: float = 0.0                          # largest passing target so far (0: dense, passes by definition)
    hi: float | None = None                  # smallest failing target so far
    probes: list[dict] = field(default_factory=list)

    def upper(self, spec: SearchSpec) -> float:
        return spec.max_sparsity if self.hi is None else self.hi

    def done(self, spec: SearchSpec) -> bool:
        failed = any(p["status"] == "failed" for p in self.probes)
        return failed or self.upper(spec) - self.lo <= spec.tol + 1e-9 or len(self.probes) >= spec.max_probes

    def next_target(self, spec: SearchSpec) -> float:
        return round((self.lo + self.upper(spec)) / 2, 4)

    def result(self, spec: SearchSpec) -> dict:
        best = max((p for p in self.probes if p.get("pass")), key=lambda p: p["target"], default=None)
        if any(p["status"] == "failed" for p in self.probes):
            status = "a probe failed"
        elif best is None:
            status = "not reached"                       # even the smallest probe misses the budget
        elif self.hi is None:
            status = "every probe passed"                # the answer is a lower bound, up to max_sparsity
        else:
            status = "measured"
        return {"group": self.label, "status": status, "found_target": best["target"] if best else 0.0,
                "found_effective": best["effective"] if best else 0.0, "found_quality": best["value"] if best else None,
                "bracket": [self.lo, self.upper(spec)], "n_probes": len(self.probes), "probes": self.probes}


def check_search(spec: SearchSpec, cells: list[Cell]) -> None:
    """Refuse, before anything runs, groups a search cannot answer: methods without a target, unrecorded metrics."""
    from ..eval.measures import measure_of
    from ..sparsifiers.registry import get_method

    for c in cells:
        cls = get_method(c.plan.method)
        if not cls.uses_target:
            raise ActsparseError(f"search: method {c.plan.method!r} does not take a target sparsity (its sparsity "
                                 "comes from its parameters), so there is nothing to search; drop it from the grid "
                                 "(dense is the reference every probe is compared with anyway)")
        need = measure_of(spec.quality.name)
        if need is None or need not in c.eval.measure:
            have = ", ".join(c.eval.measure)
            raise ActsparseError(f"search: budget on {spec.quality.name!r}, but cell {c.label!r} measures only "
                                 f"{have}; choose eval=lm_eval for accuracies, eval=fidelity for fidelity/cos "
                                 f"(or eval=quality for all)")


def groups_of(grid: Grid) -> list[Group]:
    """One Group per grid point without its sparsity (the grid's sparsity values are ignored by a search)."""
    out: dict[str, Group] = {}
    cells = validate_cells(grid.points)
    for c, (ov, cfg) in zip(cells, grid.points):
        rest = {k: v for k, v in cfg.items() if k != "sparsity"}
        key = content_key("search-group", rest)
        if key not in out:
            label = c.label.rsplit(" s=", 1)[0]
            out[key] = Group(key, label, ([o for o in ov if not o.startswith("sparsity=")], cfg))
    return list(out.values())


def prepare_search(grid: Grid, spec: SearchSpec) -> tuple[list[Group], dict]:
    """Validate the grid, its launcher and the search; return (groups, the sweep-wide settings). Nothing starts."""
    from .runner import plan_sweep

    _, _, shared = plan_sweep(grid)
    groups = groups_of(grid)
    check_search(spec, validate_cells(_probe_points(groups, spec)))
    return groups, shared


def _probe_points(groups: list[Group], spec: SearchSpec) -> list[tuple[list[str], dict]]:
    pts = []
    for g in groups:
        t = g.next_target(spec)
        ov, cfg = g.base
        pts.append(([*ov, f"sparsity={t:g}"], {**cfg, "sparsity": t}))
    return pts


def _value(spec: SearchSpec, metrics: dict) -> tuple[float, float]:
    """(the probe's quality, dense's) from a cell's metrics under DESIGN.md's names."""
    from ..eval.measures import self_reference

    name = spec.quality.name
    v = metrics.get(name)
    if v is None:
        raise ActsparseError(f"search: a probe recorded no {name!r} (metrics: {', '.join(sorted(metrics)) or 'none'})")
    dense = self_reference().get(name, metrics.get(f"{name}_dense"))   # fidelity: dense against itself
    if dense is None:
        raise ActsparseError(f"search: a probe recorded {name!r} but not its dense value {name}_dense")
    return float(v), float(dense)


def run_search(grid: Grid, spec: SearchSpec, console=None, prepared: tuple[list[Group], dict] | None = None):
    """Search every group of the grid; return the sweep's Outcome (its report shows the found points as measured).

    prepared: what prepare_search returned, when the caller validated already.
    """
    from rich.console import Console
    from rich.markup import escape

    from ..eval.measures import quality_metrics
    from ..tracking.mlflow_runs import Tracker
    from . import faults as fault_hook
    from . import runner as R
    from .affinity import WorkerPool
    from .counts import model_counts, node_counts
    from .dag import build_dag
    from .ray_session import stop_ray
    from .store import open_store

    t_start = time.perf_counter()
    console = console or Console(soft_wrap=True)
    groups, shared = prepared or prepare_search(grid, spec)   # raises on bad input: nothing opened or started yet
    faults = fault_hook.from_env()
    tr, launcher = shared["tracking"], R.worker_launcher(shared)
    sweep_id = f"search-{grid.name}-{content_key(sorted(g.key for g in groups), spec.text, spec.tol, spec.max_sparsity)[:8]}"
    tracker = Tracker(tr["uri"], tr["experiment"], tr["artifact_location"])
    console.print(f"[bold]search {sweep_id}[/]: {len(groups)} model × method group(s), budget "
                  f"{escape(spec.describe())}, bisection on the target in [0, {spec.max_sparsity:g}] to "
                  f"±{spec.tol:g}: at most {spec.max_probes} probes per group")
    out = R.Outcome(sweep_id, None, tr["uri"], tr["experiment"])
    parent = R.start_parent(out, tracker, launcher, console, True, grid.name,
                            params={"name": grid.name, "overrides": grid.overrides, "search": spec.text,
                                    "search_tol": spec.tol, "search_max_sparsity": spec.max_sparsity},
                            tags={"search_budget": spec.text, "n_groups": len(groups), "store": launcher["store"]})
    by_key: dict[str, dict] = {}
    all_cells: list[Cell] = []
    nodes_all: dict = {"results": {}, "actors": 0, "actor_deaths": 0}
    pool = WorkerPool() if launcher["affinity"] else None   # one set of model workers for every round
    with R.parent_run_guard(tracker, parent):
        try:
            store = open_store(launcher["store"], launcher["store_cache"])
            rnd = 0
            while active := [g for g in groups if not g.done(spec)]:
                rnd += 1
                cells = validate_cells(_probe_points(active, spec))
                probe_of = {c.key: (g, len(g.probes)) for g, c in zip(active, cells)}
                dag = build_dag(cells)
                done = tracker.finished_cells()
                todo = {k for k in dag.cells if k not in done}
                for k in dag.cells:
                    if k in done:
                        by_key[k] = {"status": R.SKIPPED, "run_id": done[k], "why": "already finished"}
                console.print(f"round {rnd}: " + ", ".join(f"{escape(g.label)} s={g.next_target(spec):g}" for g in active)
                              + (f" ({len(dag.cells) - len(todo)} from earlier runs)" if len(todo) < len(dag.cells) else ""))

                def tags(cell: Cell, result: dict | None) -> dict:
                    g, i = probe_of[cell.key]
                    t = {"search_id": sweep_id, "search_group": g.label, "search_probe": i, "search_budget": spec.text,
                         "search_tol": spec.tol}
                    if result is not None:
                        t["search_pass"] = int(probe_verdict(spec, quality_metrics(result))[0])
                    return t

                if todo:
                    nodes = R.run_dag(dag.only(todo), launcher, store, faults, tracker, parent, sweep_id, by_key,
                                      console, extra_tags=tags, pool=pool,
                                      verdict=lambda cell, result: probe_verdict(spec, quality_metrics(result)))
                    nodes_all["results"].update(nodes["results"])
                    nodes_all["actors"] += nodes["actors"]
                    nodes_all["actor_deaths"] += nodes["actor_deaths"]
                for c in dag.cells.values():
                    g, _ = probe_of[c.key]
                    st = by_key[c.key]
                    probe = {"target": c.sparsity, "run_id": st.get("run_id"), "status": st["status"]}
                    if st["status"] != R.FAILED:
                        m = nodes_all["results"].get(("cell", c.key))
                        metrics = quality_metrics(m) if m is not None else tracker.client.get_run(st["run_id"]).data.metrics
                        eff = m["effective"] if m is not None else metrics.get("sparsity/effective", float("nan"))
                        v, d = _value(spec, metrics)
                        probe.update(value=v, dense=d, effective=eff, threshold=_threshold(spec, d, v),
                                     **{"pass": _passes(spec, v, d)})
                        if probe["pass"]:
                            g.lo = max(g.lo, c.sparsity)
                        else:
                            g.hi = c.sparsity if g.hi is None else min(g.hi, c.sparsity)
                    g.probes.append(probe)
                all_cells += list(dag.cells.values())
        finally:
            if pool is not None:
                pool.close()
            stop_ray(out.ray_started)
        results = [g.result(spec) for g in groups]
        if nodes_all["results"]:
            out.nodes, out.model = node_counts(nodes_all), model_counts(nodes_all)
            tracker.set_tags(parent, out.nodes)
        out.statuses = R.grid_statuses(build_dag(all_cells), by_key) if all_cells else []
        res_dir = R.save_statuses(out, shared, tracker)
        summary = {"budget": spec.text, "describe": spec.describe(), "tol": spec.tol,
                   "max_sparsity": spec.max_sparsity, "groups": results}
        (res_dir / "search.json").write_text(json.dumps(summary, indent=1, default=str))
        tracker.log_artifact(parent, res_dir / "search.json")
        console.print(search_table(results, spec), markup=False, highlight=False)
        R.write_report(out, shared, console, budgets={spec.quality.name: spec.budget.spec})
        out.wall_s = time.perf_counter() - t_start
        R.end_parent(tracker, parent, out,
                     {**{f"search/{_slug(r['group'])}/found_target": r["found_target"] for r in results},
                      **{f"search/{_slug(r['group'])}/n_probes": r["n_probes"] for r in results}})
    return out


def _threshold(spec: SearchSpec, dense: float, value: float) -> float:
    return spec.budget.threshold(spec.quality, dense, [dense, value])


def _passes(spec: SearchSpec, value: float, dense: float) -> bool:
    thr = _threshold(spec, dense, value)
    return value >= thr if spec.quality.higher_is_better else value <= thr


def probe_verdict(spec: SearchSpec, metrics: dict) -> tuple[bool, str]:
    """(whether a probe's quality is within the budget, `within ppl<=1.05x (limit 23.49)` or `over ...`)."""
    v, d = _value(spec, metrics)
    ok = _passes(spec, v, d)
    return ok, f"{'within' if ok else 'over'} {spec.text} (limit {spec.quality.fmt(_threshold(spec, d, v))})"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:200]


def search_table(results: list[dict], spec: SearchSpec) -> str:
    """The console's answer: per group, the largest measured target within budget and how it was bracketed."""
    q = spec.quality
    lines = [f"Search: largest target with {spec.describe()} (bisection to ±{spec.tol:g}; every value measured)", "",
             f"{'group':<40} {'target':>7} {'effective':>9} {q.name:>10} {'probes':>6}  bracket / status"]
    for r in results:
        val = q.fmt(r["found_quality"]) if r["found_quality"] is not None else "–"
        lines.append(f"{r['group']:<40} {r['found_target']:>7.4f} {r['found_effective']:>9.3f} {val:>10} "
                     f"{r['n_probes']:>6}  [{r['bracket'][0]:.4f}, {r['bracket'][1]:.4f}] {r['status']}")
    return "\n".join(lines) + "\n"
