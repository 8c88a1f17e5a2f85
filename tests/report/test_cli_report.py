"""`actsparse report` on synthetic sweeps in real MLflow stores: files, numbers, artifacts, filters, errors."""
from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import pytest

from actsparse.errors import ActsparseError
from actsparse.report.runs import RunFilter, runs_frame



def _md_rows(md: str, title: str) -> dict[str, list[str]]:
    block = md.split(title, 1)[1].split("\n\n")[1]
    return {r.split(" | ")[0].lstrip("| ").strip(): [c.strip() for c in r.strip(" |").split(" | ")[1:]]
            for r in block.splitlines() if r.startswith("| ") and "---" not in r}


def test_report_writes_the_page_tables_plots_and_logs_them_to_the_parent_run(built_report):
    ws, uri, parent, (rc, stdout, stderr), out = built_report
    assert rc == 0, stderr
    # the console ends with the iso-quality table and the page's path
    assert stdout.rstrip().endswith(f"HTML report: {out / 'report.html'}")
    assert "Iso-quality: ppl ≤ 1.02 × dense (model m, eval bundled:eval, token policy all)" in stdout
    assert "**" not in stdout and "\\_" not in stdout and "┃ method" in stdout    # terminal tables, not Markdown
    assert "Downloading artifacts" not in stdout + stderr
    for name in ("report.html", "report.md", "runs.csv", "pareto.png", "pareto.svg", "tables/tables.tex",
                 "plots/pareto_acc_avg.png", "plots/speedup_vs_sparsity.svg",
                 "plots/sparsity_m_bundled-eval_all.png", "plots/sparsity_big-model-x_bundled-eval_all.svg",
                 "tables/iso_quality_m_bundled-eval_all_ppl.tex", "tables/table_big-model-x_bundled-eval_all_ppl.md"):
        assert (out / name).is_file(), name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "pareto.svg").read_text()[:200].lstrip().startswith("<?xml")
    from mlflow import MlflowClient

    where = "report-" + out.name
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent, where)}
    assert {f"{where}/{f}" for f in ("report.html", "report.md", "pareto.png", "tables", "plots")} <= logged


def test_report_numbers_equal_the_hand_computation_for_each_model(built_report):
    md = (built_report[4] / "report.md").read_text()
    for model in ("m", "model-x"):      # "big/model-x" is a hub-style id: shown as is, but slugged in file names
        title = f"**Iso-quality: ppl ≤ 1.02 × dense (model {'big/model-x' if model != 'm' else 'm'}"
        rows = _md_rows(md, title)
        # see test_iso: A .250 / 1.275 (prints 1.27 or 1.28: round-half-even on .275 in binary), B .280 / 1.28
        assert rows["A"][0] == "0.250" and rows["B"][0] == "**0.280**" and rows["C"][0] == "0.325†"
        acc = _md_rows(md, f"**Iso-quality: acc\\_avg drop ≤ 1 point (model {'big/model-x' if model != 'm' else 'm'}")
        assert acc["A"][0] == f"{0.2 + 0.2 * 8 / 18:.3f}" and acc["B"][0] == f"**{0.4 + 0.15 * 6 / 26:.3f}**"
    iso_s = _md_rows(md, "**Iso-sparsity: ppl ↓ at effective sparsity (model m")
    assert iso_s["method"] == ["0.3", "0.5"] and iso_s["A"] == ["10.30", "11.25"] and iso_s["D"][0] == "**10.15**"
    tex = (built_report[4] / "tables" / "iso_quality_m_bundled-eval_all_ppl.tex").read_text()
    assert "\\toprule" in tex and "\\textbf{0.280}" in tex and "0.325\\textsuperscript{\\dag}" in tex


def test_filters_select_runs_by_model_method_date_and_tag(built_report):
    df = runs_frame(built_report[1], "actsparse")
    assert len(df) == 30 and set(df["sweep_id"]) == {"old-0001", "synthetic-0001"}
    assert set(RunFilter(models=["n"]).apply(df)["model"]) == {"n"}
    # a method filter keeps the dense runs: they are every table's reference row
    assert set(RunFilter(methods=["A"]).apply(df)["method"]) == {"A", "dense"}
    cut = datetime(2021, 1, 1, tzinfo=timezone.utc)
    assert set(RunFilter(until=cut).apply(df)["sweep_id"]) == {"old-0001"}
    assert set(RunFilter(since=cut).apply(df)["sweep_id"]) == {"synthetic-0001"}
    assert set(RunFilter(tags={"device": "cuda"}).apply(df)["model"]) == {"n"}
    got = RunFilter(sweeps=["synthetic-0001"], models=["m"], tags={"method": "B"}).apply(df)
    assert set(got["method"]) == {"B", "dense"} and set(got["model"]) == {"m"}
    with pytest.raises(ActsparseError, match=r"no run matches the filters \(tag colour=red\); 30 run\(s\) before "
                                             r"filtering; no run has tag\(s\) \['colour'\]"):
        RunFilter(tags={"colour": "red"}).apply(df)


