"""README's first command, as a newcomer runs it: the Makefile's demo recipe, from the repository root (the root
first on sys.path, where a shadowing top-level package would break transformers), outputs sent to a temp dir."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _demo_command() -> list[str]:
    """The `demo:` recipe of the Makefile, with $(BIN) resolved to this interpreter's bin folder."""
    text = (REPO / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n\t(.+)$", text, re.M).group(1)
    recipe = recipe.replace("$(BIN)", str(Path(sys.executable).parent))
    return shlex.split(recipe)


def test_the_demo_runs_from_the_repository_root_and_prints_the_pareto_table(tmp_path):
    cmd = _demo_command()
    assert cmd[1:] == ["sweep", "+sweep=demo"]
    out_dirs = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"launcher.store={tmp_path}/store",
                f"report.dir={tmp_path}/results"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", COLUMNS="200")
    proc = subprocess.run(cmd + out_dirs, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    assert re.search(r"cells: 5 finished, 0 skipped, 0 failed, 3 merged grid point\(s\)", out), out[-3000:]
    assert "Pareto" in out and "teal" in out and "dense" in out
    ppl = [float(x) for x in re.findall(r"ppl (\d+\.\d+) \(x", out)]
    assert len(ppl) == 5 and all(p > 1 for p in ppl)
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "results").is_dir()
