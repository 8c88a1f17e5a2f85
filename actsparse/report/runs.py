"""Read a sweep's runs from any MLflow tracking URI into one tidy table (one row per cell)."""
from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
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
}


@contextmanager
def _tracking_uri(uri: str):
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).expanduser().exists():
        # reading must not create an empty store
        raise ActsparseError(f"no MLflow store at {uri}; run a sweep first, or pass --tracking-uri of an existing one")
    import mlflow

    quiet_mlflow()  # after the import: importing mlflow configures its loggers
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(old)


def find_sweep(uri: str, experiment: str, sweep_id: str | None = None) -> dict:
    """Return the parent run of a sweep (the latest one, or the latest with this sweep_id) with its cell list."""
    with _tracking_uri(uri) as mlflow:
        if mlflow.get_experiment_by_name(experiment) is None:
            raise ActsparseError(f"no experiment {experiment!r} in {uri}; run a sweep first or pass --experiment")
        filt = f"tags.{KIND_TAG} = 'sweep'" + (f" and tags.sweep_id = '{sweep_id}'" if sweep_id else "")
        df = mlflow.search_runs(experiment_names=[experiment], filter_string=filt, order_by=["start_time DESC"],
                                max_results=1)
        if df.empty:
            what = f"sweep {sweep_id!r}" if sweep_id else "any sweep"
            raise ActsparseError(f"no parent run of {what} in experiment {experiment!r} at {uri}")
        run = df.iloc[0]
        with tempfile.TemporaryDirectory() as tmp:
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
    return df.reset_index(drop=True)


def tidy(raw: pd.DataFrame) -> pd.DataFrame:
    """Select and type the columns the report uses from a search_runs frame (missing ones become NaN/'')."""
    out = pd.DataFrame(index=raw.index)
    for col, (src, typ) in COLUMNS.items():
        if src in raw.columns:
            v = raw[src]
            out[col] = pd.to_numeric(v, errors="coerce") if typ is float else v
        else:
            out[col] = float("nan") if typ is float else None
    return out
