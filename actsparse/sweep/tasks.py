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
    pair = load_model(ref.name, dtype=dtype, device=device, revision=ref.revision)
    _LOADS["loads"] += 1
    _LOADS["load_s"] += time.perf_counter() - t0
    if cache_size > 0:
        _MODELS[key] = pair
    return pair


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
    """Dense quality once per model x eval spec, kept in the store's dense/<key>: perplexity and/or lm-eval
    accuracy, as the spec measures (fidelity's dense reference is the cell's own model with the plan lifted)."""
    from ..artifacts import save_tensors_json

    _begin()
    st = _as_store(store)
    f = _faults.select(faults, "dense", node.model.name)
    _faults.hold(f.get("hold"))
    _faults.raise_now(f.get("raise"))
    path = st.fetch("dense", node.key)
    if path is not None:
        m = _meta(path)
        return _end({"key": node.key, "ppl_dense": m["ppl"], "acc_dense": m.get("acc", {}), "time_s": m["time_s"],
                     "source": "cache"})
    ev = node.eval
    ppl, acc, bs, n_oom, dt = None, {}, ev.batch_size, 0, 0.0
    if ev.has("ppl") or ev.has("lm_eval"):
        _threads(threads)
        model, tok = _model(node.model, resolve_device(device), cache_size)
        t0 = time.perf_counter()
        inject = _faults.OomInjector(f.get("oom"))
        if ev.has("ppl"):
            ppl, bs, n_oom = _ppl(model, tok, ev, oom_retries, inject, "dense evaluation")
        if ev.has("lm_eval"):
            acc, _, n = _accuracy(model, tok, ev, oom_retries, "dense lm-eval")
            n_oom += n
        dt = time.perf_counter() - t0
    target = st.target("dense", node.key)
    save_tensors_json(target, {}, {"kind": "dense_eval", "ppl": ppl, "acc": acc, "time_s": dt,
                                   "eval": ev.dense_identity(), "batch_size": bs})
    st.publish("dense", node.key, target)
    return _end({"key": node.key, "ppl_dense": ppl, "acc_dense": acc, "time_s": dt, "source": "computed",
                 "oom_retries": n_oom})


def _ppl(model, tok, ev, oom_retries: int, inject, what: str, handle=None) -> tuple:
    """(perplexity, batch size used, OOM retries) of the model as it is (sparsified when a plan is installed)."""
    from ..eval.perplexity import perplexity

    def run(b: int) -> float:
        if handle is not None:
            handle.reset_counters()       # a retried evaluation must not count the aborted batches
        return perplexity(model, tok, data=ev.data, seq_len=ev.seq_len, stride=ev.stride,
                          max_tokens=ev.max_tokens, batch_size=b)

    return retry_oom(run, ev.batch_size, oom_retries, what, "eval.batch_size", inject)


def _accuracy(model, tok, ev, oom_retries: int, what: str) -> tuple:
    """(lm-eval summary, batch size used, OOM retries): acc/<task>, acc_norm/<task>, acc_avg, versions, ..."""
    from ..eval.lm_eval import lm_eval_accuracy

    s = ev.settings["lm_eval"]
    limit = s["limit"]
    limit = int(limit) if limit is not None and limit >= 1 else limit
    return retry_oom(lambda b: lm_eval_accuracy(model, tok, tasks=list(s["tasks"]), num_fewshot=s["num_fewshot"],
                                                limit=limit, batch_size=b, seed=s["seed"]),
                     s["batch_size"], oom_retries, what, "eval.lm_eval.batch_size")


def _fidelity(model, tok, ev, oom_retries: int) -> tuple:
    from ..eval.fidelity import fidelity

    s = ev.settings["fidelity"]
    return retry_oom(lambda b: fidelity(model, tok, data=ev.data, n=s["n"], seq_len=s["seq_len"], batch_size=b,
                                        output=s["output"]),
                     s["batch_size"], oom_retries, "fidelity", "eval.fidelity.batch_size")


def _stability(model, tok, ev, oom_retries: int) -> tuple:
    from ..eval.stability import mask_stability

    s = ev.settings["stability"]
    return retry_oom(lambda b: mask_stability(model, tok, data=ev.data, seq_len=s["seq_len"], n_windows=s["n_windows"],
                                              perturb=s["perturb"], roles=tuple(s["roles"]), batch_size=b,
                                              seed=s["seed"]),
                     s["batch_size"], oom_retries, "mask stability", "eval.stability.batch_size")


