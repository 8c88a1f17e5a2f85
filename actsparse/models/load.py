"""Load a causal LM and its tokenizer from a bundled name, a local HF directory or a hub id."""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ActsparseError

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "models"
BUNDLED_MODELS = ("tiny-llama", "tiny-gelu")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: kind is 'bundled', 'local' or 'hub'."""
    kind: str
    name: str
    path: str  # local directory, or the hub id


def bundled_model_dir(name: str) -> Path:
    """Return the directory of a bundled reference model."""
    return ASSETS / name


def hub_offline() -> bool:
    """True when the Hugging Face hub must not (or cannot) be reached."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ACTSPARSE_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return False
    except OSError:
        return True


def resolve_model_source(spec: str, check_hub: bool = True) -> ModelSource:
    """Resolve a model spec to a bundled name, a local directory or a hub id; raise ActsparseError if unusable."""
    if not isinstance(spec, str) or not spec.strip():
        raise ActsparseError(f"model must be a non-empty string, got {spec!r}")
    if spec in BUNDLED_MODELS:
        path = bundled_model_dir(spec)
        if not (path / "config.json").exists():
            raise ActsparseError(f"bundled model {spec!r} is missing its files at {path}; "
                                 "reinstall actsparse or rebuild it with scripts/train_reference_models.py")
        return ModelSource("bundled", spec, str(path))
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ActsparseError(f"model directory {spec!r} has no config.json; expected a Hugging Face "
                                 "model folder (config.json + weights + tokenizer files)")
        return ModelSource("local", p.name, str(p.resolve()))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise ActsparseError(f"model path {spec!r} does not exist; give a bundled name "
                             f"({', '.join(BUNDLED_MODELS)}), an existing local directory, or a hub id")
    if not _HUB_ID.match(spec):
        raise ActsparseError(f"unknown model {spec!r}: not a bundled name ({', '.join(BUNDLED_MODELS)}), "
                             "not an existing directory, and not a valid hub id like 'org/name'")
    if check_hub and hub_offline() and not _in_hf_cache(spec):
        close = difflib.get_close_matches(spec, BUNDLED_MODELS, n=1)
        hint = f" (did you mean the bundled {close[0]!r}?)" if close else ""
        raise ActsparseError(f"unknown model {spec!r}{hint}: it is not a bundled model or a local directory, "
                             "and as a Hugging Face hub id it cannot be fetched: the hub cannot be reached "
                             "(offline) and the model is not in the local HF cache. Use a bundled model "
                             f"({', '.join(BUNDLED_MODELS)}) or a local directory")
    return ModelSource("hub", spec, spec)


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("auto",):
        return None
    if dtype not in _DTYPES:
        raise ActsparseError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[dtype]


def load_model(spec: str, dtype=None, device=None, revision: str | None = None):
    """Return (model, tokenizer) for a bundled name, local HF directory or hub id, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = resolve_model_source(spec)
    torch_dtype = _dtype(dtype)
    if torch_dtype is None:
        torch_dtype = torch.float32 if (device in (None, "cpu")) else None
    kw = {"revision": revision} if (src.kind == "hub" and revision) else {}
    if src.kind != "hub":
        kw["local_files_only"] = True
    config = AutoConfig.from_pretrained(src.path, **kw)
    if getattr(config, "is_encoder_decoder", False):
        raise ActsparseError(f"model {spec!r} is an encoder-decoder; actsparse supports decoder-only LMs here")
    model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch_dtype or "auto", **kw)
    tok = AutoTokenizer.from_pretrained(src.path, **kw)
    if device is not None:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    model.actsparse_source = src
    return model, tok
