"""Programmatic dependent launch (PDL, Hopper and newer): a kernel starts while its predecessor finishes.

Under a CUDA graph a decode step is a chain of small dependent launches (per block: the compaction pass
and the walk of q|k|v, o, gate|up and down, and attention). Without PDL each launch begins only after
the previous grid has drained and flushed: the SMs idle for the launch latency plus the new kernel's
ramp, ~2-3 µs a boundary. With PDL (a launch attribute; `launch_pdl=True` in Triton) the next grid is
scheduled as soon as every program of the running one has signalled `gdc_launch_dependents`; its
programs then park in `gdc_wait` until the predecessor has completed and its writes are visible.

The rule that keeps this correct: every kernel launched with PDL calls `pdl_prologue(True)` first, in
every program, before touching global memory. `gdc_wait` returns only when the whole previous grid has
completed, and that grid itself passed its own wait before completing, so completion is transitive:
a kernel may read what any earlier kernel of the stream wrote. Kernels launched without PDL (cuBLAS,
torch ops) wait for the full previous grid as usual, and a PDL launch after one of them starts only
when it completes (an implicit trigger at its end). So mixing them is safe.

Opt-in for now: `ACTSPARSE_PDL=1` or `use_pdl(True)` turns it on where it works (CUDA, compute
capability ≥ 9, compiled Triton whose launcher takes `launch_pdl`). It was written in a session whose
device loans were paused, so neither its gain nor its correctness under graph capture has been measured
on a GPU yet; `tests/kernels/test_pdl.py` (GPU tests) and `bench_kernels.py --impls v2,v6,v6-pdl
--profile` check both, and the default should follow what they show.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import triton
import triton.language as tl

_enabled = os.environ.get("ACTSPARSE_PDL", "0").strip().lower() in ("1", "true", "on", "yes")
_capable: dict[int, bool] = {}


def _gdc_available() -> bool:
    """The installed Triton has the in-kernel calls and the launch option (Triton ≥ 3.3 for NVIDIA)."""
    try:
        import dataclasses

        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return any(f.name == "launch_pdl" for f in dataclasses.fields(CUDAOptions))


def pdl_enabled(device: torch.device) -> bool:
    """True when launches on `device` use programmatic dependent launch (see the module docstring)."""
    if not _enabled or device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _capable:
        _capable[idx] = torch.cuda.get_device_capability(idx)[0] >= 9 and _gdc_available()
    return _capable[idx]


def launch_kwargs(device: torch.device) -> dict:
    """Extra launch arguments of a kernel that starts with `pdl_prologue`: its PDL flag and Triton's option."""
    on = pdl_enabled(device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


@contextlib.contextmanager
def use_pdl(enabled: bool = True) -> Iterator[None]:
    """Inside the block, kernels launch with (True) or without (False) PDL where the device supports it.

    Launches captured into a CUDA graph keep the setting they were captured with."""
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = old


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """First statement of a PDL kernel: wait for the previous grid, then let the next one be scheduled."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
