"""calibrate(): run calibration text through the model with hooks on every probe."""
from __future__ import annotations

import hashlib
import json
import time
import zlib

import torch
from tqdm.auto import tqdm

from ..artifacts import content_key
from ..data.text import TextData, text_data, token_stream, token_windows
from ..errors import ActsparseError
from ..models.moe import install_routing
from ..models.sites import find_blocks, hook_points
from ..models.split import input_device
from .stats import ProbeCollector, Stats

DEFAULT_SAMPLE_SIZE = 2 ** 17


def model_fingerprint(model) -> dict:
    """Return what identifies a model's weights for artifact keys: source, revision, dtype, config hash."""
    src = getattr(model, "actsparse_source", None)
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    cfg = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return {"model": src.name if src else type(model).__name__,
            "path": src.path if src and src.kind == "hub" else None,
            "revision": getattr(getattr(model, "config", None), "_commit_hash", None),
            "dtype": dtype,
            "config": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]}


def probe_points(model) -> dict[str, tuple]:
    """Return probe name -> (module, 'input'|'output'): every site input, plus gate_act and up_out."""
    install_routing(model)   # MoE experts run through hookable per-expert linears (a no-op elsewhere)
    return {p: v for p, v in hook_points(model).items() if not p.endswith(".mlp")}


@torch.no_grad()
def calibrate(model, tok, data: "str | TextData" = "bundled:calib", tokens: int = 16_384, seq_len: int = 512,
              batch_size: int = 4, sample_size: int = DEFAULT_SAMPLE_SIZE, probes: "list[str] | None" = None,
              seed: int = 0, progress: bool = True) -> Stats:
    """Return Stats for every probe (or the named ones) over `tokens` calibration tokens in windows of seq_len."""
    if tokens < seq_len:
        raise ActsparseError(f"tokens ({tokens}) must be at least seq_len ({seq_len})")
    if sample_size < 16:
        raise ActsparseError(f"sample_size must be >= 16, got {sample_size}")
    data = text_data(data)
    points = probe_points(model)
    if probes is not None:
        unknown = [p for p in probes if p not in points]
        if unknown:
            raise ActsparseError(f"unknown probes {unknown}; known: {', '.join(list(points)[:8])}, ...")
        points = {p: points[p] for p in probes}
    windows = token_windows(token_stream(tok, data, max_tokens=tokens), seq_len)  # [n, seq_len]
    dev = input_device(model)
    collectors = {p: ProbeCollector(sample_size, seed + zlib.crc32(p.encode())) for p in points}
    # Sites that read the very same tensor (q/k/v; gate/up) are collected once: the first forward
    # records which probe saw each tensor first, later probes of that tensor become aliases of it.
    # `seen` holds the tensors themselves during the first forward, so the allocator cannot hand a
    # freed tensor's address to a later layer's input and fake an alias.
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}
    alias: dict[str, str] = {}
    first = [True]

    def observe(name: str, x: torch.Tensor) -> None:
        if first[0]:
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if key in seen:
                alias[name] = seen[key][0]
                return
            seen[key] = (name, x)
        if name not in alias:
            collectors[name].update(x)

    hooks = []
    for name, (mod, where) in points.items():
        if where == "input":
            hooks.append(mod.register_forward_pre_hook(lambda m, args, n=name: observe(n, args[0])))
        else:
            hooks.append(mod.register_forward_hook(lambda m, args, out, n=name: observe(n, out)))
    t0 = time.perf_counter()
    try:
        for i in tqdm(range(0, len(windows), batch_size), desc="calibrate", unit="batch", disable=not progress):
            model(windows[i:i + batch_size].to(dev), use_cache=False)
            first[0], seen = False, {}
    finally:
        for h in hooks:
            h.remove()
    fp = model_fingerprint(model)
    params = {"tokens": int(windows.numel()), "seq_len": seq_len, "sample_size": sample_size, "seed": seed,
              "probes": sorted(points)}
    sites = {s.name: [s.in_features, s.out_features] for b in find_blocks(model) for s in b.sites.values()}
    meta = {**fp, "data": data.name, "sites": sites, "data_key": data.key, **{k: v for k, v in params.items() if k != "probes"},
            "n_probes": len(points), "time_s": time.perf_counter() - t0}
    meta["stats_key"] = content_key(fp, data.key, params)
    results = {p: c.result() for p, c in collectors.items() if p not in alias}
    probes = {p: results[alias.get(p, p)] for p in points}
    return Stats(probes, windows.cpu(), meta)
