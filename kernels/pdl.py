"""Programmatic dependent launch (PDL, compute capability 9.0 and newer): a kernel is scheduled while its
predecessor finishes, so a boundary between two dependent launches costs less than a full drain and launch.

A decode step is a chain of short dependent launches (per block: the norm pre-passes or compaction passes, q|k|v,
attention, o, gate|up, down). With PDL (a launch attribute, Triton's `launch_pdl=True`) the next grid is
scheduled as soon as every program of the running one has signalled `gdc_launch_dependents`; its programs then
wait in `gdc_wait` until the predecessor has completed and its writes are visible.

The rule that keeps this race-free: every kernel launched with PDL runs `pdl_prologue(PDL)` as its first
statement, in every program, before it touches global memory. `gdc_wait` returns only once the whole previous
grid has completed, and that grid passed its own wait before completing, so completion is transitive: a kernel
may read what any earlier kernel of the stream wrote, and may overwrite what any earlier kernel read. Launches
without PDL (cuBLAS, torch ops) wait for the full previous grid as usual, and a PDL launch after one starts when
it completes (the implicit trigger at its end), so mixing them is safe. `benchmarks/launch_gap.py` is the race
test of the mechanism (a chain of dependent kernels whose count is exact only without a race); the kernels' GPU
tests run under it.

On by default where it can run (CUDA, compute capability ≥ 9, compiled Triton with the `gdc_*` intrinsics):
measured on an H100, it took a Llama-3-8B block from 125.5 / 105.4 to 123.5 / 103.3 µs at 25 / 50% sparsity and
decode from 1.29 / 1.51× to 1.31 / 1.55× over the dense engine, with every kernel and engine GPU test passing
under it. `ACTSPARSE_PDL=0` or `use_pdl(False)` turns it off. Launches captured into a CUDA graph keep the
setting they were captured with (`Engine.reset_graphs` recaptures).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import triton
import triton.language as tl

_enabled = os.environ.get("ACTSPARSE_PDL", "1").strip().lower() not in ("0", "false", "off", "no")
_capable: dict[int, bool] = {}


def _gdc_available() -> bool:
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return True


def pdl_enabled(device: torch.device) -> bool:
    """True when kernel launches on `device` use programmatic dependent launch (see the module docstring)."""
    if not _enabled or device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _capable:
        _capable[idx] = torch.cuda.get_device_capability(idx)[0] >= 9 and _gdc_available()
    return _capable[idx]


def pdl_args(device: torch.device) -> dict:
    """The launch arguments of a kernel that starts with `pdl_prologue`: its PDL flag, and Triton's launch option
    where it is on."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"PDL": False}


@contextlib.contextmanager
def use_pdl(enabled: bool = True) -> Iterator[None]:
    """Inside the block, kernels launch with (True) or without (False) PDL where the device supports it."""
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = old


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """A PDL kernel's first statement: wait for the previous grid, then let the next one be scheduled."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
