"""What exists, for `actsparse ls` and `actsparse cache`: methods with their parameters, measures, models (bundled,
packaged, in the local Hugging Face cache), lm-eval tasks, the sweeps of an MLflow store, and the artifacts of
a sweep's store.

Each lister returns plain rows (dicts); the command line renders them as terminal tables.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ActsparseError

STORE_KINDS = ("stats", "plans", "dense")


def method_rows() -> list[dict]:
    """One row per registered method: name, what sets its sparsity, its parameters with defaults, its summary."""
    from ..sparsifiers.registry import METHODS, methods

    presets = method_presets()
    rows = []
    for name, params in methods().items():
        cls = METHODS[name]
        fmt = lambda v: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
        rows.append({"method": name,
                     "sparsity from": "target" if cls.uses_target else
                     "params" if hasattr(cls, "nominal_sparsity") else "none (0)",
                     "parameters (default)": ", ".join(f"{k}={fmt(p['default'])}" for k, p in params.items()) or "–",
                     "presets": ", ".join(presets.get(name, [])) or "–",
                     "what it does": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""})
    return rows


def method_presets() -> dict[str, list[str]]:
    """The presets of conf/method/ (method=PRESET), by the method each configures."""
    import yaml

    from .config import conf_dir

    out: dict[str, list[str]] = {}
    for path in sorted((conf_dir() / "method").glob("*.yaml")):
        out.setdefault((yaml.safe_load(path.read_text()) or {}).get("name"), []).append(path.stem)
    return out


def measure_rows() -> list[dict]:
    """One row per registered measure: its settings (eval.<name>.*) with defaults, dense side, who can run it."""
    import dataclasses

    from ..eval.measures import measures

    rows = []
    for name, m in measures().items():
        s = m.Settings() if m.Settings is not None else None
        settings = ", ".join(f"{f.name}={getattr(s, f.name)}" for f in dataclasses.fields(s)) if s is not None \
            else "eval.data, seq_len, stride, max_tokens, batch_size"
        rows.append({"measure": name, "settings (default)": settings, "dense side": "yes" if m.dense else "no",
                     "models": "decoders" if m.decoder_only else "any",
                     "what it measures": (type(m).__doc__ or "").strip().splitlines()[0] if type(m).__doc__ else ""})
    return rows


def model_rows() -> list[dict]:
    """Bundled models, packaged ones (installed or not), and every model in the local Hugging Face hub cache."""
    from ..models.load import BUNDLED_MODELS, NAMED_MODELS, bundled_model_dir

    rows = [{"model": n, "kind": "bundled", "where": str(bundled_model_dir(n))} for n in BUNDLED_MODELS]
    for n, nm in NAMED_MODELS.items():
        try:
            import importlib.util

            installed = importlib.util.find_spec(nm.module) is not None
        except (ImportError, ValueError):
            installed = False
        rows.append({"model": n, "kind": "package", "where": nm.package + ("" if installed else
                     f" (not installed: pip install 'actsparse[{nm.extra}]')")})
    hub = hf_hub_cache()
    for d in sorted(hub.glob("models--*")) if hub.is_dir() else []:
        if any(d.glob("snapshots/*/config.json")):
            rows.append({"model": d.name[len("models--"):].replace("--", "/"), "kind": "HF cache", "where": str(d)})
    return rows


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return Path(os.environ.get("HF_HUB_CACHE", home / "hub"))


def task_rows(include_lm_eval: bool = False) -> list[dict]:
    """The bundled offline lm-eval tasks (and, with include_lm_eval, every task, group and tag lm-eval knows)."""
    from ..eval.lm_eval import TASK_DIR, offline_tasks

    import yaml

    class _Loader(yaml.SafeLoader):      # lm-eval's task files use `!function module.fn`: read it as text
        pass

    _Loader.add_multi_constructor("!", lambda loader, tag, node: f"{tag} {getattr(node, 'value', '')}")
    rows = []
    for name in offline_tasks():
        cfg = yaml.load((TASK_DIR / f"{name}.yaml").read_text(), Loader=_Loader) or {}
        kind = "group" if "group" in cfg and "task" in cfg else "task"
        rows.append({"task": name, "kind": kind, "source": "bundled (offline)",
                     "contents": ", ".join(t if isinstance(t, str) else t.get("task", "?") for t in cfg["task"])
                     if kind == "group" else str(cfg.get("output_type", ""))})
    if include_lm_eval:
        from ..eval.lm_eval import task_manager

        tm = task_manager(True)
        bundled = {r["task"] for r in rows}
        for name, e in sorted(tm.task_index.items()):
            if name not in bundled:
                rows.append({"task": name, "kind": str(getattr(e.kind, "name", e.kind)).lower(),
                             "source": "lm-eval", "contents": ""})
    return rows


# -- sweeps in an MLflow store -------------------------------------------------------------------------------
def sweep_rows(uri: str, experiment: str) -> list[dict]:
    """One row per sweep parent run of the experiment, newest first: sweep id, status, cells, when, run id."""
    from ..report.runs import sweep_parents

    df = sweep_parents(uri, experiment)
    rows = []
    for _, r in df.iterrows():
        counts = {k: r.get(f"metrics.cells/{k}") for k in ("finished", "skipped", "merged", "failed")}
        cells = ", ".join(f"{int(v)} {k}" for k, v in counts.items() if v == v and v is not None and v > 0)
        start = r.get("start_time")
        rows.append({"sweep": r.get("tags.sweep_id"), "status": r.get("status"), "cells": cells or "–",
                     "started (UTC)": start.strftime("%Y-%m-%d %H:%M") if hasattr(start, "strftime") else str(start),
                     "parent run": r.get("run_id")})
    return rows


# -- the artifact store -------------------------------------------------------------------------------------
def _fs(spec: str):
    """(fsspec file system, root path) of a store directory or URL."""
    import fsspec

    from .store import check_store, is_url

    check_store(spec)
    fs, root = fsspec.core.url_to_fs(spec if is_url(spec) else str(Path(spec).expanduser().resolve()))
    return fs, root.rstrip("/")


def cache_rows(spec: str, kinds: tuple[str, ...] = STORE_KINDS) -> list[dict]:
    """One row per artifact of a store: kind, key, bytes, last modified; hidden (interrupted) writes included."""
    fs, root = _fs(spec)
    if not fs.exists(root):
        return []
    rows = []
    for kind in kinds:
        base = f"{root}/{kind}"
        if not fs.exists(base):
            continue
        for p in sorted(fs.ls(base, detail=False)):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            size = sum(fs.du(p, total=False).values()) if fs.isdir(p) else fs.size(p)
            try:
                mtime = fs.modified(p)
            except (NotImplementedError, OSError, FileNotFoundError):
                mtime = None
            rows.append({"kind": kind, "key": name + (" (partial write)" if name.startswith(".") else ""),
                         "bytes": int(size), "modified (UTC)": mtime.astimezone(timezone.utc).strftime(
                             "%Y-%m-%d %H:%M") if isinstance(mtime, datetime) else "", "path": p})
    return rows


def clear_cache(rows: list[dict], spec: str) -> int:
    """Delete the artifacts of these rows (from cache_rows of spec); return how many were deleted."""
    fs, _ = _fs(spec)
    for r in rows:
        fs.rm(r["path"], recursive=True)
    return len(rows)


def human_bytes(n: float) -> str:
    """`1.5 MB` for a byte count."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def check_kinds(kinds: list[str]) -> tuple[str, ...]:
    """The store kinds asked for (all when none); raise ActsparseError naming the valid ones."""
    bad = [k for k in kinds if k not in STORE_KINDS]
    if bad:
        raise ActsparseError(f"unknown artifact kind(s) {bad}; kinds: {', '.join(STORE_KINDS)}")
    return tuple(kinds) or STORE_KINDS
