"""What a sweep leaves behind, through the real console script: the experiment opens on the runs table in
MLflow 3's UI, the sweep says where that table is, each re-run of a sweep is a numbered parent run, and the
artifact store's folders and files follow the user's umask."""
import os
import random
import re

from .conftest import mlflow_runs, run_cli


def test_experiment_opens_on_runs_table_and_reruns_are_numbered(tmp_path, tiny_dir):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["sweep", "-m", "+sweep=smoke", f"model={tiny_dir}", "method=teal", "sparsity=0.4", f"tracking.uri={uri}",
            f"launcher.store={tmp_path}/store", "report.enabled=false", "ray.num_cpus=1"]
    mask = random.choice([0o002, 0o007, 0o027])
    old = os.umask(mask)                       # the console script inherits it
    try:
        first = run_cli(args, cwd=tmp_path, timeout=400)
    finally:
        os.umask(old)
    assert first.returncode == 0, first.stdout + first.stderr
    artifacts = [p for p in (tmp_path / "store").glob("*/*") if not p.name.startswith(".")]
    assert {p.parent.name for p in artifacts} == {"stats", "plans", "dense"}
    for d in artifacts:
        assert d.stat().st_mode & 0o777 == 0o777 & ~mask, (d, oct(d.stat().st_mode))
        for f in d.iterdir():
            assert f.stat().st_mode & 0o777 == 0o666 & ~mask, (f, oct(f.stat().st_mode))
    exp = MlflowClient(uri).get_experiment_by_name("actsparse")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    line = first.stdout.strip().splitlines()[-1]
    assert line == (f"runs table: mlflow ui --backend-store-uri {uri}  then  "
                    f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs")
    for attempt in (2, 3):       # re-runs (nothing left to run) are parents of their own, numbered
        again = run_cli(args, cwd=tmp_path, timeout=200)
        assert again.returncode == 0 and re.search(r"cells: 0 finished, 1 skipped", again.stdout), again.stdout
    parents = sorted(mlflow_runs(uri, "sweep"), key=lambda r: r.info.start_time)
    sweep_id = parents[0].data.tags["sweep_id"]
    assert [r.info.run_name for r in parents] == [sweep_id, f"{sweep_id} #2", f"{sweep_id} #3"]
    assert [r.data.tags["attempt"] for r in parents] == ["1", "2", "3"]
    assert len(mlflow_runs(uri, "cell")) == 1                      # the cell itself ran once
    _runs_table_opens_in_the_real_ui(tmp_path, uri, line.rsplit("  then  ", 1)[1], sweep_id)


def _runs_table_opens_in_the_real_ui(root, uri: str, url: str, sweep_id: str) -> None:
    """`mlflow ui` on the store, the printed URL in headless Chromium: the page is the runs table with the sweep."""
    import html
    import shutil
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request
    from pathlib import Path

    import pytest

    from tests.report.conftest import find_chromium

    from .servers import _stop, free_port

    browser, why = find_chromium()
    if not browser:
        pytest.skip(f"Chromium is not installed and scripts/ensure_chromium.sh could not install it: {why}")
    port = free_port()
    log = open(root / "mlflow_ui.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri,
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=root)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (root / "mlflow_ui.log").read_text()
                time.sleep(1)
        page = url.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                              "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=30000",
                              "--window-size=1400,900", "--dump-dom", page], capture_output=True, text=True,
                             timeout=180).stdout
    finally:
        _stop(proc)
        shutil.rmtree(profile, ignore_errors=True)
    text = html.unescape(dom)
    assert "Training runs" in text and f"{sweep_id} #3" in text, text[-3000:]


def test_existing_experiment_without_the_kind_tag_gets_it(tmp_path, tiny_dir):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    exp_id = c.create_experiment("actsparse")
    assert "mlflow.experimentKind" not in c.get_experiment(exp_id).tags
    proc = run_cli(["sweep", "--dry-run", f"model={tiny_dir}", f"tracking.uri={uri}"], cwd=tmp_path)
    assert proc.returncode == 0                              # a dry run opens nothing
    assert "mlflow.experimentKind" not in c.get_experiment(exp_id).tags
    from actsparse.tracking.mlflow_runs import Tracker

    Tracker(uri, "actsparse")
    assert c.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