def test_all_runs_report_with_filters_through_the_command(built_report, capsys):
    from actsparse.cli import main

    ws, uri = built_report[0], built_report[1]
    assert main(["report", "--tracking-uri", uri, "--all", "--until", "2021-01-01", "--method", "A",
                 "--out", str(ws / "filtered")]) == 0
    (out,) = [p for p in (ws / "filtered").iterdir() if p.is_dir()]
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["method"]) == ["A", "A", "A", "dense"] and set(runs["model"]) == {"n"}
    assert "Iso-quality: ppl ≤ 1.02 × dense (model n" in capsys.readouterr().out
    assert "filters: method: A, started &lt; 2021-01-01 00:00" in (out / "report.html").read_text()


@pytest.mark.parametrize("args,message", [
    (["--quality", "bleu"], "cannot tell whether higher or lower is better for quality metric 'bleu'"),
    (["--quality", "ppl", "--budget", "0.98x"],
     "budget 0.98x on ppl (lower is better) would ask for better than dense"),
    (["--budget", "two"], "bad quality budget 'two'"),
    (["--since", "last tuesday"], "--since must be a date like 2025-06-30"),
    (["--tag", "device"], "--tag takes KEY=VALUE"),
    (["--iso-sparsity", "0.5,1.5"], "--iso-sparsity levels must be in [0, 1)"),
    (["--sweep-id", "a", "--sweep-id", "b"], "several --sweep-id need --all"),
    (["--all", "--model", "nope"], "no run matches the filters (model: nope); 30 run(s) before filtering"),
    (["--quality", "acc/arc_easy"], "quality metric(s) ['acc/arc_easy'] are not recorded by any finished run"),
])
def test_bad_report_arguments_give_one_clear_error(built_report, args, message, capsys, tmp_path):
    from actsparse.cli import main

    uri = built_report[1]
    assert main(["report", "--tracking-uri", uri, "--out", str(tmp_path / "out"), "--no-log", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("actsparse: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()                    # nothing half-written


@pytest.fixture(scope="module")
def mlflow_server(built_report):
    """A real `mlflow server` over the session's store, on a free localhost port; stopped at the end."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "mlflow"
    # its own session: the server's uvicorn child is stopped with it, by this group's id
    proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", built_report[1], "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {proc.stderr.read()[-2000:]}") from None
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not answer /health within 120 s")
        yield url
    finally:
        import os
        import signal

        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


@pytest.mark.slow
def test_an_http_tracking_server_reads_like_the_database_behind_it(built_report, mlflow_server):
    from actsparse.report.runs import find_sweep, layer_sparsity, run_link

    db = runs_frame(built_report[1], "actsparse").sort_values("run_id").reset_index(drop=True)
    web = runs_frame(mlflow_server, "actsparse").sort_values("run_id").reset_index(drop=True)
    assert web.attrs["tracking_uri"] == mlflow_server and len(web) == 30
    cols = ["run_id", "model", "method", "sparsity", "effective", "ppl", "acc_avg", "speedup", "sweep_id"]
    pd.testing.assert_frame_equal(web[cols], db[cols])
    sweep = find_sweep(mlflow_server, "actsparse")
    assert sweep["sweep_id"] == "synthetic-0001" and sweep["run_id"] == built_report[2]
    ids = web.loc[web["method"] != "dense", "run_id"].tolist()[:3]
    layers = layer_sparsity(mlflow_server, ids)
    assert layers == layer_sparsity(built_report[1], ids) and all(len(v) == 3 * 7 for v in layers.values())
    assert run_link(mlflow_server, "0", "abc") == f"{mlflow_server}/#/experiments/0/runs/abc"


def test_an_unreachable_server_fails_fast_with_one_message(capsys):
    import socket
    import time

    from actsparse.cli import main

    with socket.socket() as s:     # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    assert main(["report", "--tracking-uri", f"http://127.0.0.1:{port}", "--no-log"]) == 2
    assert time.perf_counter() - t0 < 15                      # not MLflow's minutes of retries
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"actsparse: error: cannot reach the MLflow tracking server at http://127.0.0.1:{port}")
