"""`actsparse report` through the console script on a synthetic sweep: it leads with effective sparsity, bolds
nothing where a requested sparsity means different things per method, refuses to rank a budget that only
extrapolations meet, and writes non-default options beside the sweep's report, never over it."""
from __future__ import annotations

import contextlib
import io
import random
import subprocess

from .conftest import POINTS, run_cli, write_sweep


def _report_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """`actsparse report ARGS` in this process (the console script itself ran once already)."""
    from actsparse.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["report", *args])
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def test_report_leads_with_effective_sparsity_and_variants_go_beside(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = write_sweep(uri, tmp_path, models=("m",))
    out = tmp_path / "results"
    base = run_cli(["report", "--tracking-uri", uri, "--out", str(out)], cwd=tmp_path)
    assert base.returncode == 0, base.stderr
    # the console leads with the front (quality vs effective sparsity), as terminal tables
    titles = [ln.strip() for ln in base.stdout.splitlines() if ln.strip().startswith(("Pareto front", "Iso-", "ppl ↓"))]
    assert titles[0].startswith("Pareto front, ppl vs effective sparsity") and "**" not in base.stdout
    own = out / "synthetic-0001" / "report.md"
    md = own.read_text()
    # at requested 0.2, A skips 0.20 of the weight reads and B 0.25: that table crowns nobody, and says why
    eff = {(m, s): e for m, s, e, *_ in POINTS}
    assert abs(eff[("A", 0.2)] - eff[("B", 0.2)]) > 0.02
    block = md.split("**ppl ↓ by method and requested sparsity (model m", 1)[1].split(")**", 1)[1]
    block = block.split("\n\n**", 1)[0]
    assert "|" in block and "**" not in block and "No entry is bold" in block
    assert md.index("**Pareto front, ppl vs effective sparsity") < md.index("**ppl ↓ by method and requested")

    ratio = random.choice(["2x", "3x", "1.5x"])       # looser than any measured point of every method
    loose = _report_in_process(["--tracking-uri", uri, "--out", str(out), "--budget", ratio])
    assert loose.returncode == 0, loose.stderr
    variant = out / "synthetic-0001" / "variants" / f"budget-{ratio}"
    assert own.read_text() == md                                     # the sweep's own report is untouched
    vmd = (variant / "report.md").read_text()
    assert f"At ppl ≤ {ratio[:-1]} × dense on m, no method's reach is measured" in vmd
    assert "reaches 1.00×" not in vmd and "no method's reach is measured" in loose.stdout
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent)}
    assert {"report", f"report-budget-{ratio}"} <= logged
    assert {a.path for a in MlflowClient(uri).list_artifacts(parent, "report")} >= {"report/report.md"}
