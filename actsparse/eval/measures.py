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

Adding a measure is one file: subclass `Measure`, decorate it, and name it in `eval.measure`. A measure
from another package is found by the module that defined it (recorded per cell, imported on a miss in
the worker processes) or through the `actsparse.measures` entry-point group.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional

from ..errors import ActsparseError

_REGISTRY: dict[str, "Measure"] = {}
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


def _load_plugins() -> None:
    global _PLUGINS_LOADED
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


def _need(cond: bool, what: str, s) -> None:
    if not cond:
        raise ActsparseError(f"{what}; got {dataclasses.asdict(s)}")


# -- the built-in measures ------------------------------------------------------------------------------------
@register_measure("ppl")
class Perplexity(Measure):
    """Perplexity on eval.data over windows of eval.seq_len (stride, max_tokens): the shared eval.* fields."""
    title = "perplexity"
    dense = decoder_only = True
    headline = ("ppl",)
    directions = {"ppl": False}

    @property
    def batch_knob(self) -> str:
        return "eval.batch_size"

    def batch_size(self, ctx: Context) -> int:
        return ctx.batch_size

    def run(self, ctx: Context, batch_size: int) -> float:
        from .perplexity import perplexity

        return perplexity(ctx.model, ctx.tok, data=ctx.data, seq_len=ctx.seq_len, stride=ctx.stride,
                          max_tokens=ctx.max_tokens, batch_size=batch_size)

    def metrics(self, value: float, dense: Optional[float]) -> dict:
        return {"ppl": value, "ppl_dense": dense, "ppl_ratio": value / dense}

    def line(self, value: float, dense: Optional[float]) -> str:
        return f"ppl {value:.3f} (x{value / dense:.3f} dense)"


@dataclass
class LmEvalSettings:
    """Accuracy through lm-evaluation-harness: any registered task, group or tag by name."""
    tasks: List[str] = field(default_factory=lambda: ["actsparse_offline"])   # the bundled offline tasks
    num_fewshot: Optional[int] = None   # None: each task's default
    limit: Optional[float] = None       # items per task (an int, or a fraction < 1); None: all
    batch_size: int = 8
    seed: int = 0


