"""The top-level kernels/ folder is never importable as a package named `kernels`.

transformers imports Hugging Face's `kernels` package while importing its models; whenever the repository root
is on sys.path (`python -c` or `python -m pytest` started there, Ray workers, PYTHONPATH=<repo>), a regular
package kernels/ would shadow it. So kernels/ has no __init__.py, and `actsparse.kernels` is the module
actsparse/kernels.py whose __path__ is that folder. These tests run Python the way a user would, from the root.
"""

import importlib.machinery
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _py(code: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> str:
    import os

    full_env = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env=full_env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_kernels_folder_is_not_a_regular_package():
    assert not (REPO / "kernels" / "__init__.py").exists()
    spec = importlib.machinery.PathFinder.find_spec("kernels", [str(REPO)])
    # at most a namespace portion: nothing of ours is executed under the name `kernels`
    assert spec is None or spec.origin in (None, "namespace")
    assert spec is None or spec.loader is None or isinstance(spec.loader, importlib.machinery.NamespaceLoader)


def test_from_the_root_kernels_is_hugging_faces_and_llama_imports():
    """Where Hugging Face's `kernels` is installed (transformers >= 5.2x pulls it in) the root's folder never hides
    it; where it is not (the GPU machine's transformers 5.17), `import kernels` finds at most our folder as an
    empty namespace that runs none of our code, and transformers' Llama still imports."""
    code = ("import importlib.metadata as md\n"
            "try:\n"
            "    hf = md.version('kernels')\n"
            "except md.PackageNotFoundError:\n"
            "    hf = None\n"
            "import actsparse.kernels as ak\n"
            "from transformers.models.llama.modeling_llama import LlamaForCausalLM\n"
            "import transformers.activations\n"
            "import kernels\n"
            "print(getattr(kernels, '__file__', None))\n"
            "print(hf)\n"
            "print(ak.sparse_gemv.__module__, ak.__path__[0])\n")
    lines = _py(code, cwd=REPO).splitlines()
    if lines[1] == "None":
        assert lines[0] == "None"   # a namespace portion: no module of ours ran under the name `kernels`
    else:
        assert "site-packages" in lines[0] and not lines[0].startswith(str(REPO / "kernels"))
        assert re.match(r"\d+\.\d+", lines[1])
    mod, path = lines[2].split()
    assert mod == "actsparse.kernels.sparse_gemv"
    assert Path(path).name == "kernels" and (Path(path) / "sparse_gemv.py").is_file()


def test_custom_ops_registered_once_and_overrides_reach_them():
    code = ("import torch, actsparse.kernels as ak, actsparse.kernels.configs as c, kernels\n"
            "print(ak.configs is c, hasattr(torch.ops.actsparse, 'sparse_gemv'))\n")
    assert _py(code, cwd=REPO).split() == ["True", "True"]


def test_readme_snippet_runs_with_the_repo_on_pythonpath(tmp_path):
    """README's Python block, verbatim, in a fresh interpreter with PYTHONPATH=<repo> (the root first on sys.path)."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    # Every line as written, on less text: the snippet calibrates on 16,384 tokens and scores the whole bundled
    # eval text (~3 min on two busy cores); 2,048 tokens of each run the same calls, and what is checked here is
    # that they run from a fresh interpreter with the repository first on sys.path. A README edit that drops
    # these calls fails the count below rather than silently testing less.
    small = {'tokens=16_384)': 'tokens=2_048)',
             'data=asp.text_data("bundled:eval"))': 'data=asp.text_data("bundled:eval"), max_tokens=2_048)'}
    for old, new in small.items():
        assert block.count(old) == 1, old
        block = block.replace(old, new)
    out = _py(block, cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    nums = [float(x) for x in re.findall(r"\d+\.\d+", out)]
    assert nums, out
    assert (tmp_path / "plan").is_dir()
