"""Kernel tests run compiled on a GPU and through Triton's interpreter on CPU-only machines.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, before the
test modules import actsparse.kernels.
"""

import importlib
import importlib.util
import os
import pathlib
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _ensure_kernels_importable() -> None:
    """Load actsparse.kernels from the source tree when the install does not map it (never as `kernels`)."""
    try:
        importlib.import_module("actsparse.kernels")
        return
    except ModuleNotFoundError:
        pass
    root = pathlib.Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    import actsparse

    spec = importlib.util.spec_from_file_location("actsparse.kernels", root / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(root / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["actsparse.kernels"] = mod
    spec.loader.exec_module(mod)
    actsparse.kernels = mod


_ensure_kernels_importable()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
