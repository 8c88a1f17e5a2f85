"""Triton kernels that turn activation sparsity into decode speed (imported as `actsparse.kernels`).

Every op is registered as a `torch.library` custom op (namespace `actsparse`), so torch.compile
and CUDA graphs capture it; `ref` holds a plain-PyTorch reference of each.

Triton compiles only for GPUs: on a machine without CUDA this package turns on Triton's
interpreter (TRITON_INTERPRET=1, unless already set) before defining its kernels, so they run,
slowly, on CPU tensors (tests and CI).
"""

if __name__ == "actsparse.kernels":
    import os as _os

    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ.setdefault("TRITON_INTERPRET", "1")

    # isort: split

    from .attention import decode_attention
    from .cats import cats_up
    from .configs import GemvConfig, V3Config, V4Config, override_config, pick_config, poison_outputs
    from .gated_mlp import sparse_gated_mlp
    from .rmsnorm import add_rmsnorm, rmsnorm
    from .silu_mul import silu_mul
    from .sparse_gemv import pack_weight, sparse_gemv
else:
    # A stray top-level `kernels` import of this folder (transformers probes for the Hugging Face `kernels`
    # package by importing it, which finds this folder when the working directory is the repository root).
    # Define nothing: a second copy would re-register the custom ops (torch.ops.actsparse.*) against its own
    # module state, so overrides set through `actsparse.kernels` stopped reaching the ops (seen on the GPU tests).
    __version__ = "N/A"  # transformers then reports the Hugging Face package as unavailable

__all__ = [
    "GemvConfig",
    "V3Config",
    "V4Config",
    "add_rmsnorm",
    "cats_up",
    "decode_attention",
    "override_config",
    "pack_weight",
    "pick_config",
    "poison_outputs",
    "rmsnorm",
    "silu_mul",
    "sparse_gated_mlp",
    "sparse_gemv",
]
