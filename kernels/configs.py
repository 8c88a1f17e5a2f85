"""Which sparse-GEMV kernel runs a launch, and with which launch configuration.

Three implementations (BENCHMARKS.md has their measured times side by side):

- **oneshot** (`oneshot_gemv.py`, `OneshotConfig`): one program per [rows × columns] weight tile, masked row
  loads, fp32 atomic sums; TEAL's design with no zeroing launch. A flat fixed cost and a full memory pipe at any
  sparsity: the fastest at the sparsities that keep quality. Batches 1 to 16, weights [K, N], input selected
  inside the op.
- **gather** (`gather_gemv.py`, `GatherConfig`): a compaction pass lists each K slice's kept input channels,
  then a walk gathers only those weight rows: work proportional to the active rows, so it wins at high
  sparsity. Batches 1 to 4, same conditions.
- **masked** (`masked_gemv.py`, `MaskedConfig`): a split-K walk over every K chunk whose masked row loads skip
  the unselected rows. Any batch, packed weights (`pack_weight`), an input that arrives already selected
  (`thresh=None`) and an output written selected for the next op (`out_thresh`): everything the others cannot.

`choose_impl` is the dispatcher: a named kernel, or with `impl="auto"` the kernel `PREFERRED` names for the op
(measured), else gather, else masked. The decode engine names the kernel per op itself, from times it measures
on the GPU at hand at the op's expected skip (`actsparse/engine/crossover.py`). `override_config` forces one
configuration (tests, the tuning sweep).
"""

from __future__ import annotations

import collections
import contextlib
import re
from dataclasses import dataclass
from typing import Iterator, Union

import torch
import triton.language as tl


@dataclass(frozen=True)
class MaskedConfig:
    """One launch configuration of the masked split-K walk."""

    block_n: int = 32  # output columns a program owns
    block_k: int = 128  # input rows a loop step covers
    num_warps: int = 4
    num_stages: int = 1
    use_dot: bool = False  # tensor-core tl.dot vs CUDA-core FMA (FMA only up to FMA_MAX_BATCH rows)
    split_k: int = 0  # programs along K per column strip; 0 = enough to fill the GPU (see choose_split)
    depth: int = 1  # 2: software-pipelined walk, two weight tiles and the next selection's operands in flight
    atomic: bool = False  # split-K partials summed by fp32 atomics in L2 (order-dependent) instead of in order


@dataclass(frozen=True)
class OneshotConfig:
    """One launch configuration of the one-shot tiles: one program per [block_k rows × block_n columns] tile."""

    block_n: int = 128  # output columns a program owns
    block_k: int = 64  # input rows (channels) a program owns
    num_warps: int = 2
    num_stages: int = 1


@dataclass(frozen=True)
class GatherConfig:
    """One launch configuration of the compaction pass + gather walk."""

    block_n: int = 32  # output columns per program: 64-byte weight rows in bf16
    seg_k: int = 1024  # K slice per program (its channels are compacted together by the pass)
    block_k: int = 128  # active rows gathered per loop step
    num_warps: int = 4
    use_dot: bool = False  # tensor cores (tl.dot, rows padded to 16) instead of CUDA-core FMA: batches 2-4
    num_stages: int = 1  # Triton's software pipelining of the walk loop
    depth: int = 1  # 2: two gathered weight tiles in flight per program
    # The first step's indices load beside the slice's count instead of after it (entries past the count are
    # clamped to a valid row and masked out): one L2 round trip less before the first weight rows are asked for.
    eager: bool = False
    # One launch per op: no compaction pass; the walk's first programs to claim a list write it while the others
    # wait for all lists (gather_gemv._claim_and_compact). Saves a launch boundary; costs every program a claim.
    fused: bool = False


Config = Union[MaskedConfig, GatherConfig, OneshotConfig]
FMA_MAX_BATCH = 4  # beyond this the masked walk's FMA accumulators cost too many registers
GATHER_MAX_BATCH = 4  # the gather walk keeps batch × BLOCK_K × BLOCK_N accumulators (FMA) or 16 padded rows (dot)
ONESHOT_MAX_BATCH = 16  # the one-shot tiles pad batches 2-16 to one 16-row tl.dot
IMPLS = ("masked", "gather", "oneshot")

