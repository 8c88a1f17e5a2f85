"""Real servers for the many-machines tests, each in its own process group: a multi-raylet Ray cluster
(ray.cluster_utils.Cluster) and an `mlflow server` on 127.0.0.1 with served artifacts.

    python -m tests.orchestration.servers ray-cluster N   # prints {"address": ...}, runs until stdin closes
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a server we started (its whole process group), gently first."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextmanager
def mlflow_server(root: Path, timeout: float = 120):
    """Yield a function returning the URI of a real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts served
    from root/artifacts) once it answers; the server starts at once, so other servers can start meanwhile."""
    port = free_port()
    log = open(root / "mlflow_server.log", "w")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts"),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout

    def ready() -> str:
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return uri
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up: {(root / 'mlflow_server.log').read_text()[-2000:]}")
            time.sleep(0.5)

    try:
        yield ready
    finally:
        _stop(proc)
        log.close()


@contextmanager
def ray_cluster(n_workers: int, timeout: float = 180):
    """Yield the GCS address of a real Ray cluster: a head with no CPUs and n_workers raylets of 1 CPU each."""
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    # Ray gives up on a node whose raylet has not registered with the GCS within a fixed 30 s ("timed out during
    # startup"), which a loaded 2-core machine can cause (seen twice in a row there): such a start is tried up to
    # four times, a few seconds apart; any other death is the test's failure.
    attempts = 4
    for attempt in range(1, attempts + 1):
        proc = subprocess.Popen([sys.executable, "-m", "tests.orchestration.servers", "ray-cluster", str(n_workers)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=REPO, env=env, start_new_session=True)
        line = proc.stdout.readline()   # blocks until the cluster is up (or the helper died)
        if line:
            break
        err = proc.stderr.read()[-3000:]
        _stop(proc)
        try:                            # what the dead helper started (GCS, raylets) goes with it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if attempt == attempts or "timed out during startup" not in err:
            raise RuntimeError(f"ray cluster helper died: {err}")
        time.sleep(5 * attempt)
    try:
        yield json.loads(line)["address"]
    finally:
        try:
            proc.stdin.close()          # the helper shuts the cluster down when stdin closes
            proc.wait(60)
        except (subprocess.TimeoutExpired, OSError):
            pass
        _stop(proc)


def _serve_ray_cluster(n_workers: int) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(n_workers):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address}), flush=True)
    sys.stdin.read()                    # until the test closes our stdin
    cluster.shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] == ["ray-cluster"]:
        _serve_ray_cluster(int(sys.argv[2]))
