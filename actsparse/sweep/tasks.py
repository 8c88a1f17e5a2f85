"""The work of one DAG node, as plain functions that Ray runs in worker processes.

Each returns a small dict (paths, numbers, text); big things (stats, plans) go through the artifact
store, written atomically with checksums, so a node whose artifact is already valid is not recomputed.
Workers never talk to MLflow: the driver logs what these return.
"""
from __future__ import annotations

import json
import socket
import time
from collections import OrderedDict
from pathlib import Path

from .cells import Cell, DenseNode, ModelRef, PlanNode, StatsNode

_MODELS: "OrderedDict[tuple, tuple]" = OrderedDict()   # (model key, device) -> (model, tok), per worker process


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
        return _MODELS[key]
    while _MODELS and len(_MODELS) >= max(cache_size, 1):
        _MODELS.popitem(last=False)
    dtype = None if ref.dtype == "auto" else ref.dtype
    pair = load_model(ref.name, dtype=dtype, device=device, revision=ref.revision)
    if cache_size > 0:
        _MODELS[key] = pair
    return pair


def _meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def calibrate_task(node: StatsNode, store: str, device: str, threads: float, cache_size: int) -> dict:
    """Calibrate once per stats_key into <store>/stats/<key>; return its path, source and time."""
    from ..artifacts import is_valid
    from ..calibration.collect import calibrate

    path = Path(store) / "stats" / node.key
    if is_valid(path):
        return {"path": str(path), "source": "cache", "time_s": float(_meta(path)["meta"].get("time_s", 0.0))}
    _threads(threads)
    device = resolve_device(device)
    model, tok = _model(node.model, device, cache_size)
    t0 = time.perf_counter()
    stats = calibrate(model, tok, data=node.data, tokens=node.tokens, seq_len=node.seq_len,
                      batch_size=node.batch_size, sample_size=node.sample_size, seed=node.seed, progress=False)
    stats.meta["sweep_stats_key"] = node.key
    stats.save(path)
    return {"path": str(path), "source": "computed", "time_s": time.perf_counter() - t0}


def fit_task(node: PlanNode, store: str, stats: dict, device: str, threads: float, cache_size: int) -> dict:
    """Fit once per plan_key into <store>/plans/<key>; return its path, source, fit time and expected sparsity."""
    from ..artifacts import is_valid
    from ..calibration.stats import Stats
    from ..sparsifiers.plan import SparsityPlan
    from ..sparsifiers.registry import fit

    path = Path(store) / "plans" / node.key
    if is_valid(path):
        plan, source = SparsityPlan.load(path), "cache"
    else:
        _threads(threads)
        model = _model(node.model, _fit_device(device), cache_size)[0] if node.needs_model else None
        plan = fit(node.method, Stats.load(stats["path"]), sparsity=node.target, model=model, **node.given)
        plan.meta["sweep_plan_key"] = node.key
        plan.save(path)
        source = "computed"
    return {"path": str(path), "source": source, "fit_s": float(plan.meta.get("fit_s", 0.0)),
            "expected_effective": plan.effective_sparsity, "n_rules": len(plan.rules)}


def dense_task(node: DenseNode, store: str, device: str, threads: float, cache_size: int) -> dict:
    """Dense perplexity once per model x eval spec, cached in <store>/dense/<key>; return ppl and time."""
    from ..artifacts import is_valid, save_tensors_json
    from ..eval.perplexity import perplexity

    path = Path(store) / "dense" / node.key
    if is_valid(path):
        m = _meta(path)
        return {"ppl_dense": m["ppl"], "time_s": m["time_s"], "source": "cache"}
    _threads(threads)
    model, tok = _model(node.model, resolve_device(device), cache_size)
    ev = node.eval
    t0 = time.perf_counter()
    ppl = perplexity(model, tok, data=ev.data, seq_len=ev.seq_len, stride=ev.stride, max_tokens=ev.max_tokens,
                     batch_size=ev.batch_size)
    dt = time.perf_counter() - t0
    save_tensors_json(path, {}, {"kind": "dense_eval", "ppl": ppl, "time_s": dt, "eval": ev.identity(False)})
    return {"ppl_dense": ppl, "time_s": dt, "source": "computed"}


def cell_task(cell: Cell, stats: dict, plan: dict, dense: dict, threads: float, cache_size: int) -> dict:
    """Evaluate one cell: sparsify with its plan and token policy, measure perplexity and activation sparsity."""
    from ..eval.perplexity import perplexity
    from ..sparsifiers.apply import sparsify
    from ..sparsifiers.plan import SparsityPlan

    t_start = time.time()
    device = resolve_device(cell.device)
    p = SparsityPlan.load(plan["path"])
    ev = cell.eval
    if not p.rules:  # nothing is sparsified: the model is the dense model, whose perplexity is known
        ppl, eval_s, measured = dense["ppl_dense"], 0.0, {"per_point": {}, "mean": 0.0, "per_role": {},
                                                           "effective": p.effective_sparsity}
    else:
        _threads(threads)
        model, tok = _model(cell.plan.model, device, cache_size)
        t0 = time.perf_counter()
        with sparsify(model, p, backend="torch", token_policy=ev.token_policy) as h:
            ppl = perplexity(model, tok, data=ev.data, seq_len=ev.seq_len, stride=ev.stride,
                             max_tokens=ev.max_tokens, batch_size=ev.batch_size)
            measured = h.measured_sparsity()
        eval_s = time.perf_counter() - t0
    return {"ppl": ppl, "ppl_dense": dense["ppl_dense"], "ppl_ratio": ppl / dense["ppl_dense"],
            "target": p.target, "effective": measured["effective"], "expected_effective": p.effective_sparsity,
            "act_mean": measured["mean"], "per_role": measured["per_role"], "per_point": measured["per_point"],
            "calibrate_s": stats["time_s"], "stats_source": stats["source"], "fit_s": plan["fit_s"],
            "eval_s": eval_s, "plan_summary": p.summary(), "device": device, "host": socket.gethostname(),
            "t_start": t_start, "t_end": time.time()}