# (kind, K, N, batch bucket) -> config; kind in {"gemv", "qkv", "pair"}. Winners of the on-device sweeps
# (`benchmarks/bench_kernels.py --tune` / `--tune-gather`), bf16, Llama-3-8B shapes; anything else gets the default.
# Masked, batch 1 and 4: H100 80GB HBM3, 2026-11-23, weights 0:0,0.5:1,0.9:1 (narrow strips, long walks). On the
# H200 (2026-12-04) one-shot tiles (one K chunk a program, TEAL's design) were 1.6x slower than the gather walk.
TUNED_MASKED: dict[tuple[str, int, int, int], MaskedConfig] = {
    ("qkv", 4096, 6144, 1): MaskedConfig(block_n=16, block_k=256, split_k=1, depth=2),
    ("gemv", 4096, 4096, 1): MaskedConfig(block_n=16, block_k=128, split_k=4),
    ("pair", 4096, 14336, 1): MaskedConfig(block_n=16, block_k=128, split_k=2),
    ("gemv", 14336, 4096, 1): MaskedConfig(block_n=16, block_k=128, split_k=4),
    ("qkv", 4096, 6144, 4): MaskedConfig(block_n=32, block_k=64, split_k=2),
    ("gemv", 4096, 4096, 4): MaskedConfig(block_n=32, block_k=32, split_k=4),
    ("pair", 4096, 14336, 4): MaskedConfig(block_n=64, block_k=128, num_stages=3, use_dot=True, split_k=2),
    ("gemv", 14336, 4096, 4): MaskedConfig(block_n=64, block_k=128, num_stages=3, use_dot=True, split_k=16),
    # cats_up's split-K walk over W_u's kept rows (CATS), H100, 8d07a2c, `--cats-anatomy`
    ("cats_up", 4096, 14336, 1): MaskedConfig(block_n=16, block_k=256, split_k=1),
}

# Gather, batch 1: H200, 2026-12-05, `--tune-gather` over 21 configs a shape, weights 0:1,0.5:1,0.9:1 (two
# gathered tiles in flight, depth 2, won every op; 32-column strips except gate|up's 64 at 2 warps);
# batch 4: the FMA walk with short slices. Kind "accumulate" (adding into a given tensor, as the engine runs
# q|k|v's and gate|up's raw sums, o and the gated down): `bench_kernels.py --tune-accumulate`, H100, be7f5b7,
# 2026-12-07, 26 configs a shape timed at 0.25 + 0.5 (32-column strips, 128-row steps, depth 2 won every op;
# within 1-2% of the next; o's sweep ran 8 configs before the budget ended it).
TUNED_GATHER: dict[tuple[str, int, int, int], GatherConfig] = {
    ("qkv", 4096, 6144, 1): GatherConfig(block_n=32, seg_k=2048, block_k=128, depth=2),
    ("gemv", 4096, 4096, 1): GatherConfig(block_n=32, seg_k=1024, block_k=128, depth=2),
    ("pair", 4096, 14336, 1): GatherConfig(block_n=64, seg_k=4096, block_k=64, num_warps=2, depth=2),
    ("gemv", 14336, 4096, 1): GatherConfig(block_n=32, seg_k=4096, block_k=128, depth=2),
    **{(kind, k, n, 4): GatherConfig(block_n=64, seg_k=256, block_k=32)
       for kind, k, n in (("qkv", 4096, 6144), ("gemv", 4096, 4096), ("pair", 4096, 14336), ("gemv", 14336, 4096))},
    ("accumulate", 4096, 6144, 1): GatherConfig(block_n=32, seg_k=2048, block_k=128, depth=2),
    ("accumulate", 4096, 4096, 1): GatherConfig(block_n=32, seg_k=1024, block_k=128, depth=2),
    ("accumulate", 4096, 14336, 1): GatherConfig(block_n=32, seg_k=4096, block_k=128, depth=2),
    ("accumulate", 14336, 4096, 1): GatherConfig(block_n=32, seg_k=2048, block_k=128, depth=2),
}