@register_measure("lm_eval")
class LmEval(Measure):
    """lm-eval accuracy per task (acc/<task>, acc_norm/<task>, their standard errors) and acc_avg, dense beside."""
    title = "lm-eval"
    Settings = LmEvalSettings
    dense = decoder_only = True
    result_key = "acc"
    headline = ("acc_avg",)
    directions = {"acc": True}
    _METRICS = ("acc/", "acc_norm/", "acc_stderr/", "acc_norm_stderr/")

    def check(self, s: LmEvalSettings) -> None:
        tasks = tuple(str(t).strip() for t in (s.tasks or []) if str(t).strip())
        if not tasks:
            raise ActsparseError("eval.lm_eval.tasks must name at least one lm-eval task (e.g. actsparse_offline)")
        _check_tasks(tasks)   # unknown names (close matches), hub tasks offline
        if s.num_fewshot is not None and s.num_fewshot < 0:
            raise ActsparseError(f"eval.lm_eval.num_fewshot must be >= 0 or null, got {s.num_fewshot}")
        if s.limit is not None and not s.limit > 0:
            raise ActsparseError(f"eval.lm_eval.limit must be > 0 (items, or a fraction < 1) or null, got {s.limit}")
        if s.batch_size < 1:
            raise ActsparseError(f"eval.lm_eval.batch_size must be >= 1, got {s.batch_size}")

    def run(self, ctx: Context, batch_size: int) -> dict:
        from .lm_eval import lm_eval_accuracy

        s = ctx.settings
        limit = int(s.limit) if s.limit is not None and s.limit >= 1 else s.limit
        return lm_eval_accuracy(ctx.model, ctx.tok, tasks=list(s.tasks), num_fewshot=s.num_fewshot, limit=limit,
                                batch_size=batch_size, seed=s.seed)

    def metrics(self, value: dict, dense: Optional[dict]) -> dict:
        dense, m = dense or {}, {}
        for k, v in value.items():
            if k.startswith(self._METRICS) or k in ("acc_avg", "acc_avg_stderr"):
                m[k] = v
                if isinstance(dense.get(k), (int, float)):
                    m[f"{k}_dense"] = dense[k]
        return m

    def line(self, value: dict, dense: Optional[dict]) -> Optional[str]:
        from .accuracy import pct, significant, subsampled

        if "acc_avg" not in value:
            return None
        dense = dense or {}
        d = dense.get("acc_avg")
        sig = significant(value["acc_avg"], value.get("acc_avg_stderr"), d, dense.get("acc_avg_stderr")) \
            if d is not None else None
        return (f"acc_avg {pct(value['acc_avg'], value.get('acc_avg_stderr'))}%"
                + (f" (dense {pct(d, dense.get('acc_avg_stderr'))}%"
                   + ("; not significant: within 2 stderr" if sig is False else "") + ")" if d is not None else "")
                + (f" [{subsampled(value).split(':')[0]}]" if subsampled(value) else ""))

    def details(self, value: dict, dense: Optional[dict]):
        """Per task: ± stderr, dense beside, n.s. marks, as a terminal table."""
        from rich.table import Table

        from .accuracy import subsampled, task_rows

        rows = task_rows(value, dense)
        caption = "accuracy in %, ± one standard error; Δ in points, (n.s.): within 2 standard errors of dense"
        note = subsampled(value)
        t = Table(caption=caption + (f"\n{note}" if note else ""), caption_justify="left")
        for col in rows[0] if rows else []:
            t.add_column(col, justify="left" if col == "task" else "right")
        for row in rows:
            t.add_row(*row.values())
        return t

    def record(self, value: dict, dense: Optional[dict]) -> tuple[dict, dict]:
        """lm-eval's figures with the task versions and sample counts, dense beside; versions as tags."""
        import json

        from .accuracy import subsampled

        tags = {"lm_eval_versions": json.dumps(value.get("versions", {}), sort_keys=True),
                "lm_eval_n_shot": json.dumps(value.get("n_shot", {}), sort_keys=True), "lm_eval": _lm_eval_version()}
        if subsampled(value):
            tags["lm_eval_subsampled"] = subsampled(value)
        files = {"lm_eval.json": json.dumps({"sparse": value, "dense": dense or {}}, indent=1, sort_keys=True,
                                            default=str)}
        return tags, files


@functools.lru_cache(maxsize=32)
def _check_tasks(tasks: tuple) -> None:
    from .lm_eval import check_tasks

    check_tasks(list(tasks))


def _lm_eval_version() -> str:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:
        return "unknown"


@dataclass
class FidelitySettings:
    """Cosine of sparsified vs dense outputs: pooled embeddings (encoders), hidden states or logits (decoders)."""
    n: int = 64                         # text chunks (encoders) or token windows (decoders)
    seq_len: int = 128
    output: str = "auto"                # auto | pooled | hidden | logits
    batch_size: int = 8


@register_measure("fidelity")
class Fidelity(Measure):
    """Mean cosine and relative L2 error of the sparsified model's outputs against its own dense outputs."""
    Settings = FidelitySettings
    headline = ("fidelity/cos",)
    directions = {"fidelity/rel_err": False, "fidelity": True}
    self_reference = {"fidelity/cos": 1.0, "fidelity/rel_err": 0.0}

    def check(self, s: FidelitySettings) -> None:
        from .fidelity import OUTPUTS

        _need(s.n >= 1 and s.seq_len >= 2 and s.batch_size >= 1 and s.output in OUTPUTS,
              f"eval.fidelity needs n >= 1, seq_len >= 2, batch_size >= 1 and output in {list(OUTPUTS)}", s)

    def run(self, ctx: Context, batch_size: int) -> dict:
        from .fidelity import fidelity

        s = ctx.settings
        return fidelity(ctx.model, ctx.tok, data=ctx.data, n=s.n, seq_len=s.seq_len, batch_size=batch_size,
                        output=s.output)

    def at_dense_plan(self, dense_value) -> dict:
        return {"cos": 1.0, "rel_err": 0.0, "n": 0}   # the dense model against itself

    def metrics(self, value: dict, dense) -> dict:
        return {"fidelity/cos": value["cos"], "fidelity/rel_err": value["rel_err"]}

    def line(self, value: dict, dense) -> str:
        return f"fidelity cos {value['cos']:.4f}"


