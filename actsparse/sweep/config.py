"""The typed schema of a sweep cell's configuration, registered in Hydra's ConfigStore.

Hydra merges `conf/` (and the `sweeps/` presets) onto these dataclasses, so a wrong type or an
unknown key fails at composition; `cells.validate_cells` then checks the values (method registered,
sparsity in [0, 1), model resolvable, token policy) before any model is loaded or Ray is started.
Which fields make a cell's identity is decided in cells.py, not here.
"""
from __future__ import annotations

import os
import dataclasses
import typing
from dataclasses import MISSING as MISSING_FIELD
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf

_PKG = Path(__file__).resolve().parent.parent            # actsparse/
_ROOT = _PKG.parent                                       # the repository (editable install)


@dataclass
class ModelConf:
    name: str = MISSING                 # bundled name, local HF directory or hub id (as asp.load_model takes)
    dtype: str = "float32"
    revision: Optional[str] = None


@dataclass
class MethodConf:
    name: str = MISSING                 # a registered method (asp.methods())
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConf:
    """Calibration data and collector settings: with the model, they make the stats_key."""
    calib: str = "bundled:calib"
    tokens: int = 8192
    seq_len: int = 256
    batch_size: int = 4
    sample_size: int = 131072
    seed: int = 0


@dataclass
class EvalBase:
    """What each cell measures, and how: with the plan, it makes the cell_key.

    `measure` lists the evaluations of every cell, from the measure registry (actsparse/eval/measures.py):
    ppl (perplexity on `data`), lm_eval (accuracy), fidelity, speed, stability (mask stability), and any
    registered plugin. ppl, lm_eval and speed need a decoder-only LM; `encoder_measure` says what encoders
    measure instead (None: the same list, which then must suit them). Each measure with settings adds its
    group `eval.<measure>.*` (see eval_conf).
    """
    data: str = "bundled:eval"
    seq_len: int = 256
    stride: Optional[int] = None        # None: disjoint windows
    max_tokens: Optional[int] = 16384   # None: the whole data
    batch_size: int = 8
    token_policy: str = "all"           # all | decode | last_fraction=f
    measure: List[str] = field(default_factory=lambda: ["ppl"])
    encoder_measure: Optional[List[str]] = None


def eval_conf() -> type:
    """The `eval` schema: EvalBase plus one `eval.<measure>` group per registered measure that has settings."""
    from ..eval.measures import measures

    groups = [(name, m.Settings, field(default_factory=m.Settings)) for name, m in measures().items()
              if m.Settings is not None]
    return make_dataclass("EvalConf", groups, bases=(EvalBase,))


@dataclass
class TrackingConf:
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "actsparse"
    artifact_location: Optional[str] = None   # None: mlartifacts/ beside a sqlite store


@dataclass
class RayConf:
    address: Optional[str] = None       # None or "local": start an embedded local cluster; else e.g. "auto"
    num_cpus: Optional[int] = None      # size of the embedded cluster (None: all cores)
    num_gpus: Optional[int] = None
    log_to_driver: bool = False         # worker output in the console (errors come back either way)


@dataclass
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class LauncherConf:
    # artifact store: stats, plans, dense evaluations (content-addressed). A directory, or any fsspec
    # URL (s3://bucket/prefix, gs://..., file:///shared/dir) that every node of a cluster can reach
    store: str = ".actsparse_cache"
    store_cache: Optional[str] = None   # node-local download cache of a URL store (None: $TMPDIR/actsparse-store-<uid>)
    calibrate: Resources = field(default_factory=Resources)
    fit: Resources = field(default_factory=Resources)
    evaluate: Resources = field(default_factory=Resources)
    max_retries: int = 1                # re-runs of a node whose worker process died (not of exceptions)
    model_cache: int = 1                # models each worker process keeps loaded between tasks
    # model affinity: each model's calibration, dense and sparse evaluations (and the fits that need the
    # model) run on Ray actors that keep it loaded; false: every node is a plain Ray task with its stage's
    # resources (the model is reloaded whenever a task lands on a worker process that has not loaded it yet)
    affinity: bool = True
    workers_per_model: Optional[int] = None   # actors per model (None: share the cluster among the models with work)
    max_workers: Optional[int] = None         # actors in all (None: as many as the cluster's CPUs/GPUs hold)
    oom_retries: int = 1                # on a GPU out-of-memory error, retries with half the batch size
    # GPUs of one node per cell (its model workers' Ray request): auto follows the cell's memory estimate
    # (sweep/placement.py), an integer fixes it; CPU cells take none
    gpus_per_cell: str = "auto"
    gpu_memory_gb: Optional[float] = None     # one GPU's memory (None: torch.cuda's, where the sweep starts)


