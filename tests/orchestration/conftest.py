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


def run_cli(args: list[str], cwd: Path, timeout: int = 180, env: dict | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run the `actsparse` console script of this environment, offline, in cwd (extra env vars, stdin text)."""
    script = Path(sys.executable).parent / "actsparse"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "actsparse.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          input=input if input is not None else "")


@pytest.fixture(scope="session")
def second_model(tiny_dir, tmp_path_factory) -> str:
    """A second tiny random Llama (other weights, same tokenizer): a different model key, for affinity tests."""
    import shutil

    from tests.conftest import make_model

    path = tmp_path_factory.mktemp("tiny-llama-random-2")
    for f in tiny_dir.iterdir():
        if "token" in f.name or f.name.endswith(".txt"):
            shutil.copy(f, path / f.name)
    make_model("llama", seed=1).save_pretrained(path)
    return str(path)


def sweep_in_process(args: list[str]) -> tuple[int, str, str]:
    """Run `actsparse sweep ARGS` in this process (reusing the session's Ray cluster); return (rc, stdout, stderr)."""
    import contextlib
    import io

    from actsparse.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["sweep", *args])
    return rc, out.getvalue(), err.getvalue()


def summary(out: str) -> tuple[int, int, int]:
    """(finished, skipped, failed) from a sweep's summary line."""
    import re

    m = re.search(r"cells: (\d+) finished, (\d+) skipped, (\d+) failed", out)
    assert m, out
    return tuple(int(x) for x in m.groups())


def mlflow_runs(uri: str, kind: str, parent: str | None = None, status: str | None = None) -> list:
    """Runs of the `actsparse` experiment: kind 'sweep' (parents) or 'cell' (children), optionally of one parent."""
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("actsparse")
    if exp is None:
        return []
    filt = f"tags.run_kind = '{kind}'" + (f" and tags.`mlflow.parentRunId` = '{parent}'" if parent else "")
    if status:
        filt += f" and attributes.status = '{status}'"
    return c.search_runs([exp.experiment_id], filt, max_results=1000)
