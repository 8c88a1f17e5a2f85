"""How a model splits over tensor-parallel ranks: which world sizes divide it, each rank's shard config and its
slice of the vocabulary. Shared by the engine (`tensor_parallel.py`) and the per-rank checkpoint reader
(`checkpoint.py`), which must agree on it."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from .config import LlamaConfig


def split_reason(cfg: LlamaConfig, world_size: int) -> Optional[str]:
    """Why `cfg` cannot be split over `world_size` ranks (None when it can)."""
    w = world_size
    if w < 1:
        return f"world_size must be at least 1, got {w}"
    if cfg.moe:
        return ("tensor-parallel decode splits dense MLPs by intermediate channels; splitting a mixture of experts "
                "(by expert or within each) is not built: decode a mixture-of-experts model with Engine on one GPU")
    if cfg.n_kv_heads % w:
        return (f"tensor-parallel decode splits the key-value heads evenly: world_size {w} does not divide the "
                f"model's {cfg.n_kv_heads} kv heads; use a divisor of {cfg.n_kv_heads}")
    if cfg.n_heads % w:
        return f"world_size {w} does not divide the model's {cfg.n_heads} query heads"
    if cfg.intermediate_size % w:
        return (f"tensor-parallel decode splits the MLP's intermediate channels evenly: world_size {w} does not "
                f"divide intermediate_size {cfg.intermediate_size}")
    return None


def shard_config(cfg: LlamaConfig, world_size: int) -> LlamaConfig:
    """The config of one rank's shard: its heads and intermediate channels (vocab_size stays the model's)."""
    why = split_reason(cfg, world_size)
    if why:
        raise ValueError(why)
    w = world_size
    return replace(cfg, n_heads=cfg.n_heads // w, n_kv_heads=cfg.n_kv_heads // w,
                   intermediate_size=cfg.intermediate_size // w)


def vocab_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's slice of the vocabulary (the last slice may be shorter)."""
    per = -(-vocab_size // world_size)
    return min(rank * per, vocab_size), min((rank + 1) * per, vocab_size)
