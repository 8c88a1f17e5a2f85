"""A documented test hook that injects faults into sweep nodes, so fault handling is tested for real on CPU.

Set `ACTSPARSE_INJECT_FAULTS` to a JSON object in the environment of the process that runs the sweep
(the driver reads it and ships it with each node, so Ray workers need not inherit it):

    {"oom":  [{"stage": "cell", "match": "teal s=0.6", "times": 1}],
     "hold": [{"stage": "cell", "match": "teal s=0.3", "pidfile": "/tmp/hold.pid", "seconds": 120}],
     "raise": [{"stage": "calibrate", "type": "ImportError", "message": "cannot import name 'X' from 'y'"}]}

- `oom`: the node's calibration or perplexity call (calibrate, dense or cell) raises a real
  `torch.OutOfMemoryError` on its first `times` calls in that task, as a GPU that runs out of memory
  would, so the retry with a smaller batch runs exactly as it does on a GPU.
- `hold`: on its first attempt the node writes its worker's process id to `pidfile` and sleeps up to
  `seconds` before doing its work, so a test can SIGKILL that worker mid-node (or Ctrl-C the sweep)
  at a known point; a retry finds the pidfile and does not hold again.

- `raise`: the node raises the named built-in exception with that message, as a broken install would; stage
  `worker` raises it while a model worker starts (the affinity launcher's actors), before it runs any node.

`stage` is `calibrate`, `fit`, `dense`, `cell` (or `worker`, for `raise`); `match` (optional) is a substring of the node's label
(the cell label, e.g. `tiny-llama teal s=0.5`, or the model name for calibrate/dense). Unset: no faults.
"""
from __future__ import annotations

import builtins
import json
import os
import time
from pathlib import Path

from ..errors import ActsparseError

ENV = "ACTSPARSE_INJECT_FAULTS"
_KINDS = {"oom", "hold", "raise"}
STAGES = ("calibrate", "fit", "dense", "cell", "worker")


def from_env() -> dict:
    """Return the faults asked for in ACTSPARSE_INJECT_FAULTS ({} when unset); raise ActsparseError when malformed."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return {}
    try:
        faults = json.loads(text)
    except json.JSONDecodeError as e:
        raise ActsparseError(f"{ENV} must be a JSON object, got {text[:80]!r}: {e}") from e
    if not isinstance(faults, dict) or set(faults) - _KINDS:
        raise ActsparseError(f"{ENV} must be a JSON object with keys among {sorted(_KINDS)}, got {text[:80]!r}")
    for kind, specs in faults.items():
        if not isinstance(specs, list) or not all(isinstance(s, dict) and s.get("stage") in STAGES for s in specs):
            raise ActsparseError(f"{ENV}: {kind!r} must be a list of objects with stage in {list(STAGES)}")
    for s in faults.get("raise", []):
        exc = getattr(builtins, str(s.get("type")), None)
        if not (isinstance(exc, type) and issubclass(exc, Exception)):
            raise ActsparseError(f"{ENV}: 'raise' needs type = a built-in exception name (e.g. ImportError), "
                                 f"got {s.get('type')!r}")
    return faults


def raise_now(spec: dict | None) -> None:
    """Raise the built-in exception a `raise` fault names, with its message (see module doc)."""
    if spec:
        raise getattr(builtins, spec["type"])(spec.get("message", "injected fault"))


def select(faults: dict, stage: str, label: str) -> dict:
    """Return {kind: spec} of the faults that apply to one node (the first matching spec of each kind)."""
    out = {}
    for kind, specs in (faults or {}).items():
        for s in specs:
            if s["stage"] == stage and str(s.get("match", "")) in label:
                out[kind] = s
                break
    return out


def hold(spec: dict | None) -> None:
    """On a node's first attempt, write this process's id to spec['pidfile'] and sleep (see module doc)."""
    if not spec:
        return
    pidfile = Path(spec["pidfile"])
    try:
        fd = os.open(pidfile, os.O_CREAT | os.O_EXCL | os.O_WRONLY)   # exclusive: only the first attempt holds
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + float(spec.get("seconds", 120))
    while time.monotonic() < deadline and pidfile.exists():           # removing the file releases the hold
        time.sleep(0.05)


class OomInjector:
    """Wraps a batch function: its first `times` calls raise torch.OutOfMemoryError (spec None: never)."""

    def __init__(self, spec: dict | None):
        self.left = int(spec.get("times", 1)) if spec else 0

    def __call__(self, fn):
        def wrapped(*args, **kwargs):
            if self.left > 0:
                import torch

                self.left -= 1
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {ENV})")
            return fn(*args, **kwargs)
        return wrapped
