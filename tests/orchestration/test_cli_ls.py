"""`actsparse ls` and `actsparse cache` through the real console script, on a real sweep's MLflow store and
artifact store; `report --sweep-id` with an unknown id names the closest sweeps."""
import dataclasses
import random
import re
import string

import pytest

from actsparse.sparsifiers.builtin import load_builtin
from actsparse.sparsifiers.registry import METHODS

from .conftest import mlflow_runs, run_cli


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_dir):
    """One finished tiny sweep (teal at one sparsity, dense beside): its workspace and sweep id."""
    ws = tmp_path_factory.mktemp("ls-sweep")
    proc = run_cli(["sweep", "-m", "+sweep=smoke", f"model={tiny_dir}", "method=teal", "sparsity=0.5",
                    f"tracking.uri=sqlite:///{ws}/mlflow.db", f"launcher.store={ws}/store", "report.enabled=false",
                    "ray.num_cpus=1"], cwd=ws, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep_id = mlflow_runs(f"sqlite:///{ws}/mlflow.db", "sweep")[0].data.tags["sweep_id"]
    return ws, sweep_id


def _rows(out: str) -> list[list[str]]:
    """The cells of a rich table's body rows (│-separated)."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in out.splitlines()
            if line.startswith("│")]


def test_ls_methods_lists_every_method_with_every_parameter_default(tmp_path):
    proc = run_cli(["ls", "methods"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = re.sub(r"\s*│\s*", " ", proc.stdout)      # rich folds long cells over lines: compare on the words
    text = re.sub(r"\s+", "", text)
    load_builtin()
    names = [r[0] for r in _rows(proc.stdout) if r[0]]
    assert names == sorted(METHODS)
    for cls in METHODS.values():
        for f in dataclasses.fields(cls.Params):
            d = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default)
            assert f"{f.name}={d}".replace(" ", "") in text, (cls.name, f.name)
    for preset in ("teal_paper", "wina_paper", "larosa_paper", "cats_paper"):
        assert preset in text


def test_ls_measures_lists_every_measure_with_its_settings(tmp_path):
    from actsparse.eval.measures import measures

    proc = run_cli(["ls", "measures"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = re.sub(r"\s+", "", re.sub(r"\s*│\s*", " ", proc.stdout))
    rows = [r for r in _rows(proc.stdout) if r[0]]
    assert [r[0] for r in rows] == list(measures())
    assert {r[0]: r[2] for r in rows} == {n: "yes" if m.dense else "no" for n, m in measures().items()}
    for m in measures().values():
        for f in dataclasses.fields(m.Settings) if m.Settings else []:
            d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert f"{f.name}={d}".replace(" ", "") in text, (m.name, f.name)


def test_ls_models_shows_bundled_and_hf_cache_models(tmp_path):
    org, name = "".join(random.choices(string.ascii_lowercase, k=6)), "m" + str(random.randint(0, 999))
    snap = tmp_path / "hub" / f"models--{org}--{name}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--noconfig--x" / "snapshots" / "a").mkdir(parents=True)   # no config: not a model
    proc = run_cli(["ls", "models"], cwd=tmp_path, env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert proc.returncode == 0, proc.stderr
    rows = {r[0]: r[1] for r in _rows(proc.stdout)}
    assert rows["tiny-llama"] == "bundled" and rows["tiny-gelu"] == "bundled"
    assert rows[f"{org}/{name}"] == "HF cache" and "noconfig/x" not in rows


def test_ls_tasks_lists_the_bundled_offline_tasks(tmp_path):
    from actsparse.eval.lm_eval import TASK_DIR

    proc = run_cli(["ls", "tasks"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r[0]: r[1] for r in _rows(proc.stdout)}
    assert set(rows) == {p.stem for p in TASK_DIR.glob("*.yaml")}
    assert rows["actsparse_offline"] == "group"


def test_ls_sweeps_lists_the_sweep_with_its_cells(swept):
    ws, sweep_id = swept
    proc = run_cli(["ls", "sweeps", "--tracking-uri", f"sqlite:///{ws}/mlflow.db"], cwd=ws)
    assert proc.returncode == 0, proc.stderr
    (row,) = _rows(proc.stdout)
    assert row[0] == sweep_id and row[1] == "FINISHED" and row[2] == "1 finished"


def test_ls_sweeps_without_a_store_says_so_and_creates_none(tmp_path):
    proc = run_cli(["ls", "sweeps"], cwd=tmp_path)
    assert proc.returncode == 2 and "no MLflow store at sqlite:///mlflow.db" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_report_with_an_unknown_sweep_id_names_the_closest(swept, tmp_path):
    ws, sweep_id = swept
    typo = sweep_id[:-1] + ("0" if sweep_id[-1] != "0" else "1")
    proc = run_cli(["report", "--tracking-uri", f"sqlite:///{ws}/mlflow.db", "--sweep-id", typo,
                    "--out", str(tmp_path / "r")], cwd=ws)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith(f"actsparse: error: no sweep '{typo}'") and f"closest: {sweep_id}" in err
    assert not (tmp_path / "r").exists()


def test_cache_ls_and_clear_asks_first_and_deletes_only_when_told(swept, tmp_path):
    import shutil

    ws, _ = swept
    store = tmp_path / "store"
    shutil.copytree(ws / "store", store)
    have = {k: sorted(p.name for p in (store / k).iterdir()) for k in ("stats", "plans", "dense")}
    assert all(len(v) == 1 for v in have.values())
    proc = run_cli(["cache", "ls", "--store", str(store)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = _rows(proc.stdout)
    assert sorted((r[0], r[1]) for r in rows) == sorted((k, v[0]) for k, v in have.items())
    # declined or unanswered: nothing is deleted, exit status 1
    for answer in ("n\n", ""):
        proc = run_cli(["cache", "clear", "--store", str(store)], cwd=tmp_path, input=answer)
        assert proc.returncode == 1 and "? [y/N]" in proc.stdout and "nothing deleted" in proc.stdout
        assert "pass --yes" in proc.stdout
        assert all((store / k / v[0]).is_dir() for k, v in have.items())
    proc = run_cli(["cache", "clear", "--store", str(store), "--kind", "plans", "--yes"], cwd=tmp_path)
    assert proc.returncode == 0 and "deleted 1 artifact(s)" in proc.stdout
    assert not (store / "plans" / have["plans"][0]).exists() and (store / "stats" / have["stats"][0]).is_dir()
    proc = run_cli(["cache", "clear", "--store", str(store)], cwd=tmp_path, input="y\n")
    assert proc.returncode == 0 and "deleted 2 artifact(s)" in proc.stdout
    assert run_cli(["cache", "ls", "--store", str(store)], cwd=tmp_path).stdout.startswith("no artifacts")


def test_cache_with_an_unknown_kind_lists_the_kinds(tmp_path):
    proc = run_cli(["cache", "clear", "--kind", "plan", "--yes"], cwd=tmp_path)
    assert proc.returncode == 2 and "unknown artifact kind(s) ['plan']; kinds: stats, plans, dense" in proc.stderr
