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
    depth: int = 1  # 2: software-pipelined walk, two weight tiles and the next selection's operands in flight


FMA_MAX_BATCH = 4  # beyond this the FMA path's per-row accumulators cost too many registers


@dataclass(frozen=True)
class V3Config:
    """One launch configuration of the v3 (compacted active rows) kernel."""

    block_n: int = 64  # output columns per program: 128-byte weight rows in bf16
    seg_k: int = 512  # K slice per program (its channels are selected and compacted together)
    block_k: int = 64  # active rows gathered per loop step
    num_warps: int = 4
    use_dot: bool = False  # tensor cores (tl.dot, rows padded to 16) instead of CUDA-core FMA: batches 2-4
    num_stages: int = 1  # Triton's software pipelining of the walk loop
    depth: int = 1  # 2: two gathered weight tiles in flight per program


V3_MAX_BATCH = 4  # the v3 kernel keeps batch × BLOCK_K × BLOCK_N accumulators: small batches only


@dataclass(frozen=True)
class V4Config:
    """One launch configuration of the v4 (slice-stationary selection, streamed columns) kernel."""

    block_n: int = 16  # output columns a loop step: 32-byte row pieces in bf16
    seg_k: int = 512  # input channels a program selects once and keeps (its K slice)
    num_warps: int = 4
    num_stages: int = 1  # software-pipelining depth of the column loop
    per_sm: int = 4  # programs per SM the launcher aims for (sets the width of a column range)
    ranges: int = 0  # column ranges per K slice; 0 = from per_sm


V4_MAX_BATCH = 4  # x_s · tile is reduced over K every step: batch × SEG_K × BLOCK_N products a step

# (kind, K, N, batch bucket) -> the faster kernel per op, measured side by side on an H100 (bench_kernels.py,
# 2026-11-23, bf16, Llama-3-8B shapes; BENCHMARKS.md): v3 (0.3–0.9× of v2), v4 (0.57–0.91×) and v5 (~1.1×) lost
# to v6; they stay available (impl="v3" / "v4" / "v5"). Shapes not listed take DEFAULT_IMPL.
# v6 (a compaction pass, then the v3 gather walk; commit 91ae6ff) beat v2 and v5 for every op at batch 1 and 4:
# block 122.3 vs 146.0 µs (v2) at 50% and 52.3 vs 118.3 at 90%, batch 1.
IMPL: dict[tuple[str, int, int, int], str] = {
    (kind, k, n, b): "v6"
    for kind, k, n in (("qkv", 4096, 6144), ("gemv", 4096, 4096), ("pair", 4096, 14336), ("gemv", 14336, 4096))
    for b in (1, 4)
}
DEFAULT_IMPL = "v6"  # batches over V3_MAX_BATCH take v2

# (kind, K, N, batch bucket) -> V3Config, winners of the on-device v3 sweep.
# The v3 sweep's winners on the H100 (2026-11-23): BLOCK_K = 128 at batch 1, (seg 256, BLOCK_K 32) at 4.
TUNED_V3: dict[tuple[str, int, int, int], V3Config] = {
    **{(kind, k, n, 1): V3Config(block_n=64, seg_k=512, block_k=128, num_warps=4)
       for kind, k, n in (("qkv", 4096, 6144), ("gemv", 4096, 4096), ("pair", 4096, 14336), ("gemv", 14336, 4096))},
    **{(kind, k, n, 4): V3Config(block_n=64, seg_k=256, block_k=32, num_warps=4)
       for kind, k, n in (("qkv", 4096, 6144), ("gemv", 4096, 4096), ("pair", 4096, 14336), ("gemv", 14336, 4096))},
}