# One-shot tiles, batch 1: (kind, K, N, batch bucket) -> config, winners of `bench_kernels.py --tune-oneshot`
# (kind "accumulate": adding into a given tensor, `sparse_gemv(accumulate=)`), bf16, Llama-3-8B shapes, H100 80GB
# HBM3, 2026-12-07, weights 0:0.5,0.5:1,0.9:0.5 (TEAL's own tile, 128 columns × 64 rows × 2 warps, for q|k|v;
# 128 × 128 for gate|up; 256 × 32 for o and down, which also won adding into a tensor, within 1% of 128 × 64).
# "accumulate" of gate|up's raw pair and down (the gated down: act(gate)·up formed per tile, where 256 × 32 took
# 83 µs at 0.25 + 0.5 against 62.5 for 128 × 64): `--tune-accumulate`, H100, be7f5b7.
TUNED_ONESHOT: dict[tuple[str, int, int, int], OneshotConfig] = {
    ("qkv", 4096, 6144, 1): OneshotConfig(block_n=128, block_k=64, num_warps=2),
    ("gemv", 4096, 4096, 1): OneshotConfig(block_n=256, block_k=32, num_warps=2),
    ("pair", 4096, 14336, 1): OneshotConfig(block_n=128, block_k=128, num_warps=2),
    ("gemv", 14336, 4096, 1): OneshotConfig(block_n=256, block_k=32, num_warps=2),
    ("accumulate", 4096, 14336, 1): OneshotConfig(block_n=128, block_k=64, num_warps=2),
    ("accumulate", 14336, 4096, 1): OneshotConfig(block_n=128, block_k=64, num_warps=2),
}

# impl="auto" without an override: the kernel measured fastest over the sparsities that keep quality (0.25-0.5)
# per (kind, K, N, batch bucket); gather where there is no entry. The decode engine chooses per op from its own
# measurement on the GPU at hand instead (`actsparse/engine/crossover.py`).
PREFERRED: dict[tuple[str, int, int, int], str] = {}


def batch_bucket(b: int) -> int:
    """Return the batch bucket used as a table key: 1, 2, 4, 8 or 16."""
    for cap in (1, 2, 4, 8):
        if b <= cap:
            return cap
    return 16


def default_masked(kind: str, b: int) -> MaskedConfig:
    """The masked walk's configuration when the table has no entry."""
    if b > FMA_MAX_BATCH:
        return MaskedConfig(block_n=64, block_k=128, num_stages=3, use_dot=True)
    # Narrow strips and long K chunks; the FMA accumulators hold batch × BLOCK_K × BLOCK_N floats (twice for a
    # pair): keep them ≤ 64 a thread.
    rows = 1 if b == 1 else (2 if b == 2 else 4)
    block_k = 128
    while block_k > 16 and rows * block_k * 32 * (2 if kind == "pair" else 1) > 64 * 128:
        block_k //= 2
    return MaskedConfig(block_n=32, block_k=block_k)


def default_gather(b: int) -> GatherConfig:
    """The gather walk's configuration when the table has no entry: fewer rows a step as the batch grows."""
    if b == 1:
        return GatherConfig(block_n=32, seg_k=1024, block_k=128)
    if b == 2:
        return GatherConfig(block_n=32, seg_k=1024, block_k=64)
    return GatherConfig(block_n=64, seg_k=256, block_k=32)


_sm_count: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Return the device's multiprocessor count (132 when not a CUDA device: the interpreter)."""
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]


