"""Triton kernels that turn activation sparsity into decode speed: the package `actsparse.kernels`.

Its modules live in the repository's top-level `kernels/` folder (one op per file, `ref.py` holding a
plain-PyTorch reference of each). That folder has no `__init__.py` on purpose: a regular package named
`kernels` at the repository root would shadow Hugging Face's `kernels` package, which transformers imports
whenever the root is on `sys.path` (`python -c`, `python -m pytest`, Ray workers started there). This module
is the package instead: Python prefers `actsparse/kernels.py` over a folder without `__init__.py`, and
`__path__` below makes the folder its submodule search path: `kernels/` in a source tree or editable
install, `actsparse/kernels/` in a wheel (setuptools maps it there, `[tool.setuptools.package-dir]`).

Every op is registered as a `torch.library` custom op (namespace `actsparse`), so torch.compile
and CUDA graphs capture it.

Triton compiles only for GPUs: on a machine without CUDA this package turns on Triton's
interpreter (TRITON_INTERPRET=1, unless already set) before defining its kernels, so they run,
slowly, on CPU tensors (tests and CI).
"""

import os as _os
from pathlib import Path as _Path

import torch as _torch


def _kernel_dir() -> str:
    here = _Path(__file__).resolve().parent
    for cand in (here / "kernels", here.parent / "kernels"):  # wheel layout, then the source tree
        if (cand / "sparse_gemv.py").is_file():
            return str(cand)
    raise ImportError(f"actsparse.kernels: no kernel sources beside {here} (looked in {here / 'kernels'} and "
                      f"{here.parent / 'kernels'}); reinstall actsparse")


__path__ = [_kernel_dir()]  # makes this module a package: its submodules are the files in that folder
if __spec__ is not None:
    __spec__.submodule_search_locations = __path__

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

# isort: split

from actsparse.kernels.attention import decode_attention
from actsparse.kernels.cats import cats_up
from actsparse.kernels.configs import GatherConfig, MaskedConfig, OneshotConfig, override_config, poison_outputs
from actsparse.kernels.fused_mlp import MlpConfig, sparse_mlp
from actsparse.kernels.gated_mlp import sparse_gated_mlp
from actsparse.kernels.lowrank import lowrank_add, pack_lowrank
from actsparse.kernels.pdl import pdl_enabled, use_pdl
from actsparse.kernels.rmsnorm import add_normed, add_rmsnorm, rmsnorm
from actsparse.kernels.route import moe_route
from actsparse.kernels.silu_mul import silu_mul
from actsparse.kernels.gather_gemv import ActiveLists, active_lists
from actsparse.kernels.sparse_gemv import compact_lists, gather_lists, pack_weight, sparse_gemv
from actsparse.kernels.topk import topk_thresholds


def interpreted() -> bool:
    """Return whether Triton's interpreter runs these kernels (on CPU tensors) rather than its compiler (on CUDA
    tensors only). Decided when the kernels were defined, by TRITON_INTERPRET: set above without CUDA, else as the
    caller left it."""
    from triton.runtime.interpreter import InterpretedFunction

    from actsparse.kernels.rmsnorm import _rmsnorm_kernel

    return isinstance(_rmsnorm_kernel, InterpretedFunction)


__all__ = [
    "ActiveLists",
    "GatherConfig",
    "MaskedConfig",
    "MlpConfig",
    "OneshotConfig",
    "active_lists",
    "add_normed",
    "add_rmsnorm",
    "cats_up",
    "compact_lists",
    "decode_attention",
    "gather_lists",
    "interpreted",
    "lowrank_add",
    "moe_route",
    "override_config",
    "pack_lowrank",
    "pack_weight",
    "pdl_enabled",
    "poison_outputs",
    "rmsnorm",
    "silu_mul",
    "sparse_gated_mlp",
    "sparse_mlp",
    "sparse_gemv",
    "topk_thresholds",
    "use_pdl",
]
