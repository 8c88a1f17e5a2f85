"""Bad input through the real console script: one clear message, exit status 2, nothing left behind."""
import pytest

from .conftest import run_cli

CASES = {
    "unknown method": (["method=tael"], "unknown method 'tael' (did you mean teal?)"),
    "unknown model": (["model=tiny-lama"], "unknown model 'tiny-lama' (did you mean the bundled 'tiny-llama'?)"),
    "sparsity above 1": (["sparsity=1.2"], "sparsity must be in [0, 1), got 1.2"),
    "sparsity 1 in a grid": (["sparsity=0.5,1.0"], "sparsity must be in [0, 1), got 1.0"),
    "negative sparsity": (["sparsity=-0.1"], "sparsity must be in [0, 1), got -0.1"),
    "missing model path": (["model=/nonexistent/actsparse-model"], "model path '/nonexistent/actsparse-model' does not exist"),
    "hub id offline": (["model=some-org/some-model"], "cannot be fetched: the hub cannot be reached (offline)"),
    "bad token policy": (["eval.token_policy=sometimes"], "token_policy must be 'all', 'decode' or 'last_fraction=f'"),
    "unknown preset": (["+sweep=nope"], "unknown sweep preset 'nope'; presets in"),
    "ill-typed value": (["sparsity=abc"], "Value 'abc' of type 'str' could not be converted to Float"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_stops_before_anything_starts(case, tmp_path, tiny_dir):
    extra, message = CASES[case]
    model = [] if any(a.startswith("model=") for a in extra) else [f"model={tiny_dir}"]
    proc = run_cli(["sweep", "-m", "+sweep=smoke", *model, *extra], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("actsparse: error: "), proc.stderr   # one message, no traceback
    assert message in err[0]
    assert proc.stdout == ""                                                          # no progress, no Ray banner
    # nothing was created: no MLflow store (so no half-written run), no artifact store, no results
    assert sorted(p.name for p in tmp_path.iterdir()) == []
