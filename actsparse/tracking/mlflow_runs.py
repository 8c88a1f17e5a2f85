"""MLflow bookkeeping of a sweep: one parent run per sweep, one child run per cell.

Only the driver process uses this (Ray tasks return results), so a run is written by one process,
from creation to termination, and a cell whose run is not FINISHED is simply run again.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..errors import ActsparseError

KIND_TAG = "run_kind"          # "sweep" (parent) or "cell" (child)
# MLflow 3's UI picks an experiment's landing page by this tag; without it an experiment may open on the GenAI
# overview (traces), which shows nothing of a sweep. custom_model_development opens the runs table.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
_MAX_PARAM = 6000              # MLflow's limit on a param value


def quiet_mlflow() -> None:
    """Silence MLflow's and alembic's INFO chatter (database creation, migrations, a run link per run on a server)."""
    import os

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the summary line says where runs are
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def default_artifact_location(uri: str) -> str | None:
    """For a sqlite store, mlartifacts/ beside the database file (absolute); else the server decides."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).expanduser()
        return str((db.resolve().parent / "mlartifacts").resolve())
    return None


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Return a nested config as {dotted.key: string value} (lists as JSON)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            s = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
            out[key] = s[:_MAX_PARAM]
    return out


def runs_view(uri: str, experiment_id: str) -> str:
    """How to open the experiment's runs table in the MLflow UI: the command (for a local store) and the URL."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"mlflow ui --backend-store-uri {uri}  then  http://127.0.0.1:5000/#/experiments/{experiment_id}/runs"


class Tracker:
    """An MLflow experiment seen through MlflowClient (no global mlflow state)."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None):
        from mlflow import MlflowClient

        quiet_mlflow()  # after the import: importing mlflow configures its loggers

        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                loc = artifact_location or default_artifact_location(uri)
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=loc,
                                                                   tags=dict([EXPERIMENT_KIND]))
            else:
                self.experiment_id = exp.experiment_id
                if exp.tags.get(EXPERIMENT_KIND[0]) is None:
                    self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
        except Exception as e:  # an unreachable server or an unusable database: say which
            raise ActsparseError(f"cannot open the MLflow tracking store {uri!r} (experiment {experiment!r}): "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; check "
                                 "tracking.uri (e.g. sqlite:///mlflow.db or http://127.0.0.1:5000)") from e
        self.experiment = experiment

    # -- queries ----------------------------------------------------------------------------------------
    def finished_cells(self) -> dict[str, str]:
        """Return {cell_key: run_id} of every FINISHED cell run in the experiment (the latest per key)."""
        out: dict[str, tuple[int, str]] = {}
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id],
                                           f"tags.{KIND_TAG} = 'cell' and attributes.status = 'FINISHED'",
                                           max_results=1000, page_token=token)
            for r in page:
                k = r.data.tags.get("cell_key")
                if k and (k not in out or r.info.start_time > out[k][0]):
                    out[k] = (r.info.start_time, r.info.run_id)
            token = page.token
            if not token:
                break
        return {k: v[1] for k, v in out.items()}

    # -- writing ----------------------------------------------------------------------------------------
    def start_sweep(self, sweep_id: str, name: str, params: dict, tags: dict) -> str:
        """Create the parent run of a sweep; return its run id.

        Every invocation of a sweep is one parent run (its cells.json says what that attempt ran or skipped); a
        re-run, after an interrupt or not, is numbered: `<sweep_id>`, `<sweep_id> #2`, ... (tag `attempt`)."""
        before = self.client.search_runs([self.experiment_id],
                                         f"tags.{KIND_TAG} = 'sweep' and tags.sweep_id = '{sweep_id}'",
                                         max_results=1000)
        attempt = 1 + max([int(r.data.tags.get("attempt", 1)) for r in before] or [0])
        run = self.client.create_run(self.experiment_id,
                                     run_name=sweep_id + (f" #{attempt}" if attempt > 1 else ""),
                                     tags={KIND_TAG: "sweep", "sweep_id": sweep_id, "sweep_name": name,
                                           "attempt": str(attempt),
                                           **{k: str(v) for k, v in tags.items()}})  # a server takes strings only
        self._log(run.info.run_id, params=flatten(params))
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED", metrics: dict | None = None) -> None:
        """Log final metrics and terminate a run (FINISHED, FAILED or KILLED)."""
        if metrics:
            self._log(run_id, metrics=metrics)
        self.client.set_terminated(run_id, status)

    def log_cell(self, parent: str, name: str, params: dict, metrics: dict, tags: dict, artifacts: Path | None,
                 status: str = "FINISHED", start_s: float | None = None, end_s: float | None = None) -> str:
        """Write one complete child run (params, metrics, tags, artifacts) and terminate it; return its id."""
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     start_time=int((start_s or time.time()) * 1000),
                                     tags={KIND_TAG: "cell", "mlflow.parentRunId": parent,
                                           **{k: str(v) for k, v in tags.items()}})
        rid = run.info.run_id
        try:
            self._log(rid, params=flatten(params), metrics=metrics)
            if artifacts is not None and any(artifacts.iterdir()):
                self.client.log_artifacts(rid, str(artifacts))
        except BaseException:
            self.client.set_terminated(rid, "FAILED")
            raise
        self.client.set_terminated(rid, status, end_time=int((end_s or time.time()) * 1000))
        return rid

    def set_tags(self, run_id: str, tags: dict) -> None:
        """Set tags on a run (values as strings)."""
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
        """Upload a directory's files to a run."""
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload one file to a run."""
        self.client.log_artifact(run_id, str(path), artifact_path)

    def _log(self, run_id: str, params: dict | None = None, metrics: dict | None = None) -> None:
        from mlflow.entities import Metric, Param

        ts = int(time.time() * 1000)
        ps = [Param(k, v) for k, v in (params or {}).items()]
        ms = [Metric(k, float(v), ts, 0) for k, v in (metrics or {}).items() if v is not None]
        for i in range(0, max(len(ps), len(ms)), 100):  # MLflow's per-batch limit on params
            self.client.log_batch(run_id, metrics=ms[i:i + 100], params=ps[i:i + 100])
