"""Faults for real: GPU out-of-memory (a real torch.OutOfMemoryError, injected on CPU through the documented
ACTSPARSE_INJECT_FAULTS hook) and a worker process killed with SIGKILL in the middle of a cell."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from actsparse.errors import ActsparseError
from actsparse.sweep.faults import OomInjector
from actsparse.sweep.tasks import retry_oom

from .conftest import mlflow_runs, summary, sweep_in_process


def test_retry_oom_halves_the_batch_once_then_names_the_knob():
    seen = []

    def run(b):
        seen.append(b)
        return 10 * b

    assert retry_oom(run, 8, 1, "evaluation", "eval.batch_size", OomInjector({"times": 1})) == (40, 4, 1)
    assert seen == [4]                       # the injected OOM hit the first call, at 8
    seen.clear()
    with pytest.raises(ActsparseError) as e:
        retry_oom(run, 8, 1, "evaluation", "eval.batch_size", OomInjector({"times": 2}))
    assert str(e.value).startswith("evaluation ran out of GPU memory at batch_size 4 (retried 1x from 8); "
                                   "lower eval.batch_size")
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError) and seen == []
    with pytest.raises(ActsparseError, match="at batch_size 1;"):   # nothing smaller to try
        retry_oom(run, 1, 1, "calibration", "data.batch_size", OomInjector({"times": 1}))
    assert retry_oom(run, 6, 3, "x", "k", OomInjector({"times": 2})) == (10, 1, 2)   # 6 -> 3 -> 1
    assert retry_oom(run, 8, 0, "x", "k", None) == (80, 8, 0)


def test_oom_in_a_cell_is_retried_at_half_the_batch_and_twice_fails_only_that_cell(ray_cluster, workspace, monkeypatch,
                                                                                     sweep_model):
    import actsparse as asp

    ws, base = workspace
    monkeypatch.setenv("ACTSPARSE_INJECT_FAULTS", json.dumps({"oom": [
        {"stage": "cell", "match": "teal s=0.6", "times": 1},
        {"stage": "cell", "match": "teal s=0.3", "times": 2}]}))
    rc, out, _ = sweep_in_process(["+sweep=smoke", *base, "method=teal", "report.enabled=false"])
    assert rc == 1 and summary(out) == (1, 0, 1), out
    uri = f"sqlite:///{ws}/mlflow.db"
    runs = {r.data.params["sparsity"]: r for r in mlflow_runs(uri, "cell")}
    ok, failed = runs["0.6"], runs["0.3"]
    assert ok.info.status == "FINISHED"
    assert ok.data.tags["oom_retries"] == "1" and ok.data.tags["eval_batch_size"] == "4"
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"].startswith(
        "evaluation failed: ActsparseError: perplexity ran out of GPU memory at batch_size 4 (retried 1x from 8)")
    (parent,) = mlflow_runs(uri, "sweep")
    assert parent.data.tags["oom_retries"] == "1"
    # the retried cell's numbers are those of the Python API with the same plan at the configured batch size
    # (perplexity and measured sparsity do not depend on the batch; the aborted attempt left no counts behind)
    model, tok = asp.load_model(sweep_model)
    plan = asp.SparsityPlan.load(ws / "store" / "plans" / ok.data.tags["plan_key"])
    with asp.sparsify(model, plan, token_policy="all") as h:
        ppl = asp.perplexity(model, tok, data="bundled:eval", seq_len=128, max_tokens=1024, batch_size=8)
        measured = h.measured_sparsity()
    assert ok.data.metrics["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert ok.data.metrics["sparsity/effective"] == pytest.approx(measured["effective"], abs=1e-6)


def _kill_when_held(pidfile, killed: dict, timeout: float = 240) -> threading.Thread:
    """Wait for the held worker to write its pid, SIGKILL it, and let the retry through."""
    def go():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                text = pidfile.read_text()
            except FileNotFoundError:
                text = ""
            if text.strip():
                killed["pid"] = int(text)
                os.kill(killed["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def _sweep_with_a_sigkill(ws, base, monkeypatch, *extra) -> tuple[int, str, dict]:
    """Run the smoke sweep, SIGKILL the worker of the teal 0.6 cell mid-cell; return (rc, stdout, {pid})."""
    pidfile = ws / "held.pid"
    monkeypatch.setenv("ACTSPARSE_INJECT_FAULTS", json.dumps(
        {"hold": [{"stage": "cell", "match": "teal s=0.6", "pidfile": str(pidfile), "seconds": 300}]}))
    killed = {}
    t = _kill_when_held(pidfile, killed)
    rc, out, _ = sweep_in_process(["+sweep=smoke", *base, "report.enabled=false", *extra])
    t.join(5)
    assert killed, "the held cell never started"
    return rc, out, killed


def test_a_worker_killed_with_sigkill_mid_cell_is_retried_and_the_sweep_completes(ray_cluster, workspace, monkeypatch):
    ws, base = workspace
    rc, out, killed = _sweep_with_a_sigkill(ws, base, monkeypatch)
    assert rc == 0 and summary(out) == (3, 0, 0), out
    uri = f"sqlite:///{ws}/mlflow.db"
    cells = mlflow_runs(uri, "cell")
    assert len(cells) == 3 and all(r.info.status == "FINISHED" for r in cells)
    (held,) = [r for r in cells if r.data.params["sparsity"] == "0.6" and r.data.params["method.name"] == "teal"]
    assert held.data.tags["worker_pid"] != str(killed["pid"])      # it finished in another process
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)                                  # and the killed one is gone for good
    (parent,) = mlflow_runs(uri, "sweep")
    assert parent.data.tags["actor_deaths"] == "1"


IMPORT_MSG = "cannot import name 'CUDAProperties' from 'kernels' (/repo/kernels/__init__.py)"


@pytest.mark.parametrize("stage", ["calibrate", "worker"])
def test_an_import_error_names_its_type_and_message_in_the_console_and_the_report(ray_cluster, workspace,
                                                                                   monkeypatch, stage):
    """Raised by a node, or by a model worker while it starts (a broken install): the cause, not "worker died"."""
    ws, base = workspace
    monkeypatch.setenv("ACTSPARSE_INJECT_FAULTS", json.dumps(
        {"raise": [{"stage": stage, "type": "ImportError", "message": IMPORT_MSG}]}))
    rc, out, _ = sweep_in_process(["+sweep=smoke", *base, "method=teal", "sparsity=0.3",
                                   "launcher.max_retries=2"])
    assert rc == 1 and summary(out)[2] == 1, out
    want = f"ImportError: {IMPORT_MSG}"
    flat = " ".join(out.split())                  # the console wraps long lines; it never cuts them
    assert want in flat, out
    assert "died" not in out and "memory" not in out
    uri = f"sqlite:///{ws}/mlflow.db"
    (cell,) = mlflow_runs(uri, "cell")
    assert cell.info.status == "FAILED" and want in cell.data.tags["error"]
    html = next((ws / "results").rglob("report.html")).read_text()
    import html as _html

    assert _html.escape(want, quote=True) in html or want in html


def test_a_worker_killed_with_sigkill_and_no_retries_says_it_died_and_blames_no_memory(ray_cluster, workspace,
                                                                                       monkeypatch):
    ws, base = workspace
    rc, out, killed = _sweep_with_a_sigkill(ws, base, monkeypatch, "launcher.max_retries=0")
    assert rc == 1 and summary(out)[2] == 1, out
    flat = " ".join(out.split())
    assert f"evaluation failed: its worker process (pid {killed['pid']}) died 1 time(s)" in flat, out
    assert "SIGKILL" in flat and ("no out-of-memory kill was counted" in flat
                                  or "does not expose its out-of-memory kill count" in flat)
    assert "give them more memory" not in flat
