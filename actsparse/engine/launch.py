"""Run a function on W processes of this machine, one rank each, in one torch.distributed group (for the
tensor-parallel engine's tests and benchmarks).

    from actsparse.engine.launch import run_ranks
    results = run_ranks(fn, 2, *args)     # fn(rank, world_size, *args) on each rank; its returns, by rank

Backend "nccl" when CUDA is present, else "gloo". Over NCCL rank r runs on GPU r (its current CUDA device, where
`device="cuda"` puts tensors), so W ranks need W GPUs: NCCL refuses two ranks on one GPU. fn must be importable by
the spawned processes (a module-level function), and so must what it returns.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, fn: Callable, world_size: int, args: tuple, backend: str, rdzv: str, out: str) -> None:
    """One spawned rank: join the group, run fn, save what it returns to out/<rank>.pt, leave the group."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{rdzv}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args, backend: Optional[str] = None) -> list[Any]:
    """Return [fn(rank, world_size, *args) for each rank], each run in its own spawned process, all of them
    one process group (over NCCL, rank r on GPU r); a rank's exception is raised here (torch.multiprocessing's
    ProcessRaisedException)."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and world_size > (gpus := torch.cuda.device_count()):
        fits = f"world_size <= {gpus}, or " if gpus else ""
        raise ValueError(f"NCCL runs rank r on GPU r: world_size {world_size} needs {world_size} GPUs, {gpus} "
                         f"present; use {fits}backend='gloo' with CPU tensors")
    with tempfile.TemporaryDirectory(prefix="actsparse_tp_") as tmp:
        rdzv = os.path.join(tmp, "rendezvous")
        mp.spawn(_rank_main, args=(fn, world_size, args, backend, rdzv, tmp), nprocs=world_size, join=True)
        return [torch.load(Path(tmp) / f"{r}.pt", weights_only=False) for r in range(world_size)]
