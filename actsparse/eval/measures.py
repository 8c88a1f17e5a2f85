"""Measures: what a sweep cell evaluates, each declared once behind `@register_measure`.

A measure says everything the sweep needs to know about it, so that the config schema, cell
validation, the tasks, the console line, the MLflow metrics and the report's default columns all
loop over this registry instead of naming measures:

- `Settings`: a dataclass whose fields become `eval.<name>.*` in the sweep config (None: no settings);
- `check(settings)`: raise ActsparseError naming the bad value (called before any model is loaded);
- `run(ctx, batch_size)`: the measurement on a model, under the cell's plan (torch hooks) unless
  `sparsified = False`, for a measure that installs the plan itself (decode speed's engine); raise
  `Skip(why)` when this cell cannot be measured (recorded as the tag `<name>_skipped`; `skip_reason(device)`
  says so before the model is loaded);
- `metrics(value, dense)`: its figures under their MLflow names; `line(...)` the console's summary,
  `details(...)` a table under it, `record(...)` extra tags and artifact files of the run;
- `dense`: whether its dense value is computed once per model (the dense node) and reused by every cell
  (`at_dense_plan` gives a cell whose plan sparsifies nothing its value without running);
- `decoder_only`: encoders cannot run it; `headline`/`directions`/`self_reference`: how reports read it;
- `result_key`: where a cell's result dict keeps the value, when not under the name (lm_eval's is `acc`).

Adding a measure is one file: subclass `Measure`, decorate it, and name it in `eval.measure` (the built-ins
are declared in `builtin_measures.py`, loaded the first time the registry is read). A measure
from another package is found by the module that defined it (recorded per cell, imported on a miss in
the worker processes) or through the `actsparse.measures` entry-point group.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from ..errors import ActsparseError

_REGISTRY: dict[str, "Measure"] = {}
_BUILTIN_LOADED = False
_PLUGINS_LOADED = False
# eval.* fields and the keys of a cell's result: a measure named (or keyed) like one would overwrite it
RESERVED = frozenset({"data", "data_key", "seq_len", "stride", "max_tokens", "batch_size", "token_policy", "measure",
                      "encoder_measure", "settings", "modules", "target", "effective", "expected_effective",
                      "act_mean", "per_role", "per_point", "calibrate_s", "stats_source", "fit_s", "eval_s",
                      "plan_summary", "device", "host", "eval_batch_size", "oom_retries", "t_start", "t_end",
                      "dense", "model", "worker", "values", "skipped", "key", "source", "time_s"})


class Skip(Exception):
    """Raised by Measure.run when the cell cannot be measured here; the reason is recorded, the cell finishes."""


@dataclass
class Context:
    """What a measure runs on: the model (plan installed when the measure is `sparsified`) and the cell's eval spec.

    data, seq_len, stride, max_tokens and batch_size are the shared `eval.*` fields; `settings` is the
    measure's own Settings instance (None for a measure without settings).
    """
    model: Any
    tok: Any
    data: str
    seq_len: int
    stride: int
    max_tokens: Optional[int]
    batch_size: int
    settings: Any = None
    plan: Any = None                  # the cell's SparsityPlan
    device: str = "cpu"
    handle: Any = None                # the SparsifyHandle while the plan is installed (torch backend)


class Measure:
    """Base class of a measure; subclasses set the class attributes and override run (and usually metrics)."""
    name: ClassVar[str] = ""
    title: ClassVar[str] = ""                  # in messages: "perplexity", "decode speed"
    Settings: ClassVar[Optional[type]] = None  # eval.<name>.* (a dataclass; lists/optionals as OmegaConf types)
    dense: ClassVar[bool] = False              # dense value computed once per model, reused by every cell
    decoder_only: ClassVar[bool] = False
    sparsified: ClassVar[bool] = True          # runs under the plan's torch hooks (False: installs the plan itself)
    result_key: ClassVar[str] = ""             # where a cell's result keeps the value (default: name)
    headline: ClassVar[tuple] = ()             # metrics a report shows first when none is asked for
    directions: ClassVar[dict] = {}            # quality-metric name prefix -> higher is better (what reports rank)
    self_reference: ClassVar[dict] = {}        # metric -> the dense model's value against itself

    @property
    def key(self) -> str:
        return self.result_key or self.name

    @property
    def batch_knob(self) -> Optional[str]:
        """The config key halved on a GPU out-of-memory error (None: the measure has no batch size)."""
        fields = {f.name for f in dataclasses.fields(self.Settings)} if self.Settings else set()
        return f"eval.{self.name}.batch_size" if "batch_size" in fields else None

    def batch_size(self, ctx: Context) -> Optional[int]:
        return getattr(ctx.settings, "batch_size", None) if self.batch_knob else None

    def check(self, s) -> None:
        """Raise ActsparseError for settings this measure cannot run with."""

    def skip_reason(self, device: str) -> Optional[str]:
        """Why a cell on this device cannot run the measure, known before any model is loaded (None: it can)."""
        return None

    def run(self, ctx: Context, batch_size: Optional[int]):
        raise NotImplementedError

    def at_dense_plan(self, dense_value):
        """The value of a cell whose plan sparsifies nothing, without running (None: run it, or record nothing)."""
        return dense_value if self.dense else None

    def metrics(self, value, dense) -> dict[str, float]:
        """{MLflow metric name: value} of a cell's result (dense: the dense node's value, or None)."""
        return {k: float(v) for k, v in value.items() if isinstance(v, (int, float))} if isinstance(value, dict) \
            else {self.name: float(value)}

    def line(self, value, dense) -> Optional[str]:
        """The console's summary of this measure for one finished cell (None: nothing to say)."""
        return None

    def details(self, value, dense):
        """A renderable (a rich Table) printed under a finished cell's line, or None."""
        return None

    def record(self, value, dense) -> tuple[dict, dict]:
        """(tags, {artifact file name: text}) logged with a finished cell's run (long tag values are cut)."""
        return {}, {}

    def parse_settings(self, d: Optional[dict]):
        """The Settings instance for a config's `eval.<name>` mapping (None without Settings)."""
        return self.Settings(**d) if self.Settings is not None else None


