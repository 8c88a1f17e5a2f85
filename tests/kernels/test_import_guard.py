"""Run from the repository root, `import kernels` finds this project's kernels/ folder (transformers does it when
probing for the Hugging Face `kernels` package). That stray copy must define nothing: a second copy used to
re-register the custom ops against its own module state, and overrides set through actsparse.kernels stopped
reaching them."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_top_level_kernels_import_defines_nothing_and_the_ops_stay_ours():
    code = ("import importlib, torch; k = importlib.import_module('kernels'); import actsparse.kernels as ak; "
            "from transformers.utils import import_utils as u; "
            "print(k.__version__, hasattr(k, 'sparse_gemv'), ak.sparse_gemv.__module__, u.is_kernels_available())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["N/A", "False", "actsparse.kernels.sparse_gemv", "False"]
