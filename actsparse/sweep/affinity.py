"""Model affinity: run the sweep's nodes on long-lived Ray actors, each keeping its current model loaded.

The driver schedules the DAG itself: a node is ready when the nodes it depends on have results, and a
ready node goes to an idle actor that holds its model (one node in flight per actor, so a dead actor
blames exactly one node). Calibrations, dense evaluations, cell evaluations, and the fits whose method
needs the model, run on the actors; fits that need only the statistics run as plain CPU tasks when the
cluster has CPUs beside the actors, else on the actors too (a CPU-only box then has no idle core).

Actors are the cluster's evaluation slots: `floor(GPUs / gpus per actor)` (or CPUs when actors take no
GPU), capped by `launcher.max_workers`, started as work appears. An actor's GPUs are its model's
(`launcher.model_gpus`, from the cells' memory estimates: placement.py); actors of different sizes share the
cluster, and an idle actor whose size has no work left is ended when another size waits for its GPUs.
An actor serves one model at a time, of its size:
- it keeps taking its model's nodes while that model has any left (waiting for them if need be);
- when its model is done, it moves to the next model, preferring one no actor serves yet (grid order),
  then the one with most work queued per actor; moving costs one model load (the old one is evicted,
  `launcher.model_cache`), never a new process;
- a second actor joins a model only when more than twice as many of its nodes are queued as actors serve
  it (a sweep's tail does not trigger model loads), up to `launcher.workers_per_model`.
A node whose actor died (SIGKILL, a segfault, a lost node) runs again on a fresh actor,
`launcher.max_retries` times; an exception is final and fails the nodes that depend on it.

With `launcher.affinity=false` the same loop runs every node as a plain Ray task with its stage's resources
(no actors): a task reuses a model only when its worker process loaded it for an earlier task
(`launcher.model_cache`), and Ray retries a task whose worker died.
"""
from __future__ import annotations

import math
import re
import tempfile
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .cells import Cell
from .dag import SweepDag

# stage name as the failure messages say it, and the scheduling priority of each node kind
STAGE = {"stats": "calibration", "plan": "fit", "dense": "dense evaluation", "cell": "evaluation"}
_PRIORITY = {"stats": 0, "dense": 1, "plan": 2, "cell": 3}
_TASK = {"stats": "calibrate", "plan": "fit", "dense": "dense", "cell": "cell"}
_RESOURCES = {"stats": "calibrate", "plan": "fit", "dense": "evaluate", "cell": "evaluate"}   # launcher.<stage>


@dataclass
class Failure:
    """Why a node did not produce a result: one-line message (with the stage) and the full traceback."""
    message: str
    traceback: str


@dataclass
class _Job:
    kind: str                       # stats | plan | dense | cell
    key: str
    model: str                      # model key: the affinity
    node: object
    deps: list[tuple[str, str]]
    on_actor: bool
    attempts: int = 0               # times its worker died under it
    running: bool = False
    dependents: list[tuple[str, str]] = field(default_factory=list)

    @property
    def id(self) -> tuple[str, str]:
        return (self.kind, self.key)


class WorkerPool:
    """The model workers (Ray actors) of one or more scheduler runs, and where their crash logs go.

    A sweep runs its DAG once and closes the pool; a search runs one DAG per round and keeps the pool, so a
    round's probes find their model already loaded by the previous round's worker.
    """

    def __init__(self):
        self.slots: list[_Slot] = []
        self.crash_dir = tempfile.mkdtemp(prefix="actsparse-workers-")   # faulthandler logs of the model workers
        self.oom_kills_at_start = oom_kills()

    def close(self) -> None:
        """Kill every worker and remove the crash logs."""
        import shutil

        import ray

        for s in self.slots:
            ray.kill(s.actor, no_restart=True)
        self.slots.clear()
        shutil.rmtree(self.crash_dir, ignore_errors=True)


@dataclass
class _Slot:
    actor: object
    gpus: float = 0.0               # its Ray GPU request: the size of the models it may serve
    model: str | None = None        # the model it serves now
    busy: object | None = None      # the ObjectRef in flight, if any


