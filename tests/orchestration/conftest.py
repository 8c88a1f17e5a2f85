"""Fixtures for the orchestration tests: one real local Ray cluster per session, a sweep workspace per test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 CPUs, no dashboard), started once; in-process sweeps reuse it."""
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sweep_model(tiny_dir) -> str:
    """The model sweeps run on: ACTSPARSE_TEST_MODEL (e.g. tiny-llama) or the tiny random Llama folder."""
    return os.environ.get("ACTSPARSE_TEST_MODEL") or str(tiny_dir)


@pytest.fixture
def workspace(tmp_path, sweep_model):
    """A sweep workspace: MLflow SQLite store, artifact store and results under tmp_path, and the model."""
    ws = tmp_path
    overrides = [f"model={sweep_model}", f"tracking.uri=sqlite:///{ws}/mlflow.db", f"launcher.store={ws}/store",
                 f"report.dir={ws}/results"]
    return ws, overrides


def run_cli(args: list[str], cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    """Run the `actsparse` console script of this environment, offline, in cwd."""
    script = Path(sys.executable).parent / "actsparse"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "actsparse.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
