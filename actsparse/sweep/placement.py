"""How many GPUs each cell gets: its memory estimate (models/footprint.py) against one GPU's memory, decided from
the configuration before any model loads or Ray starts.

A cell's GPUs are its model worker's Ray resource request (`num_gpus`); Ray grants one request on one node, so a
worker's GPUs are always GPUs of one node. With `launcher.gpus_per_cell=auto` a GPU cell asks for the stage
request (launcher.calibrate/evaluate.num_gpus) when its estimate fits in it, else for ceil(peak / usable GPU
memory) GPUs, rounded up to a divisor of the model's key-value heads when the cell measures decode speed (a
tensor-parallel engine splits those heads evenly). The workers of one model ask for the most any of its cells
needs. A cell that needs more GPUs than a node has is refused with the figures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ActsparseError
from ..models.footprint import MemoryEstimate, estimate_memory, load_dtype, model_shape
from .cells import Cell

USABLE = 0.9    # of each GPU's memory: the rest is the CUDA context, allocator fragmentation, NCCL buffers


@dataclass(frozen=True)
class CellGpus:
    """One cell's memory estimate (None when its model's config could not be read) and its GPU request."""
    estimate: MemoryEstimate | None
    gpus: float
    why: str


@dataclass
class Placement:
    """Every cell's GPUs, the GPUs of each model's workers, and the figures they come from."""
    cells: dict[str, CellGpus] = field(default_factory=dict)       # cell key ->
    model_gpus: dict[str, float] = field(default_factory=dict)     # model key -> GPUs per model worker
    gpu_gb: float | None = None
    gpu_source: str = ""
    node_gpus: int | None = None
    node_source: str = ""
    notes: list[str] = field(default_factory=list)

    def header(self) -> str:
        """`GPUs: 85.0 GB each (torch.cuda), 8 per node (ray.num_gpus); a cell plans on 90% of each`."""
        mem = f"{self.gpu_gb:.1f} GB each ({self.gpu_source})" if self.gpu_gb else f"memory unknown ({self.gpu_source})"
        node = f"{self.node_gpus} per node ({self.node_source})" if self.node_gpus is not None else self.node_source
        return f"GPUs: {mem}, {node}; a cell plans on {USABLE:.0%} of each"

    def line(self, key: str) -> str:
        """`memory 142.6 GB = 141.1 weights + 1.5 evaluation; 2 GPUs (...)` for one cell."""
        c = self.cells[key]
        mem = c.estimate.describe() if c.estimate is not None else "unknown"
        return f"memory {mem}; {c.gpus:g} GPU(s) ({c.why})"


def gpu_memory_gb(launcher: dict) -> tuple[float | None, str]:
    """(memory of one GPU in GB, where the figure comes from): launcher.gpu_memory_gb, else torch.cuda."""
    if launcher.get("gpu_memory_gb") is not None:
        return float(launcher["gpu_memory_gb"]), "launcher.gpu_memory_gb"
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        return min(p.total_memory for p in props) / 1e9, f"torch.cuda: {props[0].name}"
    return None, "no CUDA device here; set launcher.gpu_memory_gb"


def gpus_per_node(ray_conf: dict) -> tuple[int | None, str]:
    """(GPUs of one node, where the figure comes from); None on a cluster joined by address (Ray checks there)."""
    if ray_conf["address"] not in (None, "", "local"):
        return None, "GPUs per node: checked when Ray connects"
    if ray_conf.get("num_gpus") is not None:
        return int(ray_conf["num_gpus"]), "ray.num_gpus"
    import torch

    return (torch.cuda.device_count() if torch.cuda.is_available() else 0), "this machine's CUDA devices"


def place(cells: list[Cell], launcher: dict, ray_conf: dict, every: bool = False) -> Placement:
    """Each cell's GPU request, and the estimate of each GPU cell (every: of CPU cells too, as --dry-run prints
    them); raise ActsparseError naming the figures when a cell fits no node."""
    check_gpus_per_cell(launcher)
    base = max(launcher["calibrate"]["num_gpus"], launcher["evaluate"]["num_gpus"])
    fixed = launcher.get("gpus_per_cell", "auto")
    pl = Placement()
    pl.gpu_gb, pl.gpu_source = gpu_memory_gb(launcher)
    pl.node_gpus, pl.node_source = gpus_per_node(ray_conf)
    usable = USABLE * pl.gpu_gb * 1e9 if pl.gpu_gb else None
    shapes: dict[tuple, object] = {}
    need: dict[str, Cell] = {}
    for c in cells:
        on_gpu = c.device.startswith("cuda") or (c.device == "auto" and base > 0)
        est = _estimate(c, on_gpu, shapes) if on_gpu or every else None
        if not on_gpu:
            g, why = base, "CPU cell"     # its memory is the machine's: no request follows from it
        elif str(fixed) != "auto":
            g, why = int(fixed), "launcher.gpus_per_cell"
            if est is not None and usable and est.peak > g * usable:
                pl.notes.append(f"note: {c.label} is estimated at {est.peak / 1e9:.1f} GB, more than the "
                                f"{g * usable / 1e9:.1f} GB usable on launcher.gpus_per_cell={g} GPU(s); it may run "
                                "out of memory (launcher.gpus_per_cell=auto sizes it)")
        elif est is None or usable is None:
            g = base
            why = "no estimate: the model's config could not be read" if est is None else \
                "the stage request: per-GPU memory unknown, set launcher.gpu_memory_gb"
        elif est.peak <= base * usable:
            g, why = base, f"auto: fits {base:g} GPU(s) of {usable / 1e9:.1f} GB usable"
        else:
            g = _tensor_parallel(math.ceil(est.peak / usable), shapes[_shape_key(c)], c.eval.has("speed"))
            why = f"auto: {est.peak / 1e9:.1f} GB over {usable / 1e9:.1f} GB usable per GPU"
        pl.cells[c.key] = CellGpus(est, g, why)
        m = c.plan.model.key
        if g > pl.model_gpus.get(m, -1):
            pl.model_gpus[m], need[m] = g, c
    too_big = [c for m, c in need.items() if pl.node_gpus is not None and pl.model_gpus[m] > pl.node_gpus
               and (pl.gpu_gb is not None or pl.model_gpus[m] != base)]
    if too_big:
        raise ActsparseError("\n".join(_refusal(c, pl) for c in too_big))
    return pl


def check_gpus_per_cell(launcher: dict) -> None:
    """Raise ActsparseError unless launcher.gpus_per_cell is auto or a positive integer, and gpu_memory_gb > 0."""
    v = str(launcher.get("gpus_per_cell", "auto"))
    if v != "auto" and not (v.isdigit() and int(v) >= 1):
        raise ActsparseError(f"launcher.gpus_per_cell must be auto or an integer >= 1, got {v!r}")
    mem = launcher.get("gpu_memory_gb")
    if mem is not None and not mem > 0:
        raise ActsparseError(f"launcher.gpu_memory_gb must be > 0 (GB of one GPU) or null (ask torch.cuda), got {mem}")


def _refusal(c: Cell, pl: Placement) -> str:
    g, est = pl.cells[c.key].gpus, pl.cells[c.key].estimate
    mem = (f"its estimate {est.describe()} over {USABLE:.0%} of {pl.gpu_gb:.1f} GB per GPU ({pl.gpu_source})"
           if est is not None and pl.gpu_gb else pl.cells[c.key].why)
    smaller = "model.dtype=bfloat16, " if est is not None and est.dtype == "float32" else ""
    return (f"cell {c.label} needs {g:g} GPUs of one node: {mem}; but a node has {pl.node_gpus} GPU(s) "
            f"({pl.node_source}). Run it where one node has {g:g} GPUs (a larger machine, or launcher=cluster with "
            f"such a node), or lower its memory ({smaller}smaller data.batch_size / eval.batch_size)")


def _shape_key(c: Cell) -> tuple:
    return (c.plan.model.name, c.plan.model.revision)


def _estimate(c: Cell, on_gpu: bool, shapes: dict) -> MemoryEstimate | None:
    """The cell's memory estimate, or None when its model's config cannot be read without loading it."""
    from ..models.load import resolve_model_source

    k, m = _shape_key(c), c.plan.model
    if k not in shapes:
        try:
            src = resolve_model_source(m.name)
            shapes[k] = model_shape(src.path, local=src.kind != "hub")
        except Exception:      # a hub model offline, a config transformers does not know: no estimate
            shapes[k] = None
    s = shapes[k]
    if s is None:
        return None
    batches = [c.eval.batch_size, *(v["batch_size"] for n, v in c.eval.settings.items()
                                     if n != "speed" and "batch_size" in v)]
    sp = c.eval.settings.get("speed") if c.eval.has("speed") else None
    calib = (c.stats.batch_size, c.stats.seq_len, c.stats.sample_size)
    return estimate_memory(s, load_dtype(m.dtype, s, on_gpu), calib, (max(batches), c.eval.seq_len),
                           (sp["batch"], sp["prompt_len"], sp["n_tokens"]) if sp is not None else None)


def _tensor_parallel(n: int, shape, speed: bool) -> int:
    """n, or for a cell that measures decode speed the smallest divisor of the key-value heads >= n."""
    if not speed or n <= 1 or not shape.kv_heads:
        return n
    return next((d for d in range(n, shape.kv_heads + 1) if shape.kv_heads % d == 0), n)