class AffinityScheduler:
    """Runs a SweepDag on model-keeping Ray actors (or, without affinity, as plain Ray tasks); calls
    on_cell(cell, result | None, Failure | None) per cell."""

    def __init__(self, dag: SweepDag, launcher: dict, store, faults: dict,
                 on_cell: Callable[[Cell, dict | None, Failure | None], None], pool: WorkerPool | None = None):
        self.dag, self.launcher, self.store, self.faults, self.on_cell = dag, launcher, store, faults, on_cell
        self.results: dict[tuple, dict] = {}
        self.failures: dict[tuple, Failure] = {}
        self.jobs: dict[tuple, _Job] = {}
        self.own_pool = pool is None                      # a pool it made itself is closed when it is done
        self.pool = pool or WorkerPool()
        self.slots = self.pool.slots
        self.inflight: dict = {}                          # ObjectRef -> (job, slot or None)
        self.ready: dict[str, list[_Job]] = defaultdict(list)
        self.ready_tasks: list[_Job] = []
        self.queued: dict[str, int] = defaultdict(int)    # actor nodes per model: unfinished and not running
        self.left = 0                                     # unfinished nodes
        self.actors_started = 0
        self.actor_deaths = 0
        self.caps: dict[float, int] = {}                  # actors the cluster holds, per actor size (GPUs)
        self.fits_as_tasks = False
        self.remote_tasks: dict = {}                      # node kind -> its task function as a Ray remote function

    # -- set-up --------------------------------------------------------------------------------------------
    def _actor_resources(self, model: str | None = None) -> dict:
        """A model worker's Ray request: the larger calibrate/evaluate CPUs, and its model's GPUs."""
        cal, ev = self.launcher["calibrate"], self.launcher["evaluate"]
        gpus = max(cal["num_gpus"], ev["num_gpus"])
        return {"num_cpus": max(cal["num_cpus"], ev["num_cpus"]),
                "num_gpus": self.launcher.get("model_gpus", {}).get(model, gpus)}

    def _size(self) -> None:
        """How many actors of each size the cluster holds, and whether CPU fits fit beside them."""
        import ray

        res = ray.cluster_resources()
        models = {c.plan.model.key for c in self.dag.cells.values()}
        fit, free_cpu, free_gpu = self.launcher["fit"], res.get("CPU", 0), res.get("GPU", 0)
        for m in models:
            want = self._actor_resources(m)
            by_cpu = math.floor(res.get("CPU", 0) / want["num_cpus"] + 1e-9) if want["num_cpus"] > 0 else math.inf
            by_gpu = math.floor(res.get("GPU", 0) / want["num_gpus"] + 1e-9) if want["num_gpus"] > 0 else math.inf
            cap = min(by_cpu, by_gpu)
            if cap == math.inf:   # actors that ask for nothing: one per model is plenty
                cap = len(models)
            if self.launcher.get("max_workers"):
                cap = min(cap, self.launcher["max_workers"])
            cap = self.caps[want["num_gpus"]] = max(1, int(cap))
            free_cpu = min(free_cpu, res.get("CPU", 0) - cap * want["num_cpus"])
            free_gpu = min(free_gpu, res.get("GPU", 0) - cap * want["num_gpus"])
        self.fits_as_tasks = free_cpu >= max(fit["num_cpus"], 1e-9) and free_gpu >= fit["num_gpus"]

    def _build(self) -> None:
        d, actors = self.dag, bool(self.launcher["affinity"])
        for k, n in d.stats.items():
            self._add(_Job("stats", k, n.model.key, n, [], actors))
        for k, n in d.dense.items():
            self._add(_Job("dense", k, n.model.key, n, [], actors))
        for k, n in d.plans.items():
            self._add(_Job("plan", k, n.model.key, n, [("stats", n.stats_key)],
                           actors and (n.needs_model or not self.fits_as_tasks)))
        for k, c in d.cells.items():
            self._add(_Job("cell", k, c.plan.model.key, c, [("stats", c.stats.key), ("plan", c.plan.key),
                                                               ("dense", c.dense.key)], actors))
        for j in self.jobs.values():
            for dep in j.deps:
                self.jobs[dep].dependents.append(j.id)
            if not j.deps:
                self._make_ready(j)

    def _add(self, job: _Job) -> None:
        self.jobs[job.id] = job
        self.left += 1
        if job.on_actor:
            self.queued[job.model] += 1

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Run every node to a result or a failure; kill the actors on the way out (Ctrl-C included)."""
        import ray

        self._size()
        self._build()
        try:
            while self.left:
                self._staff()
                self._dispatch()
                if not self.inflight:  # cannot happen with a well-formed DAG; never spin silently
                    raise RuntimeError(f"sweep scheduler stalled with {self.left} nodes left")
                done, _ = ray.wait(list(self.inflight), num_returns=1, timeout=0.5)
                for ref in done:
                    self._complete(ref)
        except BaseException:  # on Ctrl-C or an error: leave nothing running on the cluster
            self.pool.close()
            raise
        finally:
            for ref, (_, slot) in self.inflight.items():
                if slot is None:
                    ray.cancel(ref, force=True)
        if self.own_pool:
            self.pool.close()

    def _staff(self) -> None:
        """Per actor size, start actors up to its cap while its queued nodes outnumber its actors and the cluster
        has room; end idle actors of a size without work when another size waits for room."""
        import ray

        from .tasks import ModelWorker

        queued, asks = defaultdict(int), {}
        for m, q in self.queued.items():
            if q:
                res = self._actor_resources(m)
                queued[res["num_gpus"]] += q
                asks[res["num_gpus"]] = res
        for gpus, q in sorted(queued.items(), key=lambda x: -x[1]):
            res = asks[gpus]
            while self._count(gpus) < min(self.caps.get(gpus, 1), q):
                if not self._room(res):
                    idle = [s for s in self.slots if s.busy is None and not queued.get(s.gpus)]
                    if not idle:
                        break
                    ray.kill(idle[0].actor, no_restart=True)
                    self.slots.remove(idle[0])
                    continue
                self.actors_started += 1
                actor = ray.remote(ModelWorker).options(num_cpus=res["num_cpus"], num_gpus=res["num_gpus"],
                                                        max_restarts=0, max_task_retries=0,
                                                        max_concurrency=1).remote(self.pool.crash_dir, self.faults)
                self.slots.append(_Slot(actor, res["num_gpus"]))

    def _count(self, gpus: float) -> int:
        return sum(s.gpus == gpus for s in self.slots)

    def _room(self, res: dict) -> bool:
        """Whether the cluster has the GPUs (and CPUs) for one more actor beside the ones started."""
        import ray

        have, cpus = ray.cluster_resources(), self._actor_resources()["num_cpus"]
        gpu_ok = res["num_gpus"] == 0 or sum(s.gpus for s in self.slots) + res["num_gpus"] <= have.get("GPU", 0) + 1e-9
        cpu_ok = cpus == 0 or (len(self.slots) + 1) * cpus <= have.get("CPU", 0) + 1e-9
        return not self.slots or (gpu_ok and cpu_ok)   # the first actor always (Ray queues it if it must)

    def _serving(self) -> dict[str, int]:
        n = defaultdict(int)
        for s in self.slots:
            if s.model is not None:
                n[s.model] += 1
        return n

    def _choose_model(self, slot: _Slot) -> str | None:
        """The model an idle actor should serve next (its own while that has work; see the module doc)."""
        serving = self._serving()
        if slot.model is not None and self.queued[slot.model]:
            return slot.model
        if slot.model is not None:
            serving[slot.model] -= 1
        per = self.launcher.get("workers_per_model") or self.caps.get(slot.gpus, 1)
        cand = [m for m, q in self.queued.items() if q and serving[m] < per and (serving[m] == 0 or q > 2 * serving[m])
                and self._actor_resources(m)["num_gpus"] == slot.gpus]
        if not cand:
            return None
        return min(cand, key=lambda m: (serving[m] > 0, -self.queued[m] / (serving[m] + 1)))

    def _dispatch(self) -> None:
        import ray

        from . import tasks

        for s in self.slots:
            if s.busy is not None:
                continue
            s.model = self._choose_model(s)
            queue = self.ready.get(s.model) if s.model is not None else None
            if queue:
                queue.sort(key=lambda j: _PRIORITY[j.kind])
                job = queue.pop(0)
                job.running = True
                self.queued[job.model] -= 1
                s.busy = s.actor.run.remote(_TASK[job.kind], *self._args(job))
                self.inflight[s.busy] = (job, s)
        while self.ready_tasks:
            job = self.ready_tasks.pop(0)
            job.running = True
            if job.kind not in self.remote_tasks:
                fn = {"stats": tasks.calibrate_task, "plan": tasks.fit_task, "dense": tasks.dense_task,
                      "cell": tasks.cell_task}[job.kind]
                self.remote_tasks[job.kind] = ray.remote(fn)
            res = self.launcher[_RESOURCES[job.kind]]
            gpus = res["num_gpus"]
            if gpus > 0 and job.kind != "plan":   # a GPU stage of a model larger than its request: the model's GPUs
                gpus = max(gpus, self._actor_resources(job.model)["num_gpus"])
            ref = self.remote_tasks[job.kind].options(
                num_cpus=res["num_cpus"], num_gpus=gpus, max_retries=self.launcher["max_retries"],
                retry_exceptions=False, name=f"{_TASK[job.kind]}:{job.key[:8]}").remote(*self._args(job))
            self.inflight[ref] = (job, None)

    def _args(self, job: _Job) -> tuple:
        L, r = self.launcher, self.results
        first = self.dag.first_cell[job.key] if job.kind != "cell" else job.node
        threads = L[_RESOURCES[job.kind]]["num_cpus"]
        cache, f, oom = L["model_cache"], self.faults, L["oom_retries"]
        if job.kind == "stats":
            return (job.node, self.store, first.device, threads, cache, f, oom)
        if job.kind == "plan":
            return (job.node, self.store, r[job.deps[0]], first.device, threads, cache, f)
        if job.kind == "dense":
            return (job.node, self.store, first.device, threads, cache, f, oom)
        return (job.node, self.store, r[job.deps[0]], r[job.deps[1]], r[job.deps[2]], threads, cache, f, oom)

    # -- results -------------------------------------------------------------------------------------------------
    def _complete(self, ref) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        job, slot = self.inflight.pop(ref)
        job.running = False
        if slot is not None:
            slot.busy = None
        try:
            result = ray.get(ref)
        except RayActorError as e:        # the worker process died under the node (SIGKILL, segfault, lost node)
            if slot is not None and slot in self.slots:
                self.slots.remove(slot)   # a fresh actor replaces it on the next _staff()
            if getattr(e, "actor_init_failed", False):   # it raised while starting: a retry would raise again
                kind_, first, tb = _creation_error(e)
                self._fail(job, _failure(job.kind, f"its model worker could not start: {kind_}", tb, first))
                return
            self.actor_deaths += 1
            job.attempts += 1
            if job.attempts <= self.launcher["max_retries"]:
                if job.on_actor:
                    self.queued[job.model] += 1
                self._make_ready(job)
                return
            self._fail(job, _death_failure(job.kind, e, job.attempts, self.pool.crash_dir,
                                                     self.pool.oom_kills_at_start))
        except RayTaskError as e:
            cause = e.cause if e.cause is not None else e
            self._fail(job, _failure(job.kind, cause, str(e)))
        except Exception as e:            # e.g. a plain task's worker crashed past its retries
            self._fail(job, _failure(job.kind, e, traceback.format_exc()))
        else:
            self._done(job, result)

    def _make_ready(self, job: _Job) -> None:
        (self.ready[job.model] if job.on_actor else self.ready_tasks).append(job)

    def _done(self, job: _Job, result: dict) -> None:
        self.results[job.id] = result
        self.left -= 1
        if job.kind == "cell":
            self.on_cell(job.node, result, None)
        for d in job.dependents:
            dep = self.jobs[d]
            if d not in self.failures and all(x in self.results for x in dep.deps):
                self._make_ready(dep)

    def _fail(self, job: _Job, failure: Failure) -> None:
        """Record a failure and pass it to every node that depends on this one (same message: the root cause)."""
        if job.id in self.failures:
            return
        self.failures[job.id] = failure
        self.left -= 1
        if job.kind == "cell":
            self.on_cell(job.node, None, failure)
        for d in job.dependents:
            dep = self.jobs[d]
            if dep.on_actor and d not in self.failures:
                self.queued[dep.model] -= 1   # it will never run
            self._fail(dep, failure)


def _failure(kind: str, cause: BaseException | str, tb: str, first_line: str | None = None) -> Failure:
    """`<stage> failed: <ExceptionType>: <first line of its message>`, the full traceback kept beside it."""
    if isinstance(cause, BaseException):
        text = str(cause).strip().splitlines()
        cause, first_line = type(cause).__name__, text[0] if text else ""
    return Failure(f"{STAGE[kind]} failed: {cause}: {first_line or ''}", tb)


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): ?(.*)$")


def _creation_error(e: BaseException) -> tuple[str, str, str]:
    """(exception type, first line of its message, traceback) of the error a model worker raised while starting."""
    text = str(e)
    for line in reversed(text.splitlines()):
        m = _EXC_LINE.match(line.strip())
        if m:
            return m.group(1).rsplit(".", 1)[-1], m.group(2), text
    return type(e).__name__, "the model worker raised while starting", text


def oom_kills() -> int | None:
    """The kernel's count of OOM kills in this process's cgroup (cgroup v2), or None where it cannot be read."""
    try:
        for line in Path("/sys/fs/cgroup/memory.events").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _death_failure(kind: str, e: BaseException, attempts: int, crash_dir: str, oom_before: int | None) -> Failure:
    """Say how a worker process died: the fatal signal its faulthandler caught, an OOM kill the kernel counted,
    or, when neither left a trace, that something it could not catch (SIGKILL, a lost node) ended it."""
    from .tasks import crash_log

    text = str(e)
    m = re.search(r"(?:\bpid: |Worker PID: |pid=)(\d+)", text)
    pid = int(m.group(1)) if m else None
    who = f"its worker process{f' (pid {pid})' if pid else ''} died {attempts} time(s)"
    log = crash_log(crash_dir, pid) if pid else None
    fatal = log.read_text().strip().splitlines() if log is not None and log.exists() else []
    now = oom_kills()
    if fatal:
        how = f"{fatal[0]} (its faulthandler log: {log})"
    elif "OutOfMemoryError" in type(e).__name__ or re.search(r"low on memory|memory pressure", text):
        how = ("Ray's memory monitor killed it for lack of memory; lower data.batch_size / eval.batch_size, run "
               "fewer workers (launcher.max_workers) or give them more memory")
    elif oom_before is not None and now is not None and now > oom_before:
        how = (f"the kernel's out-of-memory killer killed it (cgroup oom_kill {oom_before} -> {now}); lower "
               "data.batch_size / eval.batch_size, run fewer workers (launcher.max_workers) or give them more memory")
    else:
        counted = ("no out-of-memory kill was counted" if now is not None
                   else "this machine does not expose its out-of-memory kill count")
        how = ("it ended without a Python error or a fatal-signal trace: killed by a signal it cannot catch "
               f"(SIGKILL: `kill -9`, `ray stop --force`) or its node was lost; {counted}")
    return Failure(f"{STAGE[kind]} failed: {who}: {how}; launcher.max_retries retries a node whose worker dies",
                   text)
