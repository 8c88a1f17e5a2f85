"""actsparse: post-training activation sparsity for LLMs — calibrate, fit, sparsify, evaluate, sweep.

The public API (floor 2 of ../DESIGN.md). Importing this module is cheap: heavy submodules load on use.
"""
from __future__ import annotations

__version__ = "0.1.0"


class _SourceKernels:
    """Find actsparse.kernels in ../kernels when running from a source checkout that is not installed.

    pyproject maps the top-level folder kernels/ to actsparse.kernels; an install honours that, but
    `python` started in the repo root imports ./actsparse directly and would not see it. Appended
    last to sys.meta_path, so an installed package always wins.
    """

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "actsparse.kernels":
            return None
        import importlib.util
        import os

        kdir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
        init = os.path.join(kdir, "__init__.py")
        if not os.path.exists(init):
            return None
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[kdir])


def _install_source_kernels() -> None:
    import sys

    if not any(isinstance(f, type) and f is _SourceKernels for f in sys.meta_path):
        sys.meta_path.append(_SourceKernels)


_install_source_kernels()

_API = {
    "load_model": "actsparse.models.load",
    "find_sites": "actsparse.models.sites",
    "text_data": "actsparse.data.text",
    "TextData": "actsparse.data.text",
    "calibrate": "actsparse.calibration.collect",
    "Stats": "actsparse.calibration.stats",
    "fit": "actsparse.sparsifiers.registry",
    "methods": "actsparse.sparsifiers.registry",
    "register_method": "actsparse.sparsifiers.registry",
    "SparsityPlan": "actsparse.sparsifiers.plan",
    "Rule": "actsparse.sparsifiers.plan",
    "sparsify": "actsparse.sparsifiers.apply",
    "perplexity": "actsparse.eval.perplexity",
    "fidelity": "actsparse.eval.fidelity",
    "lm_eval_accuracy": "actsparse.eval.lm_eval",
    "mask_stability": "actsparse.eval.stability",
    "decode_speed": "actsparse.eval.speed",
    "ActsparseError": "actsparse.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'actsparse' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