def register_measure(name: str):
    """Class decorator: register a Measure subclass under `name` (the value `eval.measure` lists)."""
    def deco(cls):
        _load_builtin()   # a plugin registered first must still meet the built-in names
        if not (isinstance(cls, type) and issubclass(cls, Measure)):
            raise TypeError(f"@register_measure({name!r}) decorates a Measure subclass, got {cls!r}")
        if not name.isidentifier():
            raise ValueError(f"a measure's name must be an identifier (it is a config key), got {name!r}")
        taken = {name, cls.result_key} & RESERVED
        if taken:
            raise ValueError(f"measure {name!r}: {', '.join(map(repr, sorted(taken)))} is a field of eval.* or a key "
                             "of a cell's result; choose another name (or result_key)")
        if name in _REGISTRY and type(_REGISTRY[name]).__qualname__ != cls.__qualname__:
            raise ValueError(f"measure {name!r} is registered already (by {type(_REGISTRY[name]).__module__})")
        cls.name, cls.title = name, cls.title or name
        _REGISTRY[name] = cls()
        return cls
    return deco


def unregister_measure(name: str) -> None:
    """Remove a registered measure (a plugin's, in a test or a notebook); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def measures() -> dict[str, Measure]:
    """{name: Measure} of every registered measure (built-ins first, then plugins)."""
    _load_plugins()
    return dict(_REGISTRY)


def get_measure(name: str, module: Optional[str] = None) -> Measure:
    """The measure registered as `name`, importing `module` (the one that registered it) first when needed."""
    _load_builtin()
    if name not in _REGISTRY and module:
        importlib.import_module(module)
    _load_plugins()
    if name not in _REGISTRY:
        raise ActsparseError(f"unknown measure {name!r}; registered: {sorted(_REGISTRY)} (a measure from another "
                             "package needs its module imported, or an `actsparse.measures` entry point)")
    return _REGISTRY[name]


def measure_modules(names) -> dict[str, str]:
    """{name: the module that registered it}: recorded with a cell, so worker processes can import plugins."""
    out = {n: type(get_measure(n)).__module__ for n in names}
    for n, mod in out.items():
        if mod == "__main__":
            raise ActsparseError(f"measure {n!r} is defined in the script being run (__main__), which the sweep's "
                                 "worker processes cannot import; move it into a module of its own and import that")
    return out


def _load_builtin() -> None:
    global _BUILTIN_LOADED
    if not _BUILTIN_LOADED:
        _BUILTIN_LOADED = True   # first: builtin_measures registers through register_measure while it loads
        importlib.import_module(f"{__package__}.builtin_measures")


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    _load_builtin()
    if _PLUGINS_LOADED:
        return
    from importlib.metadata import entry_points

    for ep in entry_points(group="actsparse.measures"):
        try:
            ep.load()
        except Exception as e:  # say which plugin, every time it is asked for: never half a registry in silence
            raise ActsparseError(f"the measure plugin {ep.name!r} ({ep.value}) failed to import: "
                                 f"{type(e).__name__}: {e}") from e
    _PLUGINS_LOADED = True


def _declaring(metric: str) -> tuple[Optional[Measure], Optional[bool]]:
    n = metric.lower()
    for m in measures().values():
        for prefix, higher in m.directions.items():
            if n.startswith(prefix):
                return m, higher
    return None, None


def measure_of(metric: str) -> Optional[str]:
    """The measure that records a metric (by the metric-name prefixes measures declare), or None."""
    m = _declaring(metric)[0]
    return m.name if m is not None else None


def direction_of(metric: str) -> Optional[bool]:
    """Whether higher is better for a metric some measure declares (None: no measure says)."""
    return _declaring(metric)[1]


def headline_metrics() -> tuple:
    return tuple(h for m in measures().values() for h in m.headline)


def self_reference() -> dict:
    return {k: v for m in measures().values() for k, v in m.self_reference.items()}


def quality_metrics(result: dict) -> dict:
    """A cell result's measured figures under DESIGN.md's metric names, from every measure it holds."""
    out = {}
    for m in measures().values():
        if m.key in result:
            out.update(m.metrics(result[m.key], result.get("dense", {}).get(m.key)))
    return out


def cell_line(result: dict) -> str:
    """The console's summary of a finished cell: each measure's line, skips with their reason, effective sparsity."""
    parts = []
    for m in measures().values():
        if m.key in result:
            line = m.line(result[m.key], result.get("dense", {}).get(m.key))
            if line:
                parts.append(line)
        if f"{m.name}_skipped" in result:
            parts.append(f"{m.title} skipped: {result[f'{m.name}_skipped']}")
    return "  ".join(parts + [f"effective sparsity {result['effective']:.3f}"])
