"""Whole sweeps on a real local Ray cluster with a real SQLite MLflow store and a real (tiny) model."""
from __future__ import annotations

import contextlib
import io
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from actsparse.cli import main

from .conftest import run_cli

SMOKE_EVAL = {"data": "bundled:eval", "seq_len": 128, "max_tokens": 1024}
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def _sweep(args: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["sweep", *args])
    return rc, buf.getvalue()


def _client(ws):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{ws}/mlflow.db")


def _runs(ws, kind: str, parent: str | None = None):
    c = _client(ws)
    exp = c.get_experiment_by_name("actsparse")
    filt = f"tags.run_kind = '{kind}'" + (f" and tags.`mlflow.parentRunId` = '{parent}'" if parent else "")
    return c.search_runs([exp.experiment_id], filt, max_results=1000)


def _summary(out: str) -> tuple[int, int, int]:
    m = re.search(r"cells: (\d+) finished, (\d+) skipped, (\d+) failed", out)
    assert m, out
    return tuple(int(x) for x in m.groups())


@pytest.fixture(scope="module")
def smoke(ray_cluster, tmp_path_factory, sweep_model):
    """The smoke preset on the tiny model: dense + teal at 0.3 and 0.6 (4 grid points, 3 cells)."""
    ws = tmp_path_factory.mktemp("sweep")
    base = [f"model={sweep_model}", f"tracking.uri=sqlite:///{ws}/mlflow.db", f"launcher.store={ws}/store",
            f"report.dir={ws}/results"]
    rc, out = _sweep(["+sweep=smoke", *base])
    return ws, base, rc, out


def test_smoke_sweep_runs_unique_cells_once_and_logs_one_child_per_cell(smoke, sweep_model):
    ws, _, rc, out = smoke
    assert rc == 0, out
    assert _summary(out) == (3, 0, 0)            # dense at 0.3 and 0.6 is one cell: the other is merged into it
    assert "1 merged grid point(s)" in out
    (parent,) = _runs(ws, "sweep")
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep_id"].startswith("smoke-")
    children = _runs(ws, "cell", parent.info.run_id)
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    assert {(r.data.params["method.name"], r.data.metrics["sparsity/target"]) for r in children} == \
        {("dense", 0.0), ("teal", 0.3), ("teal", 0.6)}
    assert len({r.data.tags["cell_key"] for r in children}) == 3
    assert len({r.data.tags["stats_key"] for r in children}) == 1   # one calibration for all cells
    for r in children:
        t, m, p = r.data.tags, r.data.metrics, r.data.params
        assert t["sweep_id"] == parent.data.tags["sweep_id"] and t["token_policy"] == "all" and t["device"] == "cpu"
        assert t["stats_source"] == "computed"
        assert m["ppl_ratio"] == pytest.approx(m["ppl"] / m["ppl_dense"], rel=1e-9)
        for k in ("time/calibrate_s", "time/fit_s", "time/eval_s", "sparsity/act_mean", "sparsity/effective"):
            assert k in m
        # params are the flattened resolved config
        assert p["eval.seq_len"] == "128" and p["data.tokens"] == "1024" and p["model.name"] == sweep_model


