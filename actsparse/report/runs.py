"""Read a sweep's runs from any MLflow tracking URI into one tidy table (one row per cell), and filter it.

The tidy table has fixed columns (COLUMNS; `method` is the cell's method label: the name plus any
non-default parameters, e.g. `teal(allocation=greedy)`), every other metric under its MLflow name (`acc/arc_easy`,
`fidelity/cos`, `sparsity/act/q`), and the remaining tags and params as `tags.<k>` / `params.<k>`.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from ..errors import ActsparseError
from ..tracking.mlflow_runs import KIND_TAG, quiet_mlflow

# tidy column -> (MLflow search_runs column, type)
COLUMNS = {
    "run_id": ("run_id", str), "status": ("status", str),
    "model": ("tags.model", str), "method": ("params.method.name", str),
    "sparsity": ("params.sparsity", float), "target": ("metrics.sparsity/target", float),
    "effective": ("metrics.sparsity/effective", float), "act_mean": ("metrics.sparsity/act_mean", float),
    "ppl": ("metrics.ppl", float), "ppl_dense": ("metrics.ppl_dense", float),
    "ppl_ratio": ("metrics.ppl_ratio", float), "token_policy": ("tags.token_policy", str),
    "eval_data": ("params.eval.data", str), "cell_key": ("tags.cell_key", str),
    "sweep_id": ("tags.sweep_id", str), "error": ("tags.error", str), "start_time": ("start_time", object),
    "end_time": ("end_time", object), "experiment_id": ("experiment_id", str), "artifact_uri": ("artifact_uri", str),
    "parent_run_id": ("tags.mlflow.parentRunId", str), "run_name": ("tags.mlflow.runName", str),
    "device": ("tags.device", str), "host": ("tags.host", str),
    "speedup": ("metrics.decode/speedup", float), "tok_s": ("metrics.decode/tok_s", float),
    "tok_s_dense": ("metrics.decode/tok_s_dense", float),
    # probes of a search (sweep --search): which search, its resolution, and the order of the probe
    "search_id": ("tags.search_id", str), "search_group": ("tags.search_group", str),
    "search_tol": ("tags.search_tol", float), "search_probe": ("tags.search_probe", float),
}
_FROM_SOURCE = {src: col for col, (src, _) in COLUMNS.items()}


def _check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, with a clear message, when an http(s) tracking server does not answer (MLflow retries for minutes)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read(64)
    except (urllib.error.URLError, OSError) as e:
        raise ActsparseError(f"cannot reach the MLflow tracking server at {uri} ({getattr(e, 'reason', e)}); start it "
                             "(mlflow server ...) or pass the --tracking-uri of a reachable one") from e


@contextmanager
def _tracking_uri(uri: str):
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).expanduser().exists():
        # reading must not create an empty store
        raise ActsparseError(f"no MLflow store at {uri}; run a sweep first, or pass --tracking-uri of an existing one")
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    import mlflow
    from mlflow.exceptions import MlflowException

    quiet_mlflow()  # after the import: importing mlflow configures its loggers
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # a bar per tiny JSON is noise
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow
    except MlflowException as e:   # an unusable store or a server error: say where, keep the cause
        raise ActsparseError(f"reading runs from the MLflow tracking store {uri} failed: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    finally:
        mlflow.set_tracking_uri(old)


def closest_sweeps(wanted: str, existing: list[str], n: int = 3) -> str:
    """`closest: a, b; all: ...` for an unknown sweep id (the newest few when nothing is close)."""
    close = difflib.get_close_matches(wanted, existing, n=n, cutoff=0.4)
    if close:
        return f"closest: {', '.join(close)}"
    return f"existing sweeps (newest first): {', '.join(existing[:5])}" if existing else "no sweep has run there yet"


def sweep_parents(uri: str, experiment: str) -> pd.DataFrame:
    """Every sweep's parent run in the experiment, newest first (MLflow's search_runs columns)."""
    with _tracking_uri(uri) as mlflow:
        if mlflow.get_experiment_by_name(experiment) is None:
            raise ActsparseError(f"no experiment {experiment!r} in {uri}; run a sweep first or pass --experiment")
        return mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.{KIND_TAG} = 'sweep'",
                                  order_by=["start_time DESC"])


def find_sweep(uri: str, experiment: str, sweep_id: str | None = None) -> dict:
    """Return the parent run of a sweep (the latest one, or the latest with this sweep_id) with its cell list."""

    parents = sweep_parents(uri, experiment)
    df = parents[parents["tags.sweep_id"] == sweep_id] if sweep_id and not parents.empty else parents
    if df.empty:
        if sweep_id:
            ids = list(dict.fromkeys(parents["tags.sweep_id"].dropna())) if not parents.empty else []
            raise ActsparseError(f"no sweep {sweep_id!r} in experiment {experiment!r} at {uri}; "
                                 f"{closest_sweeps(sweep_id, ids)} (list them with `actsparse ls sweeps`)")
        raise ActsparseError(f"no parent run of any sweep in experiment {experiment!r} at {uri}")
    run = df.iloc[0]
    with _tracking_uri(uri) as mlflow, tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run["run_id"], artifact_path="cells.json", dst_path=tmp)
            cells = json.loads(open(path).read())
        except Exception as e:
            raise ActsparseError(f"sweep run {run['run_id']} has no readable cells.json (was it interrupted?): {e}") from e
    return {"run_id": run["run_id"], "sweep_id": run["tags.sweep_id"], "cells": cells}


def runs_frame(uri: str, experiment: str, run_ids: list[str] | None = None) -> pd.DataFrame:
    """Return one row per cell run (these run ids, or every FINISHED cell of the experiment, latest per cell_key)."""
    with _tracking_uri(uri) as mlflow:
        if run_ids is not None:
            frames = [mlflow.search_runs(experiment_names=[experiment], max_results=len(run_ids[i:i + 500]),
                                         filter_string="attributes.run_id IN ({})".format(
                                             ",".join(f"'{r}'" for r in run_ids[i:i + 500])))
                      for i in range(0, len(run_ids), 500)]
            raw = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        else:
            raw = mlflow.search_runs(experiment_names=[experiment],
                                     filter_string=f"tags.{KIND_TAG} = 'cell' and attributes.status = 'FINISHED'",
                                     order_by=["start_time DESC"])
    df = tidy(raw)
    if run_ids is None and not df.empty:
        df = df.drop_duplicates("cell_key", keep="first")
    df = df.reset_index(drop=True)
    df.attrs.update(tracking_uri=uri, experiment=experiment)   # where the runs came from: links, artifacts
    return df


def tidy(raw: pd.DataFrame) -> pd.DataFrame:
    """Type the columns the report uses from a search_runs frame (missing ones become NaN/None), keep the rest."""
    cols = {}
    for col, (src, typ) in COLUMNS.items():
        if src in raw.columns:
            v = raw[src]
            cols[col] = pd.to_numeric(v, errors="coerce") if typ is float else v
        else:
            cols[col] = pd.Series(float("nan") if typ is float else None, index=raw.index,
                                  dtype=float if typ is float else object)
    for src in raw.columns:
        if src in _FROM_SOURCE:
            continue
        if src.startswith("metrics."):
            cols.setdefault(src[len("metrics."):], pd.to_numeric(raw[src], errors="coerce"))
        elif src.startswith(("tags.", "params.")) and not src.startswith("tags.mlflow."):
            cols[src] = raw[src]
    df = pd.DataFrame(cols, index=raw.index)
    if "tags.method_label" in df.columns:    # a method's variants (teal(allocation=greedy)) are methods of their own
        df["method"] = df["tags.method_label"].where(df["tags.method_label"].notna(), df["method"])
    return df


def tag_column(df: pd.DataFrame, key: str) -> str | None:
    """Return the column of the run table that holds tag `key` (a fixed column or `tags.<key>`), if any."""
    col = _FROM_SOURCE.get(f"tags.{key}", f"tags.{key}")
    return col if col in df.columns else None


@dataclass
class RunFilter:
    """Which runs a report covers: any of these sweeps/models/methods, started in [since, until), with these tags.

    A method filter (or a `method` tag) keeps the dense runs too: they are every table's reference.
    """
    sweeps: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    since: datetime | None = None
    until: datetime | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.sweeps or self.models or self.methods or self.since or self.until or self.tags)

    def describe(self) -> str:
        """The filter in words (for report headers and error messages)."""
        parts = [f"{k}: {', '.join(map(str, v))}" for k, v in (("sweep", self.sweeps), ("model", self.models),
                                                               ("method", self.methods)) if v]
        parts += [f"started >= {self.since:%Y-%m-%d %H:%M}"] if self.since else []
        parts += [f"started < {self.until:%Y-%m-%d %H:%M}"] if self.until else []
        parts += [f"tag {k}={v}" for k, v in self.tags.items()]
        return ", ".join(parts) or "none"

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        """Return the rows that pass every filter; raise when none does."""
        if not self or df.empty:
            return df
        keep = pd.Series(True, index=df.index)
        for col, want in (("sweep_id", self.sweeps), ("model", self.models)):
            if want:
                keep &= df[col].astype(str).isin([str(w) for w in want])
        dense = df["method"].astype(str).eq("dense")      # the reference row of every table: kept by other filters
        if self.methods:
            m = df["method"].astype(str)
            base = m.str.split("(", n=1).str[0]           # `teal` keeps teal(allocation=greedy) too
            keep &= m.isin([str(w) for w in self.methods]) | base.isin([str(w) for w in self.methods]) | dense
        t = pd.to_datetime(df["start_time"], utc=True, errors="coerce")
        if self.since:
            keep &= t >= pd.Timestamp(self.since)
        if self.until:
            keep &= t < pd.Timestamp(self.until)
        for k, v in self.tags.items():
            col = tag_column(df, k)
            keep &= (df[col].astype(str).eq(str(v)) | (dense if k == "method" else False)) if col else False
        out = df[keep]
        if out.empty:
            known = sorted(c[len("tags."):] for c in df.columns if c.startswith("tags.")) + \
                [k for k in ("model", "token_policy", "cell_key", "sweep_id", "device", "host")]
            missing = [k for k in self.tags if tag_column(df, k) is None]
            hint = f"; no run has tag(s) {missing} (known tags: {', '.join(sorted(set(known)))})" if missing else ""
            raise ActsparseError(f"no run matches the filters ({self.describe()}); {len(df)} run(s) before "
                                 f"filtering{hint}")
        return out


def parse_date(text: str, what: str) -> datetime:
    """Return an aware UTC datetime for YYYY-MM-DD[THH:MM[:SS]] (naive times are UTC)."""
    try:
        d = datetime.fromisoformat(text)
    except ValueError as e:
        raise ActsparseError(f"{what} must be a date like 2025-06-30 or 2025-06-30T14:00, got {text!r}") from e
    return d.replace(tzinfo=timezone.utc) if d.tzinfo is None else d.astimezone(timezone.utc)


def parse_tags(items: list[str]) -> dict[str, str]:
    """Return {key: value} for KEY=VALUE items."""
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k.strip():
            raise ActsparseError(f"--tag takes KEY=VALUE (e.g. --tag device=cuda), got {it!r}")
        out[k.strip()] = v.strip()
    return out


def layer_sparsity(uri: str, run_ids: list[str], artifact: str = "measured_sparsity.json") -> dict[str, dict]:
    """Return {run_id: {"layers.<i>.<role>": measured sparsity}} from each run's artifact (runs without one omitted)."""
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = MlflowClient(tracking_uri=uri)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rid in run_ids:
            try:
                path = client.download_artifacts(rid, artifact, str(Path(tmp) / rid))
                d = json.loads(Path(path).read_text())
            except Exception:   # a dense cell, a failed cell or an older run: the heat map skips it
                continue
            d = {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not math.isnan(float(v))}
            if d:
                out[rid] = d
    return out


def run_info(uri: str, run_id: str) -> dict:
    """Return a run's params, tags, status, start time and experiment id (for the report's configuration section)."""
    from mlflow import MlflowClient

    r = MlflowClient(tracking_uri=uri).get_run(run_id)
    return {"run_id": run_id, "params": dict(r.data.params), "metrics": dict(r.data.metrics),
            "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
            "status": r.info.status, "experiment_id": r.info.experiment_id,
            "start_time": datetime.fromtimestamp(r.info.start_time / 1000, timezone.utc) if r.info.start_time else None}


def run_link(uri: str | None, experiment_id: str | int, run_id: str) -> str:
    """Return the MLflow UI address of a run: the server's for http(s) URIs, else `mlflow ui`'s default one."""
    if uri and uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
    else:  # a file or database store has no UI until `mlflow ui --backend-store-uri <uri>` serves it here
        base = "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
