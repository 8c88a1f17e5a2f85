"""The work of one DAG node, as plain functions that Ray runs in worker processes (tasks or model actors).

Each returns a small dict (keys, numbers, text); big things (stats, plans) go through the artifact
store (store.py), written atomically with checksums, so a node whose artifact is already valid is not
recomputed and a node on another machine reads it by key. Workers never talk to MLflow: the driver
logs what these return.

Every result carries `model` (loads, cache hits and seconds spent loading in this task: the driver
sums them to measure what model affinity saves) and `worker` (Ray node, process id, host).
A GPU out-of-memory error in calibration or evaluation is retried with half the batch size
(`launcher.oom_retries` times); faults.py can inject one, and a hold, for tests.
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections import OrderedDict
from pathlib import Path

from ..errors import ActsparseError
from . import faults as _faults
from ..eval.measures import Context, Skip, get_measure
from .cells import Cell, DenseNode, ModelRef, PlanNode, StatsNode
from .store import Store, open_store

_MODELS: "OrderedDict[tuple, tuple]" = OrderedDict()   # (model key, device) -> (model, tok), per worker process
_LOADS: dict = {"loads": 0, "hits": 0, "load_s": 0.0}  # this task's model loads; reset by each task


def resolve_device(device: str) -> str:
    """Return the torch device a task uses for the configured device (auto: cuda when present)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _fit_device(device: str) -> str:
    """Fits run where the task runs: on CPU when Ray gave this task no GPU (launcher.fit.num_gpus=0)."""
    import torch

    device = resolve_device(device)
    return device if device == "cpu" or torch.cuda.is_available() else "cpu"


def _threads(n: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(n)))


def _model(ref: ModelRef, device: str, cache_size: int):
    """(model, tok), reusing the one this worker process loaded for an earlier task of the same model."""
    from ..models.load import load_model

    key = (ref.key, device)
    if key in _MODELS:
        _MODELS.move_to_end(key)
        _LOADS["hits"] += 1
        return _MODELS[key]
    while _MODELS and len(_MODELS) >= max(cache_size, 1):
        _MODELS.popitem(last=False)
        _free_cuda()
    dtype = None if ref.dtype == "auto" else ref.dtype
    _warm_imports()  # a process's first load would otherwise count transformers' import time as loading
    t0 = time.perf_counter()
    pair = load_model(ref.name, dtype=dtype, device=worker_devices(device), revision=ref.revision)
    _LOADS["loads"] += 1
    _LOADS["load_s"] += time.perf_counter() - t0
    if cache_size > 0:
        _MODELS[key] = pair
    return pair


def worker_devices(device: str) -> "str | list[str]":
    """Where a model loads: over every GPU of this worker when Ray gave it several (its model does not fit one:
    sweep/placement.py sized the request), else on `device`."""
    if device != "cuda":
        return device
    import torch

    try:
        import ray

        n = len(ray.get_gpu_ids()) if ray.is_initialized() else 0
    except Exception:  # outside a Ray worker
        n = 0
    if n > 1 and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return device


def _warm_imports() -> None:
    """Import what every model load needs (seconds, once per process), so load times measure loading."""
    import transformers.modeling_utils  # noqa: F401
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def _begin() -> None:
    _LOADS.update(loads=0, hits=0, load_s=0.0)


def _end(result: dict) -> dict:
    """Add this task's model loads and where it ran to its result."""
    try:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # outside Ray (direct calls in tests)
        node = ""
    result["model"] = dict(_LOADS)
    result["worker"] = {"node": node, "pid": os.getpid(), "host": socket.gethostname()}
    return result


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _oom_errors() -> tuple:
    import torch

    return tuple({getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)} - {None})