# (kind, K, N, batch bucket) -> config; kind in {"gemv", "qkv", "pair", "gather"}.
# Batch 1: winners of `bench_kernels.py --tune --tune-weights 0:0,0.5:1,0.9:1 --tune-batches 1` on an H100 80GB
# HBM3, bf16, Llama-3-8B shapes, 2026-11-23 (commit 06c50c1): tuned for sparsity 0.5 and 0.9 only, since the
# engine runs an op on cuBLAS below its crossover. Narrow strips (block_n 16: 32-byte row pieces, more programs
# in flight) win every op; the software-pipelined walk (depth 2) wins only q|k|v (19.3 vs 20.5 µs at 50%).
TUNED: dict[tuple[str, int, int, int], GemvConfig] = {
    ("qkv", 4096, 6144, 1): GemvConfig(block_n=16, block_k=256, num_warps=4, num_stages=1, use_dot=False, split_k=1,
                                       depth=2),
    ("gemv", 4096, 4096, 1): GemvConfig(block_n=16, block_k=128, num_warps=4, num_stages=1, use_dot=False, split_k=4),
    ("pair", 4096, 14336, 1): GemvConfig(block_n=16, block_k=128, num_warps=4, num_stages=1, use_dot=False,
                                         split_k=2),
    ("gemv", 14336, 4096, 1): GemvConfig(block_n=16, block_k=128, num_warps=4, num_stages=1, use_dot=False,
                                         split_k=4),
    ("qkv", 4096, 6144, 4): GemvConfig(block_n=32, block_k=64, num_warps=4, num_stages=1, use_dot=False, split_k=2),
    ("gemv", 4096, 4096, 4): GemvConfig(block_n=32, block_k=32, num_warps=4, num_stages=1, use_dot=False, split_k=4),
    ("pair", 4096, 14336, 4): GemvConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, use_dot=True, split_k=2),
    ("gemv", 14336, 4096, 4): GemvConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, use_dot=True,
                                         split_k=16),
}

# Skipped-row fraction under which an op of the decode engine (qkv, o, gu = gate/up, down) is
# slower than cuBLAS, per batch bucket: measured on an H100 run (linear interpolation of the per-op
# speedups); batch 2 was not measured and takes batch 4's (conservative) entry.
# v6 crossovers from the c9fff86 run, with the configs above (batch 4: skipped-row fraction of the batch union).
MEASURED_CROSSOVER: dict[int, dict[str, float]] = {
    1: {"qkv": 0.367, "o": 0.077, "gu": 0.186, "down": 0.136},
    4: {"qkv": 0.836, "o": 0.694, "gu": 0.687, "down": 0.654},
}

# (kind, K, N, batch bucket) -> V4Config, winners of the on-device v4 sweep.
TUNED_V4: dict[tuple[str, int, int, int], V4Config] = {}

# (kind, K, N, batch bucket) -> GemvConfig of the v5 path: the selection pass (`select.py`) and then the v2
# walk over the selected input (PRESEL: one load per chunk, no norm, no thresholds). Also used for inputs that
# arrive already selected (thresh=None: the output of a producer's `out_thresh` epilogue).
# Batch 1: winners of `bench_kernels.py --tune-v5 --tune-weights 0:0,0.5:1,0.9:1 --tune-batches 1` on an H100 80GB
# HBM3, bf16, Llama-3-8B shapes, 2026-11-23 (commit 8c8dab9); batch 4 takes the v2 table.
TUNED_V5: dict[tuple[str, int, int, int], GemvConfig] = {
    ("qkv", 4096, 6144, 1): GemvConfig(block_n=128, block_k=32, num_warps=4, num_stages=1, use_dot=False, split_k=11),
    ("gemv", 4096, 4096, 1): GemvConfig(block_n=32, block_k=128, num_warps=4, num_stages=1, use_dot=False, split_k=4,
                                        depth=2),
    ("pair", 4096, 14336, 1): GemvConfig(block_n=32, block_k=128, num_warps=4, num_stages=1, use_dot=False,
                                         split_k=4),
    ("gemv", 14336, 4096, 1): GemvConfig(block_n=32, block_k=128, num_warps=4, num_stages=1, use_dot=False,
                                         split_k=4, depth=2),
}