def choose_split(cfg: MaskedConfig, k: int, tiles: int, device: torch.device) -> int:
    """Return how many programs of the masked walk share the K range of one output tile.

    Each program's time is (its K chunks) × (one memory latency); splitting K until about 8 programs per SM
    are in flight turns that latency into bandwidth.
    """
    max_split = max(1, -(-k // cfg.block_k))  # at least one K chunk per program
    if cfg.split_k > 0:
        return min(cfg.split_k, max_split)
    return max(1, min(max_split, (8 * num_sms(device)) // max(tiles, 1)))


_override: Config | None = None
_CLASSES = {MaskedConfig: "masked", GatherConfig: "gather", OneshotConfig: "oneshot"}


@contextlib.contextmanager
def override_config(cfg: Config | None) -> Iterator[None]:
    """Inside the block, every launch that its kernel can run uses `cfg`: a MaskedConfig forces the masked walk,
    a GatherConfig the gather walk, a OneshotConfig the one-shot tiles (launches the forced kernel cannot run,
    see `choose_impl`, take the masked default)."""
    global _override
    if cfg is not None and type(cfg) not in _CLASSES:
        raise ValueError(f"override_config takes a MaskedConfig, a GatherConfig or a OneshotConfig, "
                         f"got {type(cfg).__name__}")
    old, _override = _override, cfg
    try:
        yield
    finally:
        _override = old


def why_not(impl: str, b: int, packed: bool, presel: bool, out_sel: bool, accum: bool = False) -> str:
    """Why kernel `impl` cannot run a launch ('' when it can); the masked walk runs anything but accumulating."""
    if accum and impl == "masked":
        return ("cannot add into a given fp32 tensor (accumulate=, out=) or read a gate/up pair's raw sums "
                "(gated=); the one-shot tiles and the gather walk can")
    if impl == "masked":
        return ""
    cap = GATHER_MAX_BATCH if impl == "gather" else ONESHOT_MAX_BATCH
    if b > cap:
        return f"runs batches of at most {cap} rows, got {b}"
    if packed:
        return "reads [K, N] weights, not packed ones"
    if presel or out_sel:
        return "cannot take an already-selected input (thresh=None) or select its output (out_thresh)"
    return ""


def _auto(kind: str, k: int, n: int, b: int, packed: bool, presel: bool, out_sel: bool) -> str:
    """impl="auto": the kernel of an active override, else the op's measured preference, else gather, where each
    can run; the masked walk where nothing else can."""
    wanted = [_CLASSES[type(_override)]] if _override is not None else []
    wanted += [PREFERRED.get((kind, k, n, batch_bucket(b)), "gather"), "gather"]
    return next((i for i in wanted if not why_not(i, b, packed, presel, out_sel)), "masked")


def choose_impl(kind: str, k: int, n: int, b: int, impl: str = "auto", *, packed: bool = False, presel: bool = False,
                out_sel: bool = False, accum: bool = False) -> tuple[str, Config]:
    """Return which kernel runs a launch ("masked", "gather" or "oneshot") and its configuration.

    impl="auto": an `override_config`'s kernel where it can run, else the kernel measured fastest for this op
    shape and batch (`PREFERRED`), else gather, else masked (which runs anything); naming a kernel that cannot
    run the launch is an error. packed: weights from `pack_weight`; presel: the input arrives already selected
    (thresh=None); out_sel: out_thresh is given; accum: the op adds into a given fp32 tensor or reads raw gate/up
    sums (the one-shot tiles or the gather walk; "auto" means the one-shot tiles).
    """
    if impl not in ("auto",) + IMPLS:
        raise ValueError(f"impl must be 'auto', 'masked', 'gather' or 'oneshot', got {impl!r}")
    if impl == "auto" and accum:
        impl = "oneshot"
    if impl != "auto":
        reason = why_not(impl, b, packed, presel, out_sel, accum)
        if reason:
            hint = ("use impl='oneshot' or 'auto'" if accum else "use impl='masked' or 'auto'")
            raise ValueError(f"the {impl} kernel {reason}; {hint}")
    else:
        impl = _auto(kind, k, n, b, packed, presel, out_sel)
    key = (kind, k, n, batch_bucket(b))
    cfg = _override if _CLASSES.get(type(_override)) == impl else None
    if impl == "gather":
        # Adding into a given tensor (no counter, no tail) may want other tiles: its own entry where tuned.
        tuned = (TUNED_GATHER.get(("accumulate", k, n, batch_bucket(b))) if accum else None) or TUNED_GATHER.get(key)
        return "gather", cfg or tuned or default_gather(b)
    if impl == "oneshot":
        # Adding into a given tensor has its own tuned tiles (no epilogue: larger K tiles, fewer atomics pay).
        tuned = (TUNED_ONESHOT.get(("accumulate", k, n, batch_bucket(b))) if accum else None) or TUNED_ONESHOT.get(key)
        return "oneshot", cfg or tuned or OneshotConfig()
    return "masked", cfg or TUNED_MASKED.get(key) or default_masked(kind, b)


# torch dtype -> Triton dtype, for kernels that round to a dtype given as a constexpr
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

MAX_TILES = 1 << 16
MAX_ACC = 1 << 20   # fp32 accumulators for the atomic split-K reduction: nacc × batch × N of one launch
_zeroed: dict[tuple[str, torch.device], torch.Tensor] = {}


def _self_zeroing(what: str, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-device buffer zeroed once at creation: the kernels leave it zero after every launch (the last
    program of a tile resets its part), so no launch ever zeroes it again. Fixed size: a CUDA graph keeps the
    address it captured, so it must exist before capture."""
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" name one buffer
        device = torch.device("cuda", torch.cuda.current_device())
    buf = _zeroed.get((what, device))
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"actsparse kernels: run each op once before CUDA-graph capture "
                               f"(its {what} are allocated on first use)")
        buf = _zeroed[(what, device)] = torch.zeros(size, dtype=dtype, device=device)
    return buf


def tile_counters(device: torch.device) -> torch.Tensor:
    """Return the device's arrival counters (int32, one per output tile); the last program of a tile resets
    its counter."""
    return _self_zeroing("tile counters", MAX_TILES, torch.int32, device)


def claim_counters(device: torch.device, programs: int, slots: int) -> torch.Tensor:
    """Return the claim and ready counters (int64 [2], zeroed once) of fused gather launches with this many
    programs and lists: they only grow, by exactly programs + slots and slots per launch, so launches of one
    shape share them and none resets them (see gather_gemv._claim_and_compact). One stream at a time per device,
    as for the tile counters."""
    return _self_zeroing(f"claim counters {programs}x{slots}", 2, torch.int64, device)


def atomic_accumulator(device: torch.device) -> torch.Tensor:
    """Return the device's fp32 accumulators of the atomic split-K reduction; the last program of a tile reads
    its sums and zeroes them."""
    return _self_zeroing("split-K accumulators", MAX_ACC, torch.float32, device)


# kernel name -> resources of its most recent launch (registers and spills per thread, shared memory
# per program, warps), read from the compiled kernel; the tuning sweep logs them next to the times.
COMPILED: dict[str, dict] = {}


_RECORDED: dict[str, object] = {}  # name -> the compiled kernel COMPILED describes (re-read only when it changes)


def record_compiled(kernel: str, compiled, k: int, n: int, pair: bool) -> None:
    """Remember a launch's compiled-kernel resources under "kernel[KxN]" ("x2" for a gate/up pair); nothing
    under the interpreter, which compiles nothing."""
    n_regs = getattr(compiled, "n_regs", None)
    if n_regs is None:
        return
    md = getattr(compiled, "metadata", None)
    name = f"{kernel}[{k}x{n}{'x2' if pair else ''}]"
    if _RECORDED.get(name) is compiled:
        return
    _RECORDED[name] = compiled
    # The atomic instructions as compiled (vector or scalar fp32 adds, fences): what each program's sums cost.
    ptx = (getattr(compiled, "asm", None) or {}).get("ptx", "")
    atomics = collections.Counter(re.findall(r"\b(?:atom|red)(?:\.[a-z0-9_]+)+", ptx if isinstance(ptx, str) else ""))
    COMPILED[name] = {
        "regs": int(n_regs), "spills": int(getattr(compiled, "n_spills", 0)), "shared": int(getattr(md, "shared", 0)),
        "warps": int(getattr(md, "num_warps", 0)), "atomics": dict(atomics)}


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