def test_dense_perplexity_equals_a_hand_computed_one(smoke, sweep_model):
    import actsparse as asp
    from actsparse.data.text import token_stream

    ws = smoke[0]
    model, tok = asp.load_model(sweep_model)
    ids = token_stream(tok, asp.text_data(SMOKE_EVAL["data"]), max_tokens=SMOKE_EVAL["max_tokens"])
    T = SMOKE_EVAL["seq_len"]
    x = ids[: ids.numel() // T * T].view(-1, T)                       # disjoint windows [n, T]
    with torch.no_grad():
        logits = model(x).logits                                       # [n, T, V]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
    for r in _runs(ws, "cell"):
        assert r.data.metrics["ppl_dense"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
        if r.data.params["method.name"] == "dense":
            assert r.data.metrics["ppl"] == r.data.metrics["ppl_dense"]


def test_teal_cell_matches_the_python_api_with_the_same_settings(smoke, sweep_model):
    import actsparse as asp

    ws = smoke[0]
    model, tok = asp.load_model(sweep_model)
    stats = asp.calibrate(model, tok, data="bundled:calib", tokens=1024, seq_len=128, sample_size=16384, seed=0,
                          progress=False)
    plan = asp.fit("teal", stats, sparsity=0.6)
    with asp.sparsify(model, plan, token_policy="all") as h:
        ppl = asp.perplexity(model, tok, data="bundled:eval", seq_len=128, max_tokens=1024)
        measured = h.measured_sparsity()
    (r,) = [r for r in _runs(ws, "cell") if r.data.metrics["sparsity/target"] == 0.6]
    m = r.data.metrics
    assert m["ppl"] == pytest.approx(ppl, rel=1e-4)
    assert m["sparsity/effective"] == pytest.approx(measured["effective"], abs=1e-6)
    assert m["sparsity/effective_expected"] == pytest.approx(0.6)   # uniform TEAL: every site at the target
    assert abs(m["sparsity/effective"] - 0.6) < 0.05
    for role in ROLES:
        assert m[f"sparsity/act/{role}"] == pytest.approx(measured["per_role"][role], abs=1e-6)


def test_cell_artifacts_and_the_report(smoke):
    ws = smoke[0]
    c = _client(ws)
    (parent,) = _runs(ws, "sweep")
    for r in _runs(ws, "cell"):
        names = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "plan_summary.txt", "measured_sparsity.json"} <= names
        if r.data.params["method.name"] == "teal":
            assert "sparsity_per_layer.png" in names
    parent_files = {a.path for a in c.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/pareto.png", "report/runs.csv"} <= parent_files
    sweep_id = parent.data.tags["sweep_id"]
    md = (ws / "results" / sweep_id / "report.md").read_text()
    assert "| dense" in md and "| teal" in md and "Pareto front" in md
    png = (ws / "results" / sweep_id / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    cells = json.loads((ws / "results" / sweep_id / "cells.json").read_text())
    assert [c["status"] for c in cells].count("merged") == 1 and len(cells) == 4
    assert f"report: {ws / 'results' / sweep_id / 'report.html'}" in smoke[3]


def test_rerun_does_no_model_work_and_a_new_point_reuses_the_calibration(smoke):
    ws, base, _, _ = smoke
    store_files = sorted(p for p in (ws / "store").rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in store_files]
    # a fresh process (the console script): every cell has a FINISHED run, so Ray is not even started
    proc = run_cli(["sweep", "+sweep=smoke", *base], cwd=ws)
    assert proc.returncode == 0, proc.stderr
    assert _summary(proc.stdout) == (0, 3, 0) and "1 merged grid point(s)" in proc.stdout
    assert "Ray not started" in proc.stdout and "ray: local cluster" not in proc.stdout
    assert [p.stat().st_mtime_ns for p in store_files] == mtimes
    assert len(_runs(ws, "cell")) == 3 and len(_runs(ws, "sweep")) == 2

    # one more sparsity: only the new teal cell runs; calibration and dense ppl come from the store
    rc, out = _sweep(["+sweep=smoke", *base, "sparsity=0.3,0.6,0.45"])
    assert rc == 0, out
    assert _summary(out) == (1, 3, 0) and "2 merged grid point(s)" in out
    assert "to run: 1 cells, computing 0 calibration(s) (+1 from the store), 1 fit(s), 0 dense evaluation(s) " \
           "(+1 from the store)" in " ".join(out.split())
    (new,) = [r for r in _runs(ws, "cell") if r.data.metrics["sparsity/target"] == 0.45]
    assert new.data.tags["stats_source"] == "cache"
    assert len(list((ws / "store" / "stats").iterdir())) == 1


def test_a_failing_cell_becomes_a_failed_run_and_the_sweep_goes_on(ray_cluster, workspace):
    ws, base = workspace
    short = ws / "short.txt"
    short.write_text("Too short to fill one window.")
    rc, out = _sweep(["+sweep=smoke", *base, "sparsity=0.5", f"eval.data=bundled:eval,{short}"])
    assert rc == 1, out                                  # any failed cell: non-zero exit
    assert _summary(out) == (2, 0, 2)
    (parent,) = _runs(ws, "sweep")
    assert parent.info.status == "FAILED"
    runs = _runs(ws, "cell", parent.info.run_id)
    failed = [r for r in runs if r.info.status == "FAILED"]
    ok = [r for r in runs if r.info.status == "FINISHED"]
    assert len(failed) == 2 and len(ok) == 2
    for r in failed:
        assert r.data.params["eval.data"] == str(short)
        assert r.data.tags["error"].startswith("dense evaluation failed: ActsparseError")
        assert "fewer than one window" in r.data.tags["error"]
        assert "error.txt" in {a.path for a in _client(ws).list_artifacts(r.info.run_id)}
    assert all(r.data.params["eval.data"] == "bundled:eval" for r in ok)
    # the failed cells run again next time (they have no FINISHED run), the finished ones do not
    rc, out = _sweep(["+sweep=smoke", *base, "sparsity=0.5", "eval.data=bundled:eval"])
    assert rc == 0 and _summary(out) == (0, 2, 0)
