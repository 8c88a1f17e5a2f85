"""The sweep's Ray session: start the embedded cluster (or connect to one), check that it can run what the
launcher asks for, and stop what this process started."""
from __future__ import annotations

import os
import time

from ..errors import ActsparseError


def start_ray(launcher: dict, console) -> bool:
    """Connect to Ray (reusing an initialised session); return True when this call started it."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    # the embedded cluster's token authentication is on by design; its notice on every start is noise
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    r = launcher["ray"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    kw = dict(include_dashboard=False, log_to_driver=r["log_to_driver"], logging_level=logging.WARNING)
    t0 = time.perf_counter()
    local = r["address"] in (None, "", "local")
    try:
        if local:  # num_cpus None: Ray counts the cores this process may use (cgroup limits included)
            ray.init(address="local", num_cpus=r["num_cpus"], num_gpus=r["num_gpus"], **kw)
        else:
            ray.init(address=r["address"], log_to_driver=r["log_to_driver"], logging_level=logging.WARNING)
    except Exception as e:
        raise ActsparseError(f"cannot {'start a local Ray cluster' if local else 'connect to Ray at ' + repr(r['address'])}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; check ray.address "
                             "(null for an embedded cluster, auto or host:port for a running one)") from e
    res = ray.cluster_resources()
    console.print(f"ray: {'local cluster' if local else 'connected to ' + r['address']} with "
                  f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs ({time.perf_counter() - t0:.1f} s)")
    return True


def stop_ray(started: bool) -> None:
    """Shut Ray down if start_ray started it (a session the caller had initialised is left running)."""
    if started:
        import ray

        ray.shutdown()


def check_resources(launcher: dict, console) -> None:
    """Raise ActsparseError when no Ray node can run a stage's resource request (it would wait forever).

    On a cluster joined by address the autoscaler may still add such a node: there it is a warning.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes) or "none"
    asks = {s: launcher[s] for s in ("calibrate", "fit", "evaluate")}
    if launcher["affinity"]:  # one actor runs calibrations and evaluations: it asks for the larger of the two
        asks["calibrate/evaluate worker"] = {r: max(launcher["calibrate"][r], launcher["evaluate"][r])
                                             for r in ("num_cpus", "num_gpus")}
    model_gpus = max(launcher.get("model_gpus", {}).values(), default=0)
    if model_gpus > max(launcher["calibrate"]["num_gpus"], launcher["evaluate"]["num_gpus"]):
        asks["cell"] = {"num_cpus": max(launcher["calibrate"]["num_cpus"], launcher["evaluate"]["num_cpus"]),
                        "num_gpus": model_gpus}
    for stage, ask in asks.items():
        if not any(r.get("CPU", 0) >= ask["num_cpus"] and r.get("GPU", 0) >= ask["num_gpus"] for r in nodes):
            where = {"cell": "the largest cell (its memory estimate, launcher.gpus_per_cell; see --dry-run)",
                     "calibrate/evaluate worker": "launcher.calibrate/evaluate"}.get(stage, f"launcher.{stage}")
            msg = (f"{where} asks for {ask['num_cpus']:g} CPU(s) and {ask['num_gpus']:g} GPU(s) per task, but no "
                   f"node of the Ray cluster has that much (nodes: {have}); on a CPU-only machine use "
                   "launcher=local (no GPU request), else lower launcher.*.num_gpus / num_cpus or add nodes")
            if launcher["ray"]["address"] in (None, "", "local"):
                raise ActsparseError(msg)
            console.print(f"[yellow]warning:[/] {msg} (waiting for the cluster to grow)")
            return
