"""actsparse: post-training activation sparsity for LLMs — calibrate, fit, sparsify, evaluate, sweep.

The public API (floor 2 of docs/DESIGN.md). Importing this module is cheap: heavy submodules load on use.
"""
from __future__ import annotations

__version__ = "0.1.0"


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
