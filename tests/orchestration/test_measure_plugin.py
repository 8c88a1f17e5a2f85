"""A measure registered in its own file (toy_measure.py) runs in a sweep like a built-in one: validated before
anything runs, computed in the workers (which import the module the cell records), dense once per model, logged
under its metric names, summarised on the console and shown in the report as a quality column."""
from __future__ import annotations

import importlib
import sys

import pytest

from .conftest import mlflow_runs, run_cli, summary, sweep_in_process

MODULE = "tests.orchestration.toy_measure"
SMALL = ["data.tokens=512", "data.seq_len=64", "data.sample_size=4096", "eval.seq_len=64", "eval.max_tokens=256",
         "eval.top1.n_windows=3", "eval.top1.seq_len=32"]


@pytest.fixture
def top1():
    """The toy measure, registered for this test only."""
    from actsparse.eval.measures import unregister_measure

    mod = importlib.import_module(MODULE)
    yield mod
    unregister_measure("top1")
    sys.modules.pop(MODULE, None)


def test_a_plugin_measure_runs_in_a_sweep(ray_cluster, workspace, top1, sweep_model):
    import actsparse as asp

    ws, base = workspace
    rc, out, err = sweep_in_process(["-m", "method=dense,teal", "sparsity=0.5", "eval.measure=[ppl,top1]", *SMALL,
                                     *base])
    assert rc == 0, out + err
    assert summary(out) == (2, 0, 0)
    runs = {r.data.tags["method"]: r for r in mlflow_runs(f"sqlite:///{ws}/mlflow.db", "cell")}
    dense, teal = runs["dense"].data.metrics, runs["teal"].data.metrics
    # an independent reference: the same windows scored one at a time in this process
    model, tok = asp.load_model(sweep_model)
    s = top1.Top1Settings(n_windows=3, seq_len=32)
    ids = top1.windows(tok, "bundled:eval", s)
    hits = sum(int((model(input_ids=w[None]).logits[0, :-1].argmax(-1) == w[1:]).sum()) for w in ids)
    assert dense["top1"] == dense["top1_dense"] == teal["top1_dense"] == pytest.approx(hits / (3 * 31), abs=1e-12)
    assert 0.0 <= teal["top1"] <= 1.0 and "ppl" in teal
    assert "top1 " in out and "(dense " in out
    assert "top1" in (ws / "results").rglob("report.md").__next__().read_text()


def test_plugin_measure_settings_are_checked_before_anything_runs(ray_cluster, workspace, top1):
    ws, base = workspace
    rc, out, err = sweep_in_process(["method=teal", "eval.measure=[top1]", "eval.top1.n_windows=0", *base])
    assert rc == 2 and "eval.top1 needs n_windows >= 1" in err, out + err
    assert not (ws / "mlflow.db").exists()


def test_an_unregistered_measure_is_refused_with_the_registered_ones(tmp_path):
    proc = run_cli(["sweep", f"tracking.uri=sqlite:///{tmp_path}/m.db", "eval.measure=[ppl,top1]"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "eval.measure must be a non-empty list of distinct measures from ['ppl', 'lm_eval', 'fidelity', 'speed', " \
           "'stability']" in proc.stderr
