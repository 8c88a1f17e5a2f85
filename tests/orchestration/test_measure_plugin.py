"""A measure registered in its own file (toy_measure.py) runs in a sweep like a built-in one: validated before
anything runs, computed in the workers (which import the module the cell records), dense once per model, logged
under its metric names, summarised on the console and shown in the report as a quality column."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from .conftest import REPO, mlflow_runs, run_cli, summary, sweep_in_process

MODULE = "tests.orchestration.toy_measure"
SMALL = ["data.tokens=512", "data.seq_len=64", "data.sample_size=4096", "eval.seq_len=64", "eval.max_tokens=256",
         "eval.top1.n_windows=3", "eval.top1.seq_len=32"]


@pytest.fixture
def top1():
    """The toy measure, registered for this test only."""
    from actsparse.eval.measures import unregister_measure

    mod = importlib.import_module(MODULE)
    yield mod
    for name in ("top1", "unavailable"):
        unregister_measure(name)
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


def test_a_measure_that_cannot_run_is_skipped_and_the_cells_finish(ray_cluster, workspace, top1):
    """A dense measure raising Skip: the dense node records why, every cell finishes with the reason as a tag."""
    ws, base = workspace
    rc, out, err = sweep_in_process(["-m", "method=dense,teal", "sparsity=0.5", "eval.measure=[ppl,unavailable]",
                                     *SMALL, *base, "report.enabled=false"])
    assert rc == 0, out + err
    assert summary(out) == (2, 0, 0)
    for r in mlflow_runs(f"sqlite:///{ws}/mlflow.db", "cell"):
        assert r.data.tags["unavailable_skipped"] == "needs an instrument this machine lacks"
        assert "ppl" in r.data.metrics
    assert out.count("unavailable skipped: needs an instrument this machine lacks") == 2


def test_a_measure_may_not_take_a_name_the_sweep_uses():
    from actsparse.eval.measures import Measure, measures, register_measure

    for name in ("seq_len", "effective", "device"):
        with pytest.raises(ValueError, match="is a field of eval"):
            register_measure(name)(type("M", (Measure,), {}))
    with pytest.raises(ValueError, match="result_key"):
        register_measure("fine")(type("M", (Measure,), {"result_key": "target"}))
    with pytest.raises(TypeError, match="decorates a Measure subclass"):
        register_measure("fine")(object)
    assert "fine" not in measures() and "seq_len" not in measures()


def test_a_plugin_registered_before_the_registry_is_read_still_meets_the_built_in_names():
    """The built-ins load lazily; a plugin module imported first must not take a built-in's name unnoticed."""
    code = ("from actsparse.eval.measures import Measure, register_measure\n"
            "try:\n"
            "    register_measure('ppl')(type('Mine', (Measure,), {}))\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "measure 'ppl' is registered already (by actsparse.eval.builtin_measures)" in proc.stdout


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


def _plugin_dist(tmp_path, target: str):
    """A folder holding an installed distribution's metadata with one `actsparse.measures` entry point."""
    site = tmp_path / "site"
    d = site / "toyplugin-0.1.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 0.1\n")
    (d / "entry_points.txt").write_text(f"[actsparse.measures]\ntop1 = {target}\n")
    return {"PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}


def test_an_entry_point_adds_a_measure_to_the_command_line_and_the_config(tmp_path):
    env = _plugin_dist(tmp_path, MODULE)
    proc = run_cli(["ls", "measures"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "│ top1" in proc.stdout and "n_windows=4" in proc.stdout
    proc = run_cli(["sweep", "--dry-run", f"tracking.uri=sqlite:///{tmp_path}/m.db", "method=teal",
                    "eval.measure=[ppl,top1]", "eval.top1.n_windows=2"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_cli(["sweep", "--dry-run", "method=teal", "eval.measure=[top1]", "eval.top1.seq_len=1"],
                   cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "eval.top1 needs" in proc.stderr


def test_a_broken_measure_plugin_is_named(tmp_path):
    proc = run_cli(["ls", "measures"], cwd=tmp_path, env=_plugin_dist(tmp_path, "tests.orchestration.no_such_module"))
    assert proc.returncode == 2
    assert ("the measure plugin 'top1' (tests.orchestration.no_such_module) failed to import: ModuleNotFoundError"
            in proc.stderr)
    assert "Traceback" not in proc.stderr


def test_a_measure_defined_in_the_script_run_is_refused_before_the_sweep(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from actsparse.eval.measures import Measure, register_measure\n"
        "from actsparse.errors import ActsparseError\n"
        "from actsparse.sweep.cells import validate_cells\n"
        "from actsparse.sweep.config import schema\n"
        "from omegaconf import OmegaConf\n"
        "@register_measure('here')\n"
        "class Here(Measure):\n"
        "    def run(self, ctx, batch_size): return 1.0\n"
        "cfg = OmegaConf.to_container(OmegaConf.structured(schema()), resolve=True)\n"
        "cfg['model']['name'] = 'tiny-llama'; cfg['method'] = {'name': 'teal', 'params': {}}\n"
        "cfg['eval']['measure'] = ['here']\n"
        "try:\n"
        "    validate_cells([([], cfg)])\n"
        "except ActsparseError as e:\n"
        "    print(e); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "measure 'here' is defined in the script being run (__main__)" in proc.stdout