@dataclass
class SpeedSettings:
    """Decode speed in the CUDA-graphed engine with the Triton kernels, dense side by side."""
    n_tokens: int = 128
    batch: int = 1
    prompt_len: int = 16
    repeats: int = 3


@register_measure("speed")
class Speed(Measure):
    """Decode speed, sparse vs dense in the CUDA-graphed engine: decode/tok_s, decode/speedup, kernel/us_per_layer.

    Not refused at validation: a cell without a GPU, a Llama-family model or a plan of threshold rules
    skips it and records why, so one grid can mix what the engine runs and what it does not."""
    title = "decode speed"
    Settings = SpeedSettings
    decoder_only = True
    sparsified = False

    def check(self, s: SpeedSettings) -> None:
        _need(s.n_tokens >= 1 and s.batch >= 1 and s.prompt_len >= 1 and s.repeats >= 1,
              "eval.speed needs n_tokens, batch, prompt_len and repeats >= 1", s)

    def skip_reason(self, device: str) -> Optional[str]:
        if not device.startswith("cuda"):
            return (f"decode speed needs a CUDA GPU and this cell runs on device={device} "
                    "(use device=cuda launcher=gpu)")
        return None

    def run(self, ctx: Context, batch_size) -> dict:
        from .speed import decode_speed, plan_to_engine, speed_unavailable_reason

        why = self.skip_reason(ctx.device) or speed_unavailable_reason(ctx.model)
        if why is None:
            try:
                plan_to_engine(ctx.plan)
            except ActsparseError as e:
                why = str(e)
        if why is not None:
            raise Skip(why)
        s = ctx.settings
        return decode_speed(ctx.model, ctx.plan, n_tokens=s.n_tokens, batch=s.batch, prompt_len=s.prompt_len,
                            repeats=s.repeats)

    def line(self, value: dict, dense) -> str:
        return f"decode {value['decode/speedup']:.2f}x"


@dataclass
class StabilitySettings:
    """Mask stability (arXiv 2412.12178): Jaccard overlap of the active input channels of consecutive tokens and
    of a text vs a perturbed copy, per watched site."""
    seq_len: int = 128
    n_windows: int = 8
    perturb: float = 0.3                # fraction of tokens replaced in the perturbed copy
    roles: List[str] = field(default_factory=lambda: ["down"])
    batch_size: int = 8
    seed: int = 0


@register_measure("stability")
class Stability(Measure):
    """Jaccard overlap of active input channels: stability/{consecutive,perturbed,chance}/<site> and /mean.

    Nothing is recorded for a dense plan, where every channel is active and both overlaps are trivially 1."""
    title = "mask stability"
    Settings = StabilitySettings

    def check(self, s: StabilitySettings) -> None:
        _need(s.seq_len >= 2 and s.n_windows >= 1 and s.batch_size >= 1 and 0.0 <= s.perturb <= 1.0 and s.roles,
              "eval.stability needs seq_len >= 2, n_windows >= 1, batch_size >= 1, perturb in [0, 1] and at least "
              "one role", s)

    def run(self, ctx: Context, batch_size: int) -> dict:
        from .stability import mask_stability

        s = ctx.settings
        return mask_stability(ctx.model, ctx.tok, data=ctx.data, seq_len=s.seq_len, n_windows=s.n_windows,
                              perturb=s.perturb, roles=tuple(s.roles), batch_size=batch_size, seed=s.seed)

    def line(self, value: dict, dense) -> Optional[str]:
        v = value.get("stability/consecutive/mean")
        return None if v is None else f"mask stability {v:.3f}"


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
