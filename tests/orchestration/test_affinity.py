"""Model affinity: each model is loaded once by the actor that runs all of its nodes (against plain tasks that
reload it per node), with the same numbers; resource requests the cluster cannot meet are refused; and without
affinity a failed node names its stage as with it."""
from __future__ import annotations

import json

import pytest

from .conftest import mlflow_runs, summary, sweep_in_process


def _sweep(ws, name: str, models: str, extra: list[str]) -> tuple[dict, dict]:
    uri = f"sqlite:///{ws}/{name}.db"     # a store of its own; the artifact store is shared
    rc, out, err = sweep_in_process(["+sweep=smoke", f"model={models}", "method=teal", "sparsity=0.3,0.6",
                                     f"tracking.uri={uri}", f"launcher.store={ws}/store",
                                     f"report.dir={ws}/results", "report.enabled=false", *extra])
    assert rc == 0 and summary(out) == (4, 0, 0), out + err
    (parent,) = mlflow_runs(uri, "sweep")
    cells = {r.data.tags["cell_key"]: r for r in mlflow_runs(uri, "cell")}
    return parent, cells


def test_affinity_loads_each_model_once_and_gives_the_numbers_of_per_task_reloads(ray_cluster, tmp_path, tiny_dir,
                                                                                 second_model):
    models = f"{tiny_dir},{second_model}"
    # 2 models x teal at 2 sparsities: per model 1 calibration + 1 dense evaluation + 2 cells use the model.
    # One worker (max_workers=1) serves the first model to the end, then moves to the second
    parent, cells = _sweep(tmp_path, "actors", models, ["launcher.max_workers=1"])
    t, m = parent.data.tags, parent.data.metrics
    assert t["affinity"] == "True" and t["actors"] == "1" and t["calibrations_computed"] == "2"
    assert m["model/loads"] == 2 and m["model/cache_hits"] == 6        # one load per model, then reuse
    assert m["model/load_s_saved"] == pytest.approx(6 * m["model/load_s"] / 2)
    assert t["fits_computed"] == "4"                                   # as CPU tasks beside the worker
    for r in cells.values():
        assert r.data.tags["model_cache"] == "hit" and r.data.metrics["time/model_load_s"] == 0
    assert len({r.data.tags["worker_pid"] for r in cells.values()}) == 1

    # the same cells again (new MLflow store, same artifact store: statistics, plans and dense perplexity come
    # from it) as plain tasks with no model cache: every cell loads its model, and gets the same numbers
    parent_t, cells_t = _sweep(tmp_path, "tasks", models, ["launcher.affinity=false", "launcher.model_cache=0"])
    t = parent_t.data.tags
    assert t["affinity"] == "False" and t["actors"] == "0" and t["calibrations_cached"] == "2"
    assert parent_t.data.metrics["model/loads"] == 4 and parent_t.data.metrics["model/cache_hits"] == 0
    assert all(r.data.tags["model_cache"] == "miss" and r.data.metrics["time/model_load_s"] > 0
               for r in cells_t.values())
    assert cells.keys() == cells_t.keys()
    for k, r in cells.items():
        for metric in ("ppl", "ppl_dense", "sparsity/effective", "sparsity/act_mean"):
            assert r.data.metrics[metric] == pytest.approx(cells_t[k].data.metrics[metric], rel=1e-6), metric


def test_a_gpu_request_on_a_cpu_only_cluster_is_refused_before_any_run(ray_cluster, workspace):
    ws, base = workspace
    rc, out, err = sweep_in_process(["+sweep=smoke", *base, "launcher=gpu", "device=cuda"])
    assert rc == 2, out + err
    (line,) = err.strip().splitlines()
    assert line.startswith("actsparse: error: launcher.calibrate asks for 1 CPU(s) and 1 GPU(s) per task, but no node "
                           "of the Ray cluster has that much (nodes: 2 CPU/0 GPU); on a CPU-only machine use "
                           "launcher=local"), line
    assert mlflow_runs(f"sqlite:///{ws}/mlflow.db", "sweep") == []


def test_without_affinity_a_failed_calibration_fails_its_cells_naming_the_stage(ray_cluster, workspace, monkeypatch):
    ws, base = workspace
    msg = "cannot import name 'X' from 'y'"
    monkeypatch.setenv("ACTSPARSE_INJECT_FAULTS", json.dumps(
        {"raise": [{"stage": "calibrate", "type": "ImportError", "message": msg}]}))
    rc, out, err = sweep_in_process(["+sweep=smoke", *base, "method=teal", "launcher.affinity=false",
                                     "report.enabled=false"])
    assert rc == 1 and summary(out) == (0, 0, 2), out + err
    uri = f"sqlite:///{ws}/mlflow.db"
    assert [r.data.tags["error"] for r in mlflow_runs(uri, "cell")] == [f"calibration failed: ImportError: {msg}"] * 2
    (parent,) = mlflow_runs(uri, "sweep")
    assert parent.data.tags["actors"] == "0"
