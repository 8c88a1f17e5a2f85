"""Launch configurations (block sizes, warps, pipeline depth) of the input-sparse GEMV kernels.

The table `TUNED` holds the winners of the on-device sweep in `benchmarks/bench_kernels.py --tune`
(H100, bf16, Llama-3-8B shapes); anything not in the table gets `default_config`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class GemvConfig:
    """One launch configuration of the sparse GEMV kernels."""

    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 1
    use_dot: bool = False  # tensor-core tl.dot vs CUDA-core FMA (FMA only up to FMA_MAX_BATCH rows)
    split_k: int = 0  # programs along K per column strip; 0 = enough to fill the GPU (see choose_split)


FMA_MAX_BATCH = 4  # beyond this the FMA path's per-row accumulators cost too many registers


# (kind, K, N, batch bucket) -> config; kind in {"gemv", "qkv", "pair", "gather"}.
# Winners of `bench_kernels.py --tune` on an H100 80GB HBM3, bf16, Llama-3-8B shapes, 2026-11-23
# (best summed relative time over sparsity 0 / 0.5 / 0.9; benchmarks/BENCHMARKS.md has the numbers).
TUNED: dict[tuple[str, int, int, int], GemvConfig] = {
    ("qkv", 4096, 6144, 1): GemvConfig(block_n=16, block_k=256, num_warps=4, num_stages=1, use_dot=False, split_k=1),
    ("gemv", 4096, 4096, 1): GemvConfig(block_n=32, block_k=128, num_warps=4, num_stages=1, use_dot=False, split_k=4),
    ("pair", 4096, 14336, 1): GemvConfig(block_n=32, block_k=128, num_warps=4, num_stages=1, use_dot=False,
                                         split_k=4),
    ("gemv", 14336, 4096, 1): GemvConfig(block_n=32, block_k=128, num_warps=4, num_stages=1, use_dot=False,
                                         split_k=4),
    ("qkv", 4096, 6144, 4): GemvConfig(block_n=32, block_k=64, num_warps=4, num_stages=1, use_dot=False, split_k=2),
    ("gemv", 4096, 4096, 4): GemvConfig(block_n=32, block_k=32, num_warps=4, num_stages=1, use_dot=False, split_k=4),
    ("pair", 4096, 14336, 4): GemvConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, use_dot=True, split_k=2),
    ("gemv", 14336, 4096, 4): GemvConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, use_dot=True,
                                         split_k=16),
}

# Skipped-row fraction under which an op of the decode engine (qkv, o, gu = gate/up, down) is
# slower than cuBLAS, per batch bucket: measured on the same H100 run (linear interpolation of the
# per-op speedups). At batch 4 the kernels lost at every sparsity tried (up to 0.9), so every op
# falls back; batch 2 was not measured and takes batch 4's (conservative) entry.
MEASURED_CROSSOVER: dict[int, dict[str, float]] = {
    1: {"qkv": 0.226, "o": 0.0, "gu": 0.195, "down": 0.0},
    4: {"qkv": 1.0, "o": 1.0, "gu": 1.0, "down": 1.0},
}

_override: GemvConfig | None = None


def batch_bucket(b: int) -> int:
    """Return the batch bucket used as a table key: 1, 2, 4, 8 or 16."""
    for cap in (1, 2, 4, 8):
        if b <= cap:
            return cap
    return 16


def default_config(kind: str, k: int, n: int, b: int) -> GemvConfig:
    """Return a reasonable configuration when the table has no entry (measured on H100, see BENCHMARKS.md)."""
    if b > FMA_MAX_BATCH:
        return GemvConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, use_dot=True)
    # Narrow strips (64 bytes a row) and long K chunks: each iteration waits one memory latency,
    # so the bytes per iteration and the number of programs in flight set the bandwidth. The
    # FMA accumulators hold batch × BLOCK_K × BLOCK_N floats (twice for a pair): keep them ≤ 64 a thread.
    rows = 1 if b == 1 else (2 if b == 2 else 4)
    block_k = 128
    while block_k > 16 and rows * block_k * 32 * (2 if kind == "pair" else 1) > 64 * 128:
        block_k //= 2
    return GemvConfig(block_n=32, block_k=block_k, num_warps=4, num_stages=1, use_dot=False)


_sm_count: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Return the device's multiprocessor count (132 when not a CUDA device: the interpreter)."""
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]


def choose_split(cfg: GemvConfig, k: int, tiles: int, device: torch.device) -> int:
    """Return how many programs share the K range of one output tile.

    Each program's time is (its K chunks) × (one memory latency); splitting K until about
    8 programs per SM are in flight turns that latency into bandwidth. Partial sums go to a
    workspace and the last program of a tile adds them up in a fixed order (deterministic).
    """
    max_split = max(1, -(-k // cfg.block_k))  # at least one K chunk per program
    if cfg.split_k > 0:
        return min(cfg.split_k, max_split)
    return max(1, min(max_split, (8 * num_sms(device)) // max(tiles, 1)))


_counters: dict[torch.device, torch.Tensor] = {}
MAX_TILES = 1 << 16


def tile_counters(device: torch.device) -> torch.Tensor:
    """Return the device's arrival counters (int32, one per output tile), zeroed once at creation.

    The last program of a tile resets its counter, so no launch ever zeroes them again.
    """
    buf = _counters.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("actsparse kernels: run each op once before CUDA-graph capture "
                               "(its tile counters are allocated on first use)")
        buf = _counters[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return buf


def pick_config(kind: str, k: int, n: int, b: int) -> GemvConfig:
    """Return the configuration for a launch: the active override, the tuned entry, or the default."""
    if _override is not None:
        return _override
    return TUNED.get((kind, k, n, batch_bucket(b))) or default_config(kind, k, n, b)


@contextlib.contextmanager
def override_config(cfg: GemvConfig | None) -> Iterator[None]:
    """Force every sparse GEMV launch inside the block to use `cfg` (used by the tuning sweep)."""
    global _override
    old, _override = _override, cfg
    try:
        yield
    finally:
        _override = old


_poison = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Inside the block, every kernel output is NaN-filled before its launch (tests: unwritten elements show)."""
    global _poison
    old, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = old


def new_output(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Return an uninitialised output tensor, NaN-filled when `poison_outputs` is active."""
    out = torch.empty(shape, device=device, dtype=dtype)
    if _poison:
        out.fill_(float("nan"))
    return out
