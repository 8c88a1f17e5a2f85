"""Resume and idempotence: corrupt or missing artifacts are recomputed, and Ctrl-C (a real SIGINT to the real
console script) keeps finished runs, leaves no partial artifact visible, and the same command resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from actsparse.artifacts import is_valid, load_tensors_json

from .conftest import REPO, mlflow_runs, summary, sweep_in_process


def _flip_byte(path, offset: int = -9) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def test_a_corrupt_calibration_and_a_missing_plan_are_recomputed_and_nothing_else_is(ray_cluster, workspace):
    ws, base = workspace
    rc, out, _ = sweep_in_process(["+sweep=smoke", *base, "method=teal", "sparsity=0.3"])
    assert rc == 0 and summary(out) == (1, 0, 0), out
    uri = f"sqlite:///{ws}/mlflow.db"
    (first,) = mlflow_runs(uri, "cell")
    stats_dir = ws / "store" / "stats" / first.data.tags["stats_key"]
    plan_dir = ws / "store" / "plans" / first.data.tags["plan_key"]
    good_plan = load_tensors_json(plan_dir)[0]
    _flip_byte(stats_dir / "tensors.safetensors")                     # bit rot in the calibration
    assert not is_valid(stats_dir)
    for f in plan_dir.iterdir():                                       # the plan is gone
        f.unlink()
    plan_dir.rmdir()
    (dense_key,) = os.listdir(ws / "store" / "dense")
    dense_mtime = (ws / "store" / "dense" / dense_key / "meta.json").stat().st_mtime_ns

    # teal 0.3 under the 'decode' token policy is a new cell on the same (lost) plan; teal 0.5 a new plan
    rc, out, _ = sweep_in_process(["+sweep=smoke", *base, "method=teal", "sparsity=0.3,0.5",
                                   "eval.token_policy=decode"])
    assert rc == 0, out
    assert summary(out) == (2, 0, 0)
    parents = sorted(mlflow_runs(uri, "sweep"), key=lambda r: r.info.start_time)
    tags = parents[-1].data.tags
    assert (tags["calibrations_computed"], tags["calibrations_cached"]) == ("1", "0")     # the corrupt one, again
    assert (tags["fits_computed"], tags["fits_cached"]) == ("2", "0")                     # the lost one + teal 0.5
    assert (tags["dense_evals_computed"], tags["dense_evals_cached"]) == ("0", "1")       # policy-free: reused
    assert is_valid(stats_dir) and is_valid(plan_dir)
    assert (ws / "store" / "dense" / dense_key / "meta.json").stat().st_mtime_ns == dense_mtime
    # the refitted plan is the plan of the recomputed statistics: same sites, same kind of rule, finite thresholds
    new_plan = load_tensors_json(plan_dir)[0]
    assert new_plan.keys() == good_plan.keys()
    assert all(torch.isfinite(v).all() and v.shape == good_plan[k].shape for k, v in new_plan.items())
    new = [r for r in mlflow_runs(uri, "cell", parents[-1].info.run_id)]
    assert len(new) == 2 and all(r.data.tags["stats_source"] == "computed" for r in new)


def _finished(uri: str) -> int:
    """FINISHED cell runs so far (0 while the store is being created or is busy)."""
    try:
        return len(mlflow_runs(uri, "cell", status="FINISHED"))
    except Exception:
        return 0


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _popen_cli(args: list[str], cwd, env: dict) -> subprocess.Popen:
    """The console script started as a background job of a non-interactive shell is: with SIGINT ignored.
    The sweep must install its own handling; the test then passes whichever way pytest itself was started."""
    script = os.path.join(os.path.dirname(sys.executable), "actsparse")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "actsparse.cli"]
    return subprocess.Popen(cmd + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ignore_sigint)


def test_ctrl_c_keeps_finished_runs_leaves_no_partial_artifact_and_the_same_command_resumes(ray_cluster, workspace,
                                                                                           monkeypatch):
    ws, base = workspace
    uri = f"sqlite:///{ws}/mlflow.db"
    pidfile = ws / "held.pid"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env["ACTSPARSE_INJECT_FAULTS"] = json.dumps(
        {"hold": [{"stage": "cell", "match": "teal s=0.6", "pidfile": str(pidfile), "seconds": 300}]})
    args = ["sweep", "+sweep=smoke", *base, "ray.num_cpus=2"]
    proc = _popen_cli(args, ws, env)
    try:
        deadline = time.monotonic() + 300
        # wait until the held cell is running and every other cell has its FINISHED run
        while not (pidfile.exists() and _finished(uri) == 2):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the sweep did not reach the held cell"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)                                # Ctrl-C
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "interrupted; finished cells are recorded" in err
    (parent,) = mlflow_runs(uri, "sweep")
    assert parent.info.status == "KILLED"
    cells = mlflow_runs(uri, "cell")
    assert sorted(r.info.status for r in cells) == ["FINISHED", "FINISHED"]           # no half-written run
    assert {r.data.params["sparsity"] for r in cells if r.data.params["method.name"] == "teal"} == {"0.3"}
    # every artifact a reader can see is whole (hidden temp folders are what an interrupted writer leaves)
    visible = [p for kind in ("stats", "plans", "dense") for p in (ws / "store" / kind).iterdir()
               if not p.name.startswith(".")]
    assert len(visible) == 5 and all(is_valid(p) for p in visible)                    # 1 stats, 3 plans, 1 dense

    # the same command again (here in-process): the finished cells are skipped, the interrupted one runs
    monkeypatch.delenv("ACTSPARSE_INJECT_FAULTS", raising=False)
    rc, out, err = sweep_in_process(args[1:])
    assert rc == 0, out + err
    assert summary(out) == (1, 2, 0)
    assert "nodes: 0 calibration(s) computed + 1 from the store, 0 + 1 fit(s), 0 + 1 dense" in out
    runs = mlflow_runs(uri, "cell", status="FINISHED")
    assert len(runs) == 3 and len({r.data.tags["cell_key"] for r in runs}) == 3


def test_an_interrupted_sweep_over_every_method_resumes_with_nothing_failed(ray_cluster, workspace, monkeypatch):
    """Every method's cached plan is applied again by the re-run (rule kinds load with the plan), and the cells that
    finished before the interrupt are skipped, not recomputed."""
    import actsparse as asp

    ws, base = workspace
    uri = f"sqlite:///{ws}/mlflow.db"
    pidfile = ws / "held.pid"
    names = sorted(asp.methods())
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env["ACTSPARSE_INJECT_FAULTS"] = json.dumps(
        {"hold": [{"stage": "cell", "match": "teal s=0.5", "pidfile": str(pidfile), "seconds": 300}]})
    args = ["sweep", "+sweep=smoke", *base, "ray.num_cpus=2", "report.enabled=false",
            f"method={','.join(names)}", "sparsity=0.5"]
    proc = _popen_cli(args, ws, env)
    try:
        deadline = time.monotonic() + 480
        while not (pidfile.exists() and _finished(uri) >= 3):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the sweep did not reach the held cell"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    before = {r.data.tags["cell_key"] for r in mlflow_runs(uri, "cell", status="FINISHED")}
    assert len(before) >= 3
    monkeypatch.delenv("ACTSPARSE_INJECT_FAULTS", raising=False)
    rc, out, err = sweep_in_process(args[1:])
    assert rc == 0, out + err
    finished, skipped, failed = summary(out)
    assert failed == 0 and skipped == len(before) and finished + skipped == len(names), out
    runs = mlflow_runs(uri, "cell", status="FINISHED")
    assert {r.data.params["method.name"] for r in runs} == set(names)
    assert len({r.data.tags["cell_key"] for r in runs}) == len(names)