# (kind, K, N, batch bucket) -> V3Config of the v6 path: a compaction pass writes each K slice's list of kept
# channels once, then the v3 walk gathers the active weight rows (work ∝ active rows, no per-program selection).
# Batch 1: winners of `bench_kernels.py --tune-v6 --tune-weights 0:0,0.5:1,0.9:1 --tune-batches 1` on an H100 80GB
# HBM3, bf16, Llama-3-8B shapes, 2026-11-23 (commit c9fff86, the second v6 sweep): 32-column strips, 128 gathered
# rows a step and long K slices win (64-row steps cost 2-4x in the first sweep, 256-row steps lost too); batch 4
# takes TUNED_V3's entry.
TUNED_V6: dict[tuple[str, int, int, int], V3Config] = {
    ("qkv", 4096, 6144, 1): V3Config(block_n=32, seg_k=2048, block_k=128, num_warps=4),
    ("gemv", 4096, 4096, 1): V3Config(block_n=32, seg_k=1024, block_k=128, num_warps=4),
    ("pair", 4096, 14336, 1): V3Config(block_n=32, seg_k=4096, block_k=128, num_warps=4),
    ("gemv", 14336, 4096, 1): V3Config(block_n=32, seg_k=4096, block_k=128, num_warps=4),
}

_override: GemvConfig | None = None
_override_v5: GemvConfig | None = None
_override_v3_impl = "v3"
_override_v3: V3Config | None = None
_override_v4: V4Config | None = None


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
def override_config(cfg: GemvConfig | V3Config | V4Config | None, impl: str = "v2") -> Iterator[None]:
    """Force every sparse GEMV launch inside the block to use `cfg`: a GemvConfig forces the v2 kernel
    (or, with impl="v5", the selection pass + v2 walk), a V3Config the v3 kernel (impl="v6": the compaction
    pass + v3 walk), a V4Config the v4 kernel
    (tests and the tuning sweep); batches the forced kernel cannot run take v2."""
    global _override, _override_v3, _override_v4, _override_v5, _override_v3_impl
    if impl not in ("v2", "v5", "v3", "v6"):
        raise ValueError(f"override_config: impl must be 'v2' or 'v5' (a GemvConfig's kernels) or 'v3' or 'v6' "
                         f"(a V3Config's), got {impl!r}")
    old = (_override, _override_v3, _override_v4, _override_v5, _override_v3_impl)
    _override_v3_impl = impl if impl in ("v3", "v6") else "v3"
    gemv = cfg if isinstance(cfg, GemvConfig) else None
    _override = gemv if impl == "v2" else None
    _override_v5 = gemv if impl == "v5" else None
    _override_v3 = cfg if isinstance(cfg, V3Config) else None
    _override_v4 = cfg if isinstance(cfg, V4Config) else None
    try:
        yield
    finally:
        _override, _override_v3, _override_v4, _override_v5, _override_v3_impl = old


def default_v3_config(kind: str, k: int, n: int, b: int) -> V3Config:
    """Return the v3 configuration when the table has no entry: fewer rows a step as the batch grows."""
    block_k = 64 if b == 1 else (32 if b == 2 else 16)
    return V3Config(block_n=64, seg_k=512, block_k=block_k, num_warps=4)


def default_v6_config(kind: str, k: int, n: int, b: int) -> V3Config:
    """Return the v6 configuration when the table has no entry: the batch-1 sweep's near-winner (128 gathered
    rows a step, 1024-channel slices), fewer rows a step as the batch grows (batch × rows × columns accumulators)."""
    if b == 1:
        return V3Config(block_n=32, seg_k=1024, block_k=128, num_warps=4)
    if b == 2:
        return V3Config(block_n=32, seg_k=1024, block_k=64, num_warps=4)
    return V3Config(block_n=64, seg_k=256, block_k=32, num_warps=4)


def default_v4_config(kind: str, k: int, n: int, b: int) -> V4Config:
    """Return the v4 configuration when the table has no entry: shorter slices as the batch grows."""
    return V4Config(seg_k=512 if b == 1 else (256 if b == 2 else 128))


