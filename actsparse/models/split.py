"""One model over several devices: whole transformer blocks per device, in order, and inputs moved where they run.

A model larger than one GPU runs split by layers (pipeline stages without overlap): the embeddings, the final
norm and the LM head stay on the first device, the blocks go to the devices in contiguous runs, and a forward
pre-hook on each placed module moves its tensor arguments to that module's device. Nothing else changes: the
sparsifiers' hooks, calibration probes and fits see each block's tensors on the block's own device (every rule
already moves its tensors to its input's device), and the logits come back on the first device, where the
token ids are, so perplexity, lm-eval and the fits' losses run unchanged.

Weights are real tensors on their device (no offloading to host memory and no copies on each forward), so a
method that reads or rewrites a weight reads it where it lives. A device may be "cpu": one GPU plus host memory
runs a model the GPU alone cannot hold (slowly, at the CPU's speed for the blocks it holds).

Blocks are assigned by their parameter bytes: with `max_memory` each device takes blocks in order until its
budget is full; without it the bytes are balanced across the devices. Decode speed needs the tensor-parallel
engine, not this split; `is_split` tells the speed measure to refuse a split model.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import ActsparseError
from .sites import _layer_list

_UNITS = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_devices(device) -> list[str] | None:
    """The devices of a split ("cuda:0,cuda:1" or a list of two or more), or None for one device."""
    if isinstance(device, str):
        if "," not in device:
            return None
        device = [d.strip() for d in device.split(",")]
    elif isinstance(device, torch.device) or device is None:
        return None
    devs = [str(torch.device(d)) if _valid(d) else d for d in device]
    bad = [d for d in devs if not _valid(d)]
    if bad:
        raise ActsparseError(f"unknown device(s) {bad} in {list(device)}; use names like 'cuda:0', 'cuda:1', 'cpu'")
    if len(devs) < 2:
        return None
    if len(set(devs)) != len(devs):
        raise ActsparseError(f"a split names each device once, got {devs}")
    return devs


def _valid(d) -> bool:
    try:
        torch.device(d)
        return True
    except (RuntimeError, TypeError):
        return False


def parse_bytes(v) -> int:
    """Bytes from an int or a string like '20GB', '1.5GiB', '800MB'."""
    if isinstance(v, bool):
        raise ActsparseError(f"a memory size must be a number of bytes or a string like '20GB', got {v!r}")
    if isinstance(v, (int, float)):
        if v <= 0:
            raise ActsparseError(f"a memory size must be positive, got {v!r}")
        return int(v)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(v))
    unit = m.group(2).lower() if m else ""
    if not m or (unit and unit not in _UNITS) or float(m.group(1)) <= 0:
        raise ActsparseError(f"a memory size must be a positive number of bytes or a string like '20GB' "
                             f"(units {', '.join(sorted(_UNITS))}), got {v!r}")
    return int(float(m.group(1)) * _UNITS.get(unit, 1))


def _bytes(module: nn.Module, seen: set[int]) -> int:
    """Parameter and buffer bytes of `module` not already counted (tied weights count once)."""
    n = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def units(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """(blocks, the rest): the block list's blocks by name, and every other module that holds weights or takes
    inputs at the top of the model (embeddings, rotary embedding, final norm, LM head), by name."""
    list_name, layers = _layer_list(model)
    blocks = [(f"{list_name}.{i}", b) for i, b in enumerate(layers)]
    rest: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, mod: nn.Module) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}{name}"
            if full == list_name:
                continue
            if list_name.startswith(full + "."):
                walk(full + ".", child)
            else:
                rest.append((full, child))
    walk("", model)
    return blocks, rest


def plan_split(model: nn.Module, devices: Sequence[str], max_memory: Mapping[str, object] | None = None
               ) -> dict[str, str]:
    """Module name -> device: the non-block modules on devices[0], the blocks in contiguous runs by their bytes.

    Raises ActsparseError naming the figures when `max_memory` cannot hold the model.
    """
    devices = list(devices)
    blocks, rest = units(model)
    seen: set[int] = set()
    rest_bytes = sum(_bytes(m, seen) for _, m in rest)
    sizes = [_bytes(b, seen) for _, b in blocks]
    total = rest_bytes + sum(sizes)
    if max_memory is not None:
        unknown = [d for d in max_memory if str(d) not in devices]
        if unknown:
            raise ActsparseError(f"max_memory names device(s) {unknown} that are not among the split's {devices}")
        budget = {d: parse_bytes(max_memory[d]) if d in max_memory else None for d in devices}
    else:
        budget = {d: None for d in devices}
    if max_memory is None or any(v is None for v in budget.values()):
        # balance: each device without a budget takes an equal share of what the budgeted ones leave
        free = [d for d in devices if budget[d] is None]
        fixed = sum(v for v in budget.values() if v is not None)
        share = max(total - fixed, 0) / len(free) if free else 0
        for d in free:
            budget[d] = share * 1.0001 + 1
    plan = {name: devices[0] for name, _ in rest}
    used = {d: 0 for d in devices}
    used[devices[0]] = rest_bytes
    k = 0
    for (name, _), size in zip(blocks, sizes):
        while used[devices[k]] + size > budget[devices[k]] and k + 1 < len(devices):
            k += 1
        plan[name] = devices[k]
        used[devices[k]] += size
    over = {d: used[d] for d in devices if used[d] > budget[d]}
    if over and max_memory is not None and all(max_memory.get(d) is not None for d in devices):
        gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
        raise ActsparseError(
            f"the model's {gb(total)} of weights do not fit max_memory "
            f"({', '.join(f'{d}: {gb(budget[d])}' for d in devices)}): "
            f"{', '.join(f'{d} would hold {gb(u)}' for d, u in over.items())}; "
            "give more devices or a larger max_memory")
    return plan


def _move(obj, dev: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == dev else obj.to(dev, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):           # a namedtuple
        return type(obj)(*(_move(o, dev) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(o, dev) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, dev) for k, v in obj.items()}
    return obj


def _mover(dev: torch.device):
    def hook(module, args, kwargs):
        return _move(args, dev), _move(kwargs, dev)
    return hook


def split_model(model: nn.Module, devices: Sequence[str], max_memory: Mapping[str, object] | None = None
                ) -> dict[str, str]:
    """Place `model` over `devices` by `plan_split` and move each placed module's inputs to its device.

    Returns the plan (module name -> device), also kept as `model.actsparse_split`. Splitting a split model
    again first removes the earlier hooks.
    """
    devs = parse_devices(list(devices))
    if devs is None:
        raise ActsparseError(f"a split needs two or more devices, got {list(devices)}")
    for d in devs:
        if d.startswith("cuda"):
            idx = torch.device(d).index or 0
            if not torch.cuda.is_available() or idx >= torch.cuda.device_count():
                have = torch.cuda.device_count() if torch.cuda.is_available() else 0
                raise ActsparseError(f"device {d} is not here: this process sees {have} CUDA device(s)")
    plan = plan_split(model, devs, max_memory)
    for h in getattr(model, "_actsparse_split_hooks", []):
        h.remove()
    hooks = []
    mods = dict(model.named_modules())
    for name, dev in plan.items():
        mod = mods[name]
        mod.to(dev)
        hooks.append(mod.register_forward_pre_hook(_mover(torch.device(dev)), with_kwargs=True))
    model._actsparse_split_hooks = hooks
    model.actsparse_split = plan
    return plan


def is_split(model: nn.Module) -> bool:
    """True when the model's weights live on more than one device."""
    return len(set(getattr(model, "actsparse_split", {}).values())) > 1


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go in: the input embeddings' device (the first parameter's when there are none)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor):
        return w.device
    return next(model.parameters()).device
