"""One real lm-eval sweep through the console script: per-task accuracy with standard errors beside dense in the
console, in MLflow and in the report; n.s. exactly when within 2 standard errors; a `limit` run said to be
subsampled; terminal tables without Markdown; no dependency warnings; nm at a target it ignores recorded at its
pattern's sparsity."""
import math
import random
import re

import pytest

from actsparse.eval.lm_eval import TASK_DIR

from .conftest import mlflow_runs, run_cli

TASKS = ("actsparse_context", "actsparse_continuation", "actsparse_continuation_local")


@pytest.fixture(scope="module")
def acc_sweep(tmp_path_factory, tiny_dir):
    ws = tmp_path_factory.mktemp("acc-sweep")
    limit = random.randint(12, 24)
    proc = run_cli(["sweep", "-m", "+sweep=smoke", f"model={tiny_dir}", "method=teal,nm", "sparsity=0.3",
                    "eval=lm_eval", f"eval.lm_eval.limit={limit}", "eval.max_tokens=512", "ray.num_cpus=1",
                    f"tracking.uri=sqlite:///{ws}/mlflow.db", f"launcher.store={ws}/store",
                    f"report.dir={ws}/results"], cwd=ws, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = {r.data.tags["method"]: r for r in mlflow_runs(f"sqlite:///{ws}/mlflow.db", "cell")}
    return ws, limit, proc, runs


def _table_rows(out: str, first: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("│").split("│")] for line in out.splitlines()
            if line.startswith("│")]
    return [r for r in rows if r[0] == first]


def test_mlflow_records_each_tasks_standard_error_binomial_over_the_items_scored(acc_sweep):
    _, limit, _, runs = acc_sweep
    for run in runs.values():
        m = run.data.metrics
        for t in TASKS:
            p = m[f"acc/{t}"]
            assert m[f"acc_stderr/{t}"] == pytest.approx(math.sqrt(p * (1 - p) / (limit - 1)), abs=1e-9)
            pd_ = m[f"acc/{t}_dense"]
            assert m[f"acc_stderr/{t}_dense"] == pytest.approx(math.sqrt(pd_ * (1 - pd_) / (limit - 1)), abs=1e-9)
        ses = [m[f"acc_stderr/actsparse_offline"]]
        assert ses[0] > 0 and m["acc_avg_stderr"] == pytest.approx(ses[0])     # one name asked: its group
        assert "subsampled" in run.data.tags["lm_eval_subsampled"]


def test_console_shows_per_task_table_with_errors_dense_beside_and_significance(acc_sweep):
    _, limit, proc, runs = acc_sweep
    out = proc.stdout
    totals = {t: sum(1 for _ in open(TASK_DIR / f"{t}.test.jsonl")) for t in TASKS}
    for t in TASKS:
        rows = _table_rows(out, t)
        assert len(rows) == len(runs), out                          # one table per finished cell
        for row in rows:
            assert row[1] == f"{limit}/{totals[t]}"                 # the subsample, out of the task's items
            assert re.fullmatch(r"\d+\.\d ± \d+\.\d", row[2]) and re.fullmatch(r"\d+\.\d ± \d+\.\d", row[3])
    # n.s. exactly when |Δ| <= 2 sqrt(se^2 + se_dense^2), from the recorded metrics
    for method, run in runs.items():
        m = run.data.metrics
        d = m["acc_avg"] - m["acc_avg_dense"]
        ns = abs(d) <= 2 * math.hypot(m["acc_avg_stderr"], m["acc_avg_stderr_dense"])
        line = next(x for x in out.splitlines() if x.startswith("✓") and f" {method}" in x)
        assert ("not significant: within 2 stderr" in line) == ns, line
    assert "subsampled (eval.lm_eval.limit)" in out
    assert "within 2 standard" in out


def test_console_has_terminal_tables_no_markdown_and_no_dependency_warnings(acc_sweep):
    _, _, proc, _ = acc_sweep
    both = proc.stdout + proc.stderr
    assert "Token authentication" not in both and "WARNING" not in both
    assert "\\_" not in proc.stdout and "**" not in proc.stdout and "|---" not in proc.stdout
    assert "┃ method" in proc.stdout and "Pareto front" in proc.stdout


def test_report_task_table_carries_errors_significance_and_subsample_note(acc_sweep):
    ws, _, _, runs = acc_sweep
    (md,) = (ws / "results").glob("*/tables/tasks_*.md")
    text = md.read_text()
    assert " ± " in text and "± one standard error" in text and "subsampled" in text


def test_nm_at_a_target_it_ignores_is_recorded_and_tabled_at_its_patterns_sparsity(acc_sweep):
    ws, _, proc, runs = acc_sweep
    assert "note: nm ignores sparsity=0.3" in proc.stdout
    assert runs["nm"].data.params["sparsity"] == "0.5" and runs["teal"].data.params["sparsity"] == "0.3"
    (table,) = (ws / "results").glob("*/tables/table_*_acc_avg.md")
    rows = {r.split(" | ")[0].lstrip("| ").strip(): [c.strip() for c in r.strip(" |").split(" | ")[1:]]
            for r in table.read_text().splitlines() if r.startswith("| ") and "---" not in r}
    assert rows["method"] == ["0.3", "0.5"]
    assert rows["nm"][0] == "–" and rows["nm"][1] != "–" and rows["teal"][1] == "–"
