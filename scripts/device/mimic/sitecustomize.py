"""Make a local Python see only what the GPU device machine has: put this folder first on PYTHONPATH and every
import of a distribution outside scripts/device/device_packages.txt (and what the local versions of those need),
the package itself and DEVICE_MIMIC_CARRY (comma-separated distribution names: what a call carries) fails with
ModuleNotFoundError, each name logged once to DEVICE_MIMIC_LOG (default /tmp/device_mimic.log). How
build_wheelhouse.sh's house was checked to hold everything a sweep imports:

    PYTHONPATH=scripts/device/mimic DEVICE_MIMIC_CARRY=ray,mlflow-skinny,... .venv/bin/actsparse sweep ...

Ray's workers inherit PYTHONPATH, so they are held to the same set.
"""

import importlib.abc
import importlib.metadata as md
import os
import re
import sys


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed() -> set[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "device_packages.txt")) as f:
        names = {_norm(line.strip()) for line in f if line.strip() and not line.startswith("#")}
    names |= {_norm(n) for n in os.environ.get("DEVICE_MIMIC_CARRY", "").split(",") if n.strip()}
    todo = list(names)  # the device has its own versions' dependencies: allow what the local versions need
    while todo:
        try:
            reqs = md.requires(todo.pop()) or []
        except md.PackageNotFoundError:
            continue
        for r in reqs:
            if "extra ==" in r:
                continue
            n = _norm(re.split(r"[\s;<>=!~\[(]", r.strip(), maxsplit=1)[0])
            if n not in names:
                names.add(n)
                todo.append(n)
    return names | {"actsparse"}  # after the closure: its own dependencies are what the device lacks


class _Hide(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        allowed = _allowed()
        self.blocked = {top for top, dists in md.packages_distributions().items()
                        if top not in sys.stdlib_module_names and not any(_norm(d) in allowed for d in dists)}
        self.logged: set[str] = set()

    def find_spec(self, name, path, target=None):
        top = name.partition(".")[0]
        if top not in self.blocked:
            return None
        if top not in self.logged:
            self.logged.add(top)
            with open(os.environ.get("DEVICE_MIMIC_LOG", "/tmp/device_mimic.log"), "a") as f:
                f.write(f"{os.getpid()} {top}\n")
        raise ModuleNotFoundError(f"{name} is not on the GPU device machine (scripts/device/mimic)", name=name)


sys.meta_path.insert(0, _Hide())