IMPLS = ("v2", "v3", "v4", "v5", "v6")
MAX_BATCH = {"v2": None, "v3": V3_MAX_BATCH, "v4": V4_MAX_BATCH, "v5": None, "v6": V3_MAX_BATCH}


def choose_impl(kind: str, k: int, n: int, b: int, impl: str = "auto", *, presel: bool = False,
                out_sel: bool = False) -> tuple[str, GemvConfig | V3Config | V4Config]:
    """Return which kernel runs a launch ("v2", "v3", "v4", "v5" or "v6") and its configuration.

    impl: "auto" (an active override, else the measured table `IMPL`, else DEFAULT_IMPL; a batch the
    chosen kernel cannot run takes v2), or one of IMPLS. presel: the input arrives
    already selected (thresh=None); out_sel: the output is selected for its consumer (out_thresh). Both
    run on the v2 kernel only: v5 (or v2 with its own table when asked for explicitly).
    """
    if impl not in ("auto",) + IMPLS:
        raise ValueError(f"impl must be 'auto', 'v2', 'v3', 'v4', 'v5' or 'v6', got {impl!r}")
    if (presel or out_sel) and impl in ("v3", "v4", "v6"):
        raise ValueError(f"the {impl} kernel cannot take an already-selected input (thresh=None) or select its "
                         "output (out_thresh); use impl='v5', 'v2' or 'auto'")
    if impl == "auto":
        if _override is not None:
            impl = "v2"
        elif _override_v5 is not None:
            impl = "v5"
        elif _override_v3 is not None and not (presel or out_sel):
            impl = "v6" if _override_v3_impl == "v6" else "v3"
        elif _override_v4 is not None and not (presel or out_sel):
            impl = "v4"
        elif presel:
            impl = "v5"
        else:
            impl = IMPL.get((kind, k, n, batch_bucket(b)), DEFAULT_IMPL)
            if out_sel and impl in ("v3", "v4", "v6"):
                impl = "v2"
        cap = MAX_BATCH[impl]
        if cap is not None and b > cap:
            impl = "v2"
    cap = MAX_BATCH[impl]
    if cap is not None and b > cap:
        raise ValueError(f"the {impl} kernel runs batches of at most {cap} rows, got {b}; use impl='v2'")
    key = (kind, k, n, batch_bucket(b))
    if impl == "v5":
        return "v5", (_override_v5 or _override or TUNED_V5.get(key) or TUNED.get(key)
                      or default_config(kind, k, n, b))
    if impl == "v3":
        return "v3", _override_v3 or TUNED_V3.get(key) or default_v3_config(kind, k, n, b)
    if impl == "v6":
        return "v6", _override_v3 or TUNED_V6.get(key) or TUNED_V3.get(key) or default_v6_config(kind, k, n, b)
    if impl == "v4":
        return "v4", _override_v4 or TUNED_V4.get(key) or default_v4_config(kind, k, n, b)
    return "v2", pick_config(kind, k, n, b)


# kernel name -> resources of its most recent launch (registers and spills per thread, shared memory
# per program, warps), read from the compiled kernel; the tuning sweep logs them next to the times.
COMPILED: dict[str, dict[str, int]] = {}


def record_compiled(kernel: str, compiled, k: int, n: int, pair: bool) -> None:
    """Remember a launch's compiled-kernel resources under "kernel[KxN]" ("x2" for a gate/up pair); nothing
    under the interpreter, which compiles nothing."""
    n_regs = getattr(compiled, "n_regs", None)
    if n_regs is None:
        return
    md = getattr(compiled, "metadata", None)
    COMPILED[f"{kernel}[{k}x{n}{'x2' if pair else ''}]"] = {"regs": int(n_regs), "spills": int(getattr(compiled, "n_spills", 0)),
                      "shared": int(getattr(md, "shared", 0)), "warps": int(getattr(md, "num_warps", 0))}


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
