"""Synthetic run tables with hand-computed fronts and interpolations, and a synthetic sweep written to MLflow.

Model "m", eval "bundled:eval", token policy "all"; dense ppl 10.0, dense accuracy 0.60.
    method  effective  ppl     acc     speedup
    A       0.20       10.10   0.598   1.20
    A       0.40       10.50   0.580   1.50
    A       0.60       12.00   0.500   1.90
    B       0.25       10.05   0.595   1.25
    B       0.40       10.80   0.596   1.40
    B       0.55       11.00   0.570   1.80
    C       0.10       10.02   –       1.05
    C       0.20       10.10   –       1.10
    D       0.30       10.15   –       –
The expected numbers in the tests are worked out by hand next to each assertion.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
NAN = float("nan")
# method, requested sparsity, effective, ppl, acc, speedup
POINTS = [
    ("dense", 0.0, 0.00, 10.00, 0.600, NAN),
    ("A", 0.2, 0.20, 10.10, 0.598, 1.20),
    ("A", 0.4, 0.40, 10.50, 0.580, 1.50),
    ("A", 0.6, 0.60, 12.00, 0.500, 1.90),
    ("B", 0.2, 0.25, 10.05, 0.595, 1.25),
    ("B", 0.4, 0.40, 10.80, 0.596, 1.40),
    ("B", 0.6, 0.55, 11.00, 0.570, 1.80),
    ("C", 0.1, 0.10, 10.02, NAN, 1.05),
    ("C", 0.2, 0.20, 10.10, NAN, 1.10),
    ("D", 0.3, 0.30, 10.15, NAN, NAN),
]
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def frame(points=POINTS, model: str = "m") -> pd.DataFrame:
    """The run table runs.runs_frame would return for POINTS (one FINISHED run per point)."""
    df = pd.DataFrame(points, columns=["method", "sparsity", "effective", "ppl", "acc_avg", "speedup"])
    df["model"], df["eval_data"], df["token_policy"], df["status"] = model, "bundled:eval", "all", "FINISHED"
    df["target"] = np.where(df["method"] == "dense", 0.0, df["sparsity"])
    df["ppl_dense"] = 10.0
    df["ppl_ratio"] = df["ppl"] / 10.0
    df["run_id"] = [f"{model}-r{i}" for i in range(len(df))]
    return df


def per_point(layers: int, s: float, seed: int) -> dict[str, float]:
    """A per-layer x per-role measured sparsity dict near s (what measured_sparsity.json holds)."""
    rng = np.random.default_rng(seed)
    return {f"layers.{i}.{r}": float(np.clip(s + rng.normal(0, 0.05), 0, 1)) for i in range(layers) for r in ROLES}


def write_sweep(uri: str, tmp: Path, sweep_id: str = "synthetic-0001", models=("m", "big/model-x"),
                start_ms: int | None = None, device: str = "cpu") -> str:
    """Write POINTS (for each model) as cell runs of one sweep, with artifacts; return the parent run id."""
    from actsparse.tracking.mlflow_runs import Tracker

    tr = Tracker(uri, "actsparse")
    parent = tr.start_sweep(sweep_id, "synthetic", {"name": "synthetic", "overrides": ["method=A,B,C,D"]}, {})
    cells = []
    for model in models:
        for i, r in frame(model=model).iterrows():
            params = {"method": {"name": r.method}, "sparsity": r.sparsity, "eval": {"data": r.eval_data},
                      "model": {"name": model, "dtype": "float32"}, "data": {"tokens": 1024}}
            metrics = {"ppl": r.ppl, "ppl_dense": 10.0, "ppl_ratio": r.ppl_ratio, "sparsity/effective": r.effective,
                       "sparsity/target": r.target, "sparsity/act_mean": r.effective, "acc_avg": r.acc_avg}
            if r.speedup == r.speedup:
                metrics.update({"decode/speedup": r.speedup, "decode/tok_s": 100 * r.speedup,
                                "decode/tok_s_dense": 100})
            metrics = {k: v for k, v in metrics.items() if v == v}
            metrics.update({f"sparsity/act/{role}": r.effective for role in ROLES} if r.method != "dense" else {})
            key = f"{model}-k{i}"
            tags = {"model": model, "token_policy": "all", "cell_key": key, "sweep_id": sweep_id, "device": device,
                    "method": r.method}
            d = tmp / "art" / key
            d.mkdir(parents=True, exist_ok=True)
            if r.method != "dense":
                (d / "measured_sparsity.json").write_text(json.dumps(per_point(3, r.effective, i)))
            rid = tr.log_cell(parent, f"{model} {r.method} s={r.sparsity:g}", params, metrics, tags, d,
                              start_s=(start_ms / 1000 if start_ms else None))
            cells.append({"index": len(cells), "cell_key": key, "run_id": rid, "status": "finished"})
    (tmp / "cells.json").write_text(json.dumps(cells))
    tr.log_artifact(parent, tmp / "cells.json")
    tr.end_run(parent)
    return parent


def find_chromium() -> tuple[str | None, str]:
    """(path of a Chromium, '') or (None, why not): install it with scripts/ensure_chromium.sh when missing."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "ensure_chromium.sh")], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))
    path = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else None
    return path, proc.stderr.strip()[-800:]


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of a headless-capable Chromium; skips (saying why) only when it cannot be installed."""
    path, why = find_chromium()
    if not path:
        pytest.skip(f"Chromium is not installed and scripts/ensure_chromium.sh could not install it: {why}")
    return path


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the `actsparse` console script of this environment in cwd."""
    import sys

    script = Path(sys.executable).parent / "actsparse"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "actsparse.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


OLD_MS = 1577836800000   # 2020-01-01 UTC: the start time of the older sweep's runs


@pytest.fixture(scope="session")
def built_report(tmp_path_factory):
    """A fresh SQLite store with two synthetic sweeps and the newer one's report, written by `actsparse report`.

    Sweep old-0001 (model "n", started 2020-01-01, device cuda) is written first; synthetic-0001 (models "m"
    and "big/model-x", now, cpu) is the latest, so the report without --sweep-id covers it.
    Returns (workspace, tracking uri, parent run id of synthetic-0001, (exit status, stdout, stderr), report folder).
    """
    import contextlib
    import io

    from actsparse.cli import main

    ws = tmp_path_factory.mktemp("report-ws")
    uri = f"sqlite:///{ws}/mlflow.db"
    (ws / "old").mkdir()
    write_sweep(uri, ws / "old", "old-0001", models=("n",), start_ms=OLD_MS, device="cuda")
    parent = write_sweep(uri, ws)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):  # in-process: the imports are paid once
        rc = main(["report", "--tracking-uri", uri, "--out", str(ws / "results"), "--quality", "ppl",
                   "--quality", "acc_avg", "--budget", "acc_avg=1pt", "--iso-sparsity", "0.3,0.5"])
    # iso-sparsity levels other than the sweep's targets: a variant, written beside the sweep's own report
    return ws, uri, parent, (rc, out.getvalue(), err.getvalue()), ws / "results" / "synthetic-0001" / VARIANT


VARIANT = "variants/iso-0.3+0.5"
