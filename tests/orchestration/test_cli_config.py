"""Method parameters on the command line, through the real console script: defaults visible, plain overrides,
misspellings answered with the valid names, and methods whose params (not the target) set their sparsity."""
import dataclasses
import random
import re

import pytest

from actsparse.sparsifiers.builtin import load_builtin
from actsparse.sparsifiers.registry import METHODS

from .conftest import run_cli


def _methods() -> dict:
    load_builtin()
    return {name: cls for name, cls in METHODS.items()}


def test_cfg_job_shows_every_parameter_of_every_method_with_its_default(tmp_path):
    methods = _methods()
    proc = run_cli(["sweep", "--cfg", "job", "-m", "method=" + ",".join(sorted(methods))], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    import yaml

    docs = re.split(r"^# .*$", proc.stdout, flags=re.M)[1:]
    shown = {d["method"]["name"]: d["method"]["params"] for d in map(yaml.safe_load, docs)}
    assert set(shown) == set(methods)
    for name, cls in methods.items():
        want = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
                for f in dataclasses.fields(cls.Params)}
        assert shown[name] == want, name


def test_method_param_overrides_without_plus_and_old_plus_spelling_still_works(tmp_path):
    n = random.choice([2, 4, 8])
    pattern = f"{n}:{2 * n}"
    for spelling in (f"method.params.pattern={pattern}", f"+method.params.pattern={pattern}"):
        proc = run_cli(["sweep", "--cfg", "method=nm", spelling], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert f"pattern: '{pattern}'" in proc.stdout
        assert "score: magnitude" in proc.stdout          # the other defaults stay


@pytest.mark.parametrize("spelling", ["method.params.patern=8:16", "+method.params.patern=8:16"])
def test_misspelt_parameter_lists_the_valid_ones(spelling, tmp_path):
    proc = run_cli(["sweep", "--dry-run", "method=nm", spelling], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.strip()
    assert err.startswith("actsparse: error: method 'nm' has no parameter") and "patern" in err
    for f in dataclasses.fields(_methods()["nm"].Params):
        assert f.name in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_parameter_of_another_method_names_the_method_that_lacks_it(tmp_path):
    proc = run_cli(["sweep", "--dry-run", "-m", "method=teal,nm", "method.params.pattern=8:16"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "method 'teal' has no parameter 'pattern'" in proc.stderr and "allocation=uniform" in proc.stderr


def test_nm_at_a_target_it_ignores_is_merged_labelled_by_its_pattern_and_said_so(tmp_path, tiny_dir):
    n, m = random.choice([(1, 4), (3, 4), (4, 16)])          # not the default 2:4: the label names the pattern
    target = random.choice([0.2, 0.3, 0.4])
    proc = run_cli(["sweep", "--dry-run", "-m", f"model={tiny_dir}", "method=nm,teal", f"sparsity={target},0.6"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"note: nm ignores sparsity={target:g},0.6" in out.replace(", ", ",")
    nm_rows = [line for line in out.splitlines() if " nm " in line and line.startswith("#")]
    assert len(nm_rows) == 2 and all("nm s=0.5 " in r for r in nm_rows) and "duplicate of" in nm_rows[1]
    assert not any(f"nm s={target:g}" in line for line in out.splitlines())
    # a pattern of its own: labelled at 1 - N/M
    proc = run_cli(["sweep", "--dry-run", f"model={tiny_dir}", "method=nm", f"method.params.pattern={n}:{m}",
                    f"sparsity={target}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"nm(pattern={n}:{m}) s={1 - n / m:g} " in proc.stdout