@dataclass
class ReportConf:
    enabled: bool = True
    dir: str = "sweep_results"          # the report goes to <dir>/<sweep_id>/


@dataclass
class SweepBase:
    """One cell's whole configuration (and, before the grid is expanded, the sweep's defaults) but for `eval`,
    whose schema grows with the measure registry: schema() adds it after `data`."""
    model: ModelConf = field(default_factory=ModelConf)
    method: MethodConf = field(default_factory=MethodConf)
    data: DataConf = field(default_factory=DataConf)
    tracking: TrackingConf = field(default_factory=TrackingConf)
    launcher: LauncherConf = field(default_factory=LauncherConf)
    ray: RayConf = field(default_factory=RayConf)
    report: ReportConf = field(default_factory=ReportConf)
    sparsity: float = 0.5
    device: str = "cpu"                 # cpu | cuda | cuda:N | auto
    name: str = "adhoc"                 # the sweep's name (presets set it); part of the sweep_id


def schema() -> type:
    """The sweep config schema with the measures registered now (plugins imported before this call included)."""
    ev = eval_conf()
    hints = typing.get_type_hints(SweepBase)
    fields = [(f.name, hints[f.name], field(default=f.default) if f.default_factory is MISSING_FIELD
               else field(default_factory=f.default_factory)) for f in dataclasses.fields(SweepBase)]
    at = [name for name, _, _ in fields].index("data") + 1      # eval after data, as configs print it
    fields.insert(at, ("eval", ev, field(default_factory=ev)))
    cls = make_dataclass("SweepConf", fields)
    cls.__module__ = __name__
    return cls


def __getattr__(name: str):
    """`SweepConf`: the schema with the measures registered when it is first asked for (built lazily, so that
    importing this module never imports measure plugins)."""
    if name == "SweepConf":
        return schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def conf_dir() -> Path:
    """Return the Hydra config directory (ACTSPARSE_CONF_DIR, else the repository's conf/)."""
    return _first_dir("ACTSPARSE_CONF_DIR", [_ROOT / "conf", _PKG / "conf"])


def sweeps_dir() -> Path:
    """Return the directory of named sweep presets (ACTSPARSE_SWEEPS_DIR, else the repository's sweeps/)."""
    return _first_dir("ACTSPARSE_SWEEPS_DIR", [_ROOT / "sweeps", _PKG / "sweeps"])


def _first_dir(env: str, candidates: list[Path]) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser().resolve()
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def register_configs() -> None:
    """Store the schema, one `method` option per registered method (its parameters with their defaults), and the
    `sweep` presets in the ConfigStore."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="actsparse_schema", node=schema())
    # every registered method is an option of the `method` group, its typed parameters filled with their
    # defaults, so `method.params.<name>=v` overrides it and `--cfg` shows them; conf/method/<name>.yaml wins
    have_yaml = {p.stem for p in (conf_dir() / "method").glob("*.yaml")}
    for name, params in method_defaults().items():
        if name not in have_yaml:
            cs.store(group="method", name=name, node={"name": name, "params": params})
    # presets live in sweeps/ (short files that read like a paper table's caption) and are the `sweep` group
    for path in sorted(sweeps_dir().glob("*.yaml")):
        cs.store(group="sweep", name=path.stem, node=OmegaConf.load(path), package="_global_")


def method_defaults() -> dict[str, dict]:
    """{method: {param: default}} of every registered method, as plain config values (tuples as lists)."""
    from ..sparsifiers.registry import methods

    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return {name: {k: plain(p["default"]) for k, p in params.items()} for name, params in methods().items()}