def retry_oom(run, batch_size: int, retries: int, what: str, knob: str, inject=None):
    """Return (run(b), b, n_retries): on out-of-memory, retry up to `retries` times with half the batch."""
    call = inject(run) if inject is not None else run
    oom, bs, n = _oom_errors(), int(batch_size), 0
    while True:
        try:
            return call(bs), bs, n
        except oom as e:
            if n >= retries or bs == 1:
                tried = f"at batch_size {bs}" + (f" (retried {n}x from {batch_size})" if n else "")
                raise ActsparseError(f"{what} ran out of GPU memory {tried}; lower {knob}, set a smaller model "
                                     "dtype, or run on a GPU with more memory") from e
            del e
            _free_cuda()
            n, bs = n + 1, max(1, bs // 2)


def _as_store(store: "Store | str") -> Store:
    return open_store(store) if isinstance(store, str) else store


def _need(st: Store, kind: str, key: str, what: str) -> Path:
    path = st.fetch(kind, key)
    if path is None:
        raise ActsparseError(f"the {what} artifact {kind}/{key} is missing or corrupt in the store {st.url}; "
                             "re-run the sweep to recompute it")
    return path


def _meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def calibrate_task(node: StatsNode, store: "Store | str", device: str, threads: float, cache_size: int,
                   faults: dict | None = None, oom_retries: int = 1) -> dict:
    """Calibrate once per stats_key into the store's stats/<key>; return its key, source and time."""
    from ..calibration.collect import calibrate

    _begin()
    st = _as_store(store)
    f = _faults.select(faults, "calibrate", node.model.name)
    _faults.hold(f.get("hold"))
    _faults.raise_now(f.get("raise"))
    path = st.fetch("stats", node.key)
    if path is not None:
        return _end({"key": node.key, "path": str(path), "source": "cache",
                     "time_s": float(_meta(path)["meta"].get("time_s", 0.0))})
    _threads(threads)
    model, tok = _model(node.model, resolve_device(device), cache_size)
    t0 = time.perf_counter()
    stats, bs, n_oom = retry_oom(
        lambda b: calibrate(model, tok, data=node.data, tokens=node.tokens, seq_len=node.seq_len, batch_size=b,
                            sample_size=node.sample_size, seed=node.seed, progress=False),
        node.batch_size, oom_retries, "calibration", "data.batch_size", _faults.OomInjector(f.get("oom")))
    dt = time.perf_counter() - t0
    stats.meta["sweep_stats_key"] = node.key
    stats.meta["time_s"] = dt
    target = st.target("stats", node.key)
    stats.save(target)
    path = st.publish("stats", node.key, target)
    return _end({"key": node.key, "path": str(path), "source": "computed", "time_s": dt, "oom_retries": n_oom,
                 "batch_size": bs})


def fit_task(node: PlanNode, store: "Store | str", stats: dict, device: str, threads: float, cache_size: int,
             faults: dict | None = None) -> dict:
    """Fit once per plan_key into the store's plans/<key>; return its key, source, fit time and expected sparsity."""
    from ..calibration.stats import Stats
    from ..sparsifiers.plan import SparsityPlan
    from ..sparsifiers.registry import fit

    _begin()
    st = _as_store(store)
    f = _faults.select(faults, "fit", f"{node.method} {node.target:g}")
    _faults.hold(f.get("hold"))
    _faults.raise_now(f.get("raise"))
    path = st.fetch("plans", node.key)
    if path is not None:
        plan, source = SparsityPlan.load(path), "cache"
    else:
        _threads(threads)
        model = _model(node.model, _fit_device(device), cache_size)[0] if node.needs_model else None
        s = Stats.load(_need(st, "stats", stats["key"], "calibration"))
        plan = fit(node.method, s, sparsity=node.target, model=model, **node.given)
        plan.meta["sweep_plan_key"] = node.key
        target = st.target("plans", node.key)
        plan.save(target)
        path = st.publish("plans", node.key, target)
        source = "computed"
    return _end({"key": node.key, "path": str(path), "source": source, "fit_s": float(plan.meta.get("fit_s", 0.0)),
                 "expected_effective": plan.effective_sparsity, "n_rules": len(plan.rules)})


def dense_task(node: DenseNode, store: "Store | str", device: str, threads: float, cache_size: int,
               faults: dict | None = None, oom_retries: int = 1) -> dict:
    """The dense values of the spec's dense measures (perplexity, lm-eval accuracy) once per model x eval spec, kept
    in the store's dense/<key>; measures without a dense side (fidelity compares with the cell's own model with the
    plan lifted) are not run here."""
    from ..artifacts import save_tensors_json

    _begin()
    st = _as_store(store)
    f = _faults.select(faults, "dense", node.model.name)
    _faults.hold(f.get("hold"))
    _faults.raise_now(f.get("raise"))
    ev = node.eval
    names = ev.dense_measures()
    path = st.fetch("dense", node.key)
    if path is not None:
        m = _meta(path)
        return _end({"key": node.key, "values": _dense_values(m, ev), "skipped": m.get("skipped", {}),
                     "time_s": m["time_s"], "source": "cache"})
    values, skipped, bs, n_oom, dt = {}, {}, ev.batch_size, 0, 0.0
    if names:
        _threads(threads)
        device = resolve_device(device)
        model, tok = _model(node.model, device, cache_size)
        t0 = time.perf_counter()
        inject = _faults.OomInjector(f.get("oom"))
        for i, name in enumerate(names):
            m = get_measure(name, ev.modules.get(name))
            try:
                values[m.key], b, n = _run_measure(m, _context(model, tok, ev, m, device=device), oom_retries,
                                                   f"dense {m.title}", inject if i == 0 else None)
            except Skip as why:        # the cells skip it too, with this reason
                skipped[m.key] = str(why)
                continue
            bs, n_oom = (b if m.batch_knob == "eval.batch_size" else bs), n_oom + n
        dt = time.perf_counter() - t0
    target = st.target("dense", node.key)
    # "ppl" and "acc" are where actsparse releases without the measure registry read a dense evaluation; a store
    # may be shared by both
    save_tensors_json(target, {}, {"kind": "dense_eval", "ppl": values.get("ppl"), "acc": values.get("acc", {}),
                                   "values": values, "skipped": skipped, "time_s": dt, "eval": ev.dense_identity(),
                                   "batch_size": bs})
    st.publish("dense", node.key, target)
    return _end({"key": node.key, "values": values, "skipped": skipped, "time_s": dt, "source": "computed",
                 "oom_retries": n_oom})


def _dense_values(meta: dict, ev) -> dict:
    """{result key: dense value} from a stored dense evaluation (older ones keep only "ppl" and "acc")."""
    if "values" in meta:
        return meta["values"]
    keys = {get_measure(n, ev.modules.get(n)).key for n in ev.dense_measures()}
    return {k: meta[k] for k in ("ppl", "acc") if k in keys and meta.get(k) is not None}


def _context(model, tok, ev, m, plan=None, device: str = "cpu", handle=None) -> Context:
    return Context(model, tok, ev.data, ev.seq_len, ev.stride, ev.max_tokens, ev.batch_size,
                   m.parse_settings(ev.settings.get(m.name)), plan, device, handle)


def _run_measure(m, ctx: Context, oom_retries: int, what: str, inject=None, reset=None) -> tuple:
    """(value, batch size used, OOM retries): the measure run, its batch halved on out-of-memory (when it has one).

    `reset` runs before every attempt: a retried measurement must not count the aborted batches' sparsity."""
    def run(b):
        if reset is not None:
            reset()
        return m.run(ctx, b)

    bs = m.batch_size(ctx)
    if bs is None:
        return run(None), None, 0
    return retry_oom(run, bs, oom_retries, what, m.batch_knob, inject)


def cell_task(cell: Cell, store: "Store | str", stats: dict, plan: dict, dense: dict, threads: float,
              cache_size: int, faults: dict | None = None, oom_retries: int = 1) -> dict:
    """Evaluate one cell: sparsify with its plan and token policy and run its measures in eval.measure's order
    (those that install the plan themselves, like decode speed, after the others); activation sparsity is measured
    during the first measure that runs the sparsified model."""
    from ..sparsifiers.apply import sparsify
    from ..sparsifiers.plan import SparsityPlan

    _begin()
    t_start = time.time()
    st = _as_store(store)
    f = _faults.select(faults, "cell", cell.label)
    _faults.hold(f.get("hold"))
    _faults.raise_now(f.get("raise"))
    device = resolve_device(cell.device)
    p = SparsityPlan.load(_need(st, "plans", plan["key"], "plan"))
    ev = cell.eval
    ms = [get_measure(n, ev.modules.get(n)) for n in ev.measure]
    bs, n_oom, out = ev.batch_size, 0, {}
    measured = {"per_point": {}, "mean": 0.0, "per_role": {}, "effective": p.effective_sparsity}
    t0 = time.perf_counter()
    for m in ms:   # a measure the dense node skipped, or one that says up front it cannot run here
        why = dense.get("skipped", {}).get(m.key) or m.skip_reason(device)
        if why:
            out[f"{m.name}_skipped"] = why
    ms = [m for m in ms if f"{m.name}_skipped" not in out]
    hooked = [m for m in ms if m.sparsified]
    if not p.rules:  # nothing is sparsified: the model is the dense model, whose values are known
        for m in hooked:
            v = m.at_dense_plan(dense["values"].get(m.key))
            if v is not None:
                out[m.key] = v
        hooked = []
    if hooked:
        _threads(threads)
        model, tok = _model(cell.plan.model, device, cache_size)
        with sparsify(model, p, backend="torch", token_policy=ev.token_policy) as h:
            first = True      # activation sparsity is read after the first measure that runs
            for m in hooked:
                try:
                    out[m.key], b, n = _run_measure(m, _context(model, tok, ev, m, p, device, h), oom_retries,
                                                    m.title, _faults.OomInjector(f.get("oom")) if first else None,
                                                    h.reset_counters if first else None)
                except Skip as why:
                    out[f"{m.name}_skipped"] = str(why)
                    continue
                n_oom += n
                bs = b if m.batch_knob == "eval.batch_size" else bs   # the tag eval_batch_size: eval.batch_size's
                if first:
                    measured, first = h.measured_sparsity(), False
    eval_s = time.perf_counter() - t0
    for m in ms:
        if not m.sparsified:
            model, tok = _model(cell.plan.model, device, cache_size)
            try:
                out[m.key], _, n = _run_measure(m, _context(model, tok, ev, m, p, device), oom_retries, m.title)
                n_oom += n
            except Skip as why:
                out[f"{m.name}_skipped"] = str(why)
    r = {"target": p.target, "effective": measured["effective"], "expected_effective": p.effective_sparsity,
         "act_mean": measured["mean"], "per_role": measured["per_role"], "per_point": measured["per_point"],
         "calibrate_s": stats["time_s"], "stats_source": stats["source"], "fit_s": plan["fit_s"],
         "eval_s": eval_s, "plan_summary": p.summary(), "device": device, "host": socket.gethostname(),
         "eval_batch_size": bs, "oom_retries": n_oom, "t_start": t_start, "t_end": time.time(), **out,
         "dense": {k: v for k, v in dense["values"].items() if k in out}}
    return _end(r)


def crash_log(crash_dir: str, pid: int) -> Path:
    """Where a model worker's faulthandler writes when a fatal signal (SIGSEGV, SIGABRT, ...) kills it."""
    return Path(crash_dir) / f"worker-{pid}.log"


class ModelWorker:
    """A Ray actor that runs nodes and keeps the models it loaded (launcher.model_cache) between them (affinity)."""

    def __init__(self, crash_dir: str | None = None, faults: dict | None = None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if crash_dir:  # a fatal signal (SIGSEGV, SIGABRT, ...) leaves its name and traceback for the driver
            import faulthandler

            os.makedirs(crash_dir, exist_ok=True)
            self._crash_file = open(crash_log(crash_dir, os.getpid()), "w")
            faulthandler.enable(self._crash_file)
        _faults.raise_now(_faults.select(faults, "worker", "").get("raise"))
        _warm_imports()

    def run(self, stage: str, *args) -> dict:
        """Run one node (stage: calibrate | fit | dense | cell) in this process; return the task's result."""
        return _STAGES[stage](*args)

    def pid(self) -> int:
        """The worker's process id (what a SIGKILL would hit)."""
        return os.getpid()


_STAGES = {"calibrate": calibrate_task, "fit": fit_task, "dense": dense_task, "cell": cell_task}
