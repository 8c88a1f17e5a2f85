"""Many machines on one: the console script with ray.address=auto (RAY_ADDRESS set, as in a Ray Job) against a
real multi-raylet cluster (ray.cluster_utils.Cluster), tracking on a real `mlflow server` on 127.0.0.1 with
served artifacts, and the artifact store behind an fsspec URL that every raylet reads."""
from __future__ import annotations

import os
import subprocess
import sys

from actsparse.artifacts import is_valid
from actsparse.sweep.store import open_store

from .conftest import REPO, mlflow_runs, summary
from .servers import mlflow_server, ray_cluster


def test_the_same_command_runs_on_a_multi_raylet_cluster_with_an_mlflow_server_and_a_url_store(tmp_path,
                                                                                               sweep_model):
    store_url = f"file://{tmp_path}/shared_store"
    with mlflow_server(tmp_path) as server, ray_cluster(2) as address:
        uri = server()
        env = dict(os.environ, RAY_ADDRESS=address, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
                   RAY_USAGE_STATS_ENABLED="0")
        cmd = [sys.executable, "-m", "actsparse.cli", "sweep", "+sweep=smoke", f"model={sweep_model}",
               "sparsity=0.5", "launcher=cluster", f"tracking.uri={uri}", f"launcher.store={store_url}",
               f"launcher.store_cache={tmp_path}/node_cache", f"report.dir={tmp_path}/results"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "ray: connected to auto with 2 CPUs, 0 GPUs" in proc.stdout     # the head has none: 2 raylets x 1
        assert summary(proc.stdout) == (2, 0, 0)

        # the runs are on the server, their artifacts served by it and stored where it keeps them
        (parent,) = mlflow_runs(uri, "sweep")
        cells = mlflow_runs(uri, "cell", parent.info.run_id)
        assert parent.info.status == "FINISHED" and len(cells) == 2
        assert all(r.info.status == "FINISHED" and r.info.artifact_uri.startswith("mlflow-artifacts:") for r in cells)
        from mlflow import MlflowClient

        names = {a.path for a in MlflowClient(uri).list_artifacts(cells[0].info.run_id)}
        assert {"config.yaml", "plan_summary.txt", "measured_sparsity.json"} <= names
        served = list((tmp_path / "artifacts").rglob("config.yaml"))
        assert len(served) == 2
        # both raylets worked: the calibration and the dense evaluation started together on the two actors
        t = parent.data.tags
        assert t["actors"] == "2" and t["calibrations_computed"] == "1" and t["dense_evals_computed"] == "1"
        assert t["ray_nodes"] == "2" and all(r.data.tags["ray_node"] for r in cells)

    # the store behind the URL holds every artifact, whole
    st = open_store(store_url, cache_dir=str(tmp_path / "check_cache"))
    assert len(st.keys("stats")) == 1 and len(st.keys("plans")) == 2 and len(st.keys("dense")) == 1
    for kind in ("stats", "plans", "dense"):
        for k in st.keys(kind):
            assert is_valid(st.fetch(kind, k))