def _speed(cell: Cell, plan, device: str, cache_size: int) -> dict:
    """{"speed": decode/* and kernel/* figures}, or {"speed_skipped": why} when this cell cannot be timed."""
    from ..eval.speed import decode_speed, plan_to_engine, speed_unavailable_reason

    s = cell.eval.settings["speed"]
    if not device.startswith("cuda"):
        return {"speed_skipped": f"decode speed needs a CUDA GPU and this cell runs on device={device} "
                                 "(use device=cuda launcher=gpu)"}
    model = _model(cell.plan.model, device, cache_size)[0]
    why = speed_unavailable_reason(model)
    if why is None:
        try:
            plan_to_engine(plan)
        except ActsparseError as e:
            why = str(e)
    if why is not None:
        return {"speed_skipped": why}
    return {"speed": decode_speed(model, plan, n_tokens=s["n_tokens"], batch=s["batch"], prompt_len=s["prompt_len"],
                                  repeats=s["repeats"])}


def cell_task(cell: Cell, store: "Store | str", stats: dict, plan: dict, dense: dict, threads: float,
              cache_size: int, faults: dict | None = None, oom_retries: int = 1) -> dict:
    """Evaluate one cell: sparsify with its plan and token policy, then run its measures in order (ppl, lm_eval,
    fidelity, speed, as eval.measure lists them); activation sparsity is measured during the first of them
    that runs the sparsified model (perplexity when it is measured)."""
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
    bs, n_oom, out = ev.batch_size, 0, {}
    quality = [m for m in ev.measure if m != "speed"]
    measured = {"per_point": {}, "mean": 0.0, "per_role": {}, "effective": p.effective_sparsity}
    t0 = time.perf_counter()
    if not p.rules:  # nothing is sparsified: the model is the dense model, whose quality is known
        if ev.has("ppl"):
            out["ppl"] = dense["ppl_dense"]
        if ev.has("lm_eval"):
            out["acc"] = dense["acc_dense"]
        if ev.has("fidelity"):
            out["fidelity"] = {"cos": 1.0, "rel_err": 0.0, "n": 0}   # the dense model against itself
        eval_s = 0.0
    else:
        _threads(threads)
        model, tok = _model(cell.plan.model, device, cache_size)
        with sparsify(model, p, backend="torch", token_policy=ev.token_policy) as h:
            for i, m in enumerate(quality):
                if m == "ppl":
                    out["ppl"], bs, n = _ppl(model, tok, ev, oom_retries, _faults.OomInjector(f.get("oom")),
                                             "evaluation", handle=h)
                elif m == "lm_eval":
                    out["acc"], _, n = _accuracy(model, tok, ev, oom_retries, "lm-eval")
                elif m == "stability":
                    out["stability"], _, n = _stability(model, tok, ev, oom_retries)
                else:
                    out["fidelity"], _, n = _fidelity(model, tok, ev, oom_retries)
                n_oom += n
                if i == 0:
                    measured = h.measured_sparsity()
        eval_s = time.perf_counter() - t0
    if ev.has("speed"):
        out.update(_speed(cell, p, device, cache_size))
    r = {"target": p.target, "effective": measured["effective"], "expected_effective": p.effective_sparsity,
         "act_mean": measured["mean"], "per_role": measured["per_role"], "per_point": measured["per_point"],
         "calibrate_s": stats["time_s"], "stats_source": stats["source"], "fit_s": plan["fit_s"],
         "eval_s": eval_s, "plan_summary": p.summary(), "device": device, "host": socket.gethostname(),
         "eval_batch_size": bs, "oom_retries": n_oom, "t_start": t_start, "t_end": time.time(), **out}
    if "ppl" in out:
        r.update(ppl_dense=dense["ppl_dense"], ppl_ratio=out["ppl"] / dense["ppl_dense"])
    if "acc" in out:
        r["acc_dense"] = dense["acc_dense"]
    return _end(r)


class ModelWorker:
    """A Ray actor that runs nodes and keeps the models it loaded (launcher.model_cache) between them (affinity)."""

    def __init__(self, crash_dir: str | None = None, faults: dict | None = None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if crash_dir:  # a fatal signal (SIGSEGV, SIGABRT, ...) leaves its name and traceback for the driver
            import faulthandler

            from .affinity import crash_log

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
