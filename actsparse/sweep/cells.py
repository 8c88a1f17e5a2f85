"""Validate composed cell configs and turn them into keyed nodes: stats, plan, dense evaluation, cell.

Keys follow DESIGN.md and are computed before any model is loaded, from the configuration and the
files it names:
    model_key = hash(model source + revision, dtype, the model files' content)
    stats_key = hash(model_key, calibration data content, collector params)
    plan_key  = hash(stats_key, method, params with defaults filled in, target)
    dense_key = hash(model_key, eval spec without the token policy)   (dense values of the dense measures, shared)
    cell_key  = hash(plan_key, eval spec)
A method that ignores its target (dense) fits at target 0, so it is one plan and one cell however
many sparsities a grid lists it at.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import content_key
from ..errors import ActsparseError

DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16", "auto")
_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")
_HASH_LIMIT = 64 << 20  # files above this are identified by size + mtime instead of content


@dataclass(frozen=True)
class ModelRef:
    """A model as a task loads it (name, dtype, revision) plus the key of its weights."""
    name: str
    dtype: str
    revision: str | None
    kind: str                # bundled | local | hub
    key: str
    encoder: bool = False    # an encoder (BERT-like): no perplexity, lm-eval or decode speed
    model_type: str = ""     # config.model_type (what decode speed checks)


@dataclass(frozen=True)
class StatsNode:
    """One calibration: model x calibration data x collector params."""
    key: str
    model: ModelRef
    data: str
    tokens: int
    seq_len: int
    batch_size: int
    sample_size: int
    seed: int


@dataclass(frozen=True)
class PlanNode:
    """One fit: stats x method x params x target."""
    key: str
    stats_key: str
    model: ModelRef
    method: str
    params: dict             # every parameter, defaults filled in (the identity)
    given: dict              # the parameters as configured (what asp.fit is called with)
    target: float
    needs_model: bool


@dataclass(frozen=True)
class EvalSpec:
    """What a cell measures and how; batch sizes are not part of any key.

    `measure` is resolved per model (encoders take eval.encoder_measure); `settings` holds the
    parameters of each measure that has its own (eval.<measure>.*). A perplexity-only spec's identity leaves out
    `measure` and `settings`, so the keys of stores and runs made by perplexity-only sweeps stay valid. `modules` names the module
    that registered each measure, for worker processes that have not imported a plugin (not part of keys).
    """
    data: str
    data_key: str
    seq_len: int
    stride: int
    max_tokens: int | None
    token_policy: str
    batch_size: int
    measure: tuple = ("ppl",)
    settings: dict = field(default_factory=dict)     # {"lm_eval": {...}, "fidelity": {...}, "speed": {...}}
    modules: dict = field(default_factory=dict)      # {measure: module that registered it}

    def identity(self, with_policy: bool = True) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items()
             if k not in ("batch_size", "measure", "settings", "modules")}
        if not with_policy:
            d.pop("token_policy")
        if self.measure != ("ppl",):
            d["measure"] = list(self.measure)
            d["settings"] = {m: {k: v for k, v in s.items() if k != "batch_size"} for m, s in self.settings.items()}
        return d

    def dense_identity(self) -> dict:
        """What the dense node computes from: the spec without token policy and without the measures that have
        no dense side (fidelity compares with the model itself, speed times dense beside sparse)."""
        d = self.identity(with_policy=False)
        dense = self.dense_measures()
        d.pop("measure", None)
        settings = d.pop("settings", {})
        if dense != ["ppl"]:     # perplexity alone: no measure list in the key (see identity)
            d["measure"] = dense
            d["settings"] = {m: v for m, v in settings.items() if m in dense}
        return d

    def dense_measures(self) -> list[str]:
        """The measures the dense node evaluates once per model."""
        from ..eval.measures import get_measure

        return [m for m in self.measure if get_measure(m, self.modules.get(m)).dense]

    def has(self, measure: str) -> bool:
        return measure in self.measure


@dataclass(frozen=True)
class DenseNode:
    """One dense perplexity: model x eval spec (token policy excluded: nothing is sparsified)."""
    key: str
    model: ModelRef
    eval: EvalSpec


@dataclass(frozen=True)
class Cell:
    """One grid point, validated and keyed."""
    index: int                       # position in the grid
    overrides: tuple[str, ...]       # the Hydra overrides that made it
    config: dict                     # the resolved configuration (plain containers)
    key: str
    stats: StatsNode
    plan: PlanNode
    dense: DenseNode
    eval: EvalSpec
    sparsity: float                  # as requested (the plan's target may be 0 for dense)
    device: str
    label: str = field(default="")
    method_label: str = field(default="")       # the name plus non-default params: teal(allocation=greedy)
    ignored_target: float | None = None          # the requested sparsity, when the method's params set it instead


def validate_cells(configs: list[tuple[list[str], dict]]) -> list[Cell]:
    """Return keyed Cells for (overrides, resolved config) pairs; raise one ActsparseError naming every bad value."""
    ctx = _Context()
    cells, errors = [], {}
    for i, (ov, cfg) in enumerate(configs):
        try:
            cells.append(_cell(i, ov, cfg, ctx))
        except ActsparseError as e:
            errors.setdefault(str(e), []).append(" ".join(o for o in ov if not o.startswith("+sweep=")) or "defaults")
    if errors:
        lines = []
        for msg, where in errors.items():
            cells_txt = where[0] if len(where) == 1 else f"{where[0]} and {len(where) - 1} more cell(s)"
            lines.append(f"{msg}  [cell: {cells_txt}]")
        raise ActsparseError("\n".join(lines))
    return cells


class _Context:
    """Memoises the expensive lookups (model files, data files, hub reachability) across cells."""

    def __init__(self):
        self.models: dict[tuple, ModelRef] = {}
        self.data: dict[str, str] = {}


def _cell(index: int, overrides: list[str], cfg: dict, ctx: _Context) -> Cell:
    from ..eval.measures import measure_modules
    from ..sparsifiers.apply import parse_token_policy
    from ..sparsifiers.registry import check_sparsity, get_method, make_params

    m, d, e = cfg["model"], cfg["data"], cfg["eval"]
    cls = get_method(cfg["method"]["name"])
    given = dict(cfg["method"].get("params") or {})
    typed = make_params(cls, given)
    params = dataclasses.asdict(typed)
    sparsity = check_sparsity(cfg["sparsity"])
    # a method whose params set its sparsity (nm's N:M pattern) is recorded and labelled at that sparsity,
    # never at the target the grid asked for, which it ignores
    nominal = getattr(cls, "nominal_sparsity", None)
    ignored = None
    if not cls.uses_target and callable(nominal) and abs(nominal(typed) - sparsity) > 1e-9:
        ignored, sparsity = sparsity, round(float(nominal(typed)), 6)
        cfg = {**cfg, "sparsity": sparsity}
    parse_token_policy(e["token_policy"])
    device = _device(cfg["device"], cfg["launcher"])
    _check_collector(d)
    _check_eval(e)
    model = _model_ref(m, ctx)
    measure = _measures(e, model, m["name"])
    calib_key = _data_key(d["calib"], "data.calib", ctx)
    eval_key = _data_key(e["data"], "eval.data", ctx)

    stats_id = {"model": model.key, "data": calib_key, "tokens": d["tokens"], "seq_len": d["seq_len"],
                "sample_size": d["sample_size"], "seed": d["seed"], "probes": "all"}
    stats = StatsNode(content_key("stats", stats_id), model, d["calib"], d["tokens"], d["seq_len"],
                      d["batch_size"], d["sample_size"], d["seed"])
    target = sparsity if cls.uses_target else 0.0
    plan = PlanNode(content_key("plan", stats.key, cls.name, params, target), stats.key, model, cls.name,
                    params, given, target, _needs_model(cls, typed))
    ev = EvalSpec(e["data"], eval_key, e["seq_len"], e["stride"] or e["seq_len"], e["max_tokens"],
                  e["token_policy"], e["batch_size"], measure, _settings(e, measure), measure_modules(measure))
    dense = DenseNode(content_key("dense", model.key, ev.dense_identity()), model, ev)
    key = content_key("cell", plan.key, ev.identity())
    method_label = _method_label(cls, params)
    label = f"{m['name'] if model.kind != 'local' else Path(m['name']).name} {method_label}" + \
            (f" s={sparsity:g}" if cls.uses_target or callable(nominal) else "")
    return Cell(index, tuple(overrides), cfg, key, stats, plan, dense, ev, sparsity, device, label, method_label,
                ignored)


def target_notes(cells: list[Cell]) -> list[str]:
    """One line per method whose params, not the grid's `sparsity`, set its sparsity, naming the points it merges."""
    by_label: dict[str, list[Cell]] = {}
    for c in cells:
        if c.ignored_target is not None:
            by_label.setdefault(c.label, []).append(c)
    out = []
    for label, cs in by_label.items():
        asked = ", ".join(f"{v:g}" for v in sorted({c.ignored_target for c in cs}))
        out.append(f"note: {cs[0].plan.method} ignores sparsity={asked}: its parameters set it "
                   f"({cs[0].method_label}: {cs[0].sparsity:g} of each input zeroed), so it runs, and is recorded, as "
                   f"`{label}`; change it with method.params.* (see `actsparse ls methods`)")
    return out


def _method_label(cls, params: dict) -> str:
    """The method's name plus its non-default parameters: `teal`, `teal(allocation=greedy)`, `nm(m=16, n=8)`."""
    from ..sparsifiers.registry import make_params

    defaults = dataclasses.asdict(make_params(cls, {}))
    changed = {k: v for k, v in params.items() if k in defaults and v != defaults[k]}
    if not changed:
        return cls.name
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else ",".join(map(str, v)) if isinstance(v, (list, tuple)) \
        else str(v)  # noqa: E731
    return f"{cls.name}({', '.join(f'{k}={fmt(v)}' for k, v in sorted(changed.items()))})"


def _needs_model(cls, params) -> bool:
    """Whether fitting needs the model: asked of the method when it can tell per params, else assumed.

    Whether a method runs forward passes (or reads weights) while fitting depends on its params
    (scap mode='kde', teal allocation='greedy'), and the class flag does not say so, hence the
    conservative default; the fit task loads the model from its worker's cache.
    """
    ask = getattr(cls, "needs_model_for", None)
    return bool(ask(params)) if callable(ask) else True


def _device(device: str, launcher: dict) -> str:
    if not _DEVICE.match(str(device)):
        raise ActsparseError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if device.startswith("cuda") and not (launcher["evaluate"]["num_gpus"] > 0 and launcher["calibrate"]["num_gpus"] > 0):
        raise ActsparseError(f"device={device} needs GPU tasks, but launcher.calibrate/evaluate.num_gpus is 0; "
                             "use launcher=gpu (or set launcher.evaluate.num_gpus=1 launcher.calibrate.num_gpus=1)")
    return device


def _check_collector(d: dict) -> None:
    if d["seq_len"] < 2:
        raise ActsparseError(f"data.seq_len must be >= 2, got {d['seq_len']}")
    if d["tokens"] < d["seq_len"]:
        raise ActsparseError(f"data.tokens ({d['tokens']}) must be at least data.seq_len ({d['seq_len']})")
    if d["sample_size"] < 16:
        raise ActsparseError(f"data.sample_size must be >= 16, got {d['sample_size']}")
    if d["batch_size"] < 1:
        raise ActsparseError(f"data.batch_size must be >= 1, got {d['batch_size']}")


def _check_eval(e: dict) -> None:
    if e["seq_len"] < 2:
        raise ActsparseError(f"eval.seq_len must be >= 2, got {e['seq_len']}")
    if e["stride"] is not None and not 1 <= e["stride"] <= e["seq_len"]:
        raise ActsparseError(f"eval.stride must be in [1, eval.seq_len={e['seq_len']}] or null, got {e['stride']}")
    if e["max_tokens"] is not None and e["max_tokens"] < e["seq_len"]:
        raise ActsparseError(f"eval.max_tokens ({e['max_tokens']}) must be at least eval.seq_len ({e['seq_len']}) "
                             "or null (all of the data)")
    if e["batch_size"] < 1:
        raise ActsparseError(f"eval.batch_size must be >= 1, got {e['batch_size']}")
    from ..eval.measures import get_measure, measures

    known = measures()
    for what in ("measure", "encoder_measure"):
        ms = e.get(what)
        if ms is None and what == "encoder_measure":
            continue
        ms = list(ms or [])
        bad = [x for x in ms if x not in known]
        if not ms or bad or len(set(ms)) != len(ms):
            raise ActsparseError(f"eval.{what} must be a non-empty list of distinct measures from {list(known)}, "
                                 f"got {ms}")
    for name in dict.fromkeys([*e["measure"], *(e.get("encoder_measure") or [])]):
        m = get_measure(name)
        m.check(m.parse_settings(_settings(e, (name,)).get(name)))


def _settings(e: dict, names) -> dict:
    """{measure: its eval.<measure>.* mapping} for the measures that have settings."""
    from ..eval.measures import get_measure

    out = {}
    for name in names:
        if get_measure(name).Settings is None:
            continue
        if name not in e:
            raise ActsparseError(f"eval.{name} is not in the config: the measure {name!r} was registered after the "
                                 "config schema was built; import its module (or install its entry point) first")
        out[name] = dict(e[name])
    return out


def _measures(e: dict, model: ModelRef, name: str) -> tuple:
    """The measures a cell of this model runs: eval.measure, or eval.encoder_measure for an encoder.

    A measure that cannot run on a given cell is not refused here: it raises measures.Skip when the cell
    runs and the reason is recorded (decode speed without a GPU: tag `speed_skipped`)."""
    ms = list(e["measure"])
    if model.encoder and e.get("encoder_measure") is not None:
        ms = list(e["encoder_measure"])
    if model.encoder:
        from ..eval.measures import get_measure

        bad = [x for x in ms if get_measure(x).decoder_only]
        if bad:
            raise ActsparseError(f"model {name!r} is an encoder: {', '.join(bad)} need(s) a decoder-only LM; "
                                 "evaluate it with fidelity (eval=fidelity, or eval=quality for a grid of "
                                 "decoders and encoders; or set eval.encoder_measure=[fidelity])")
    return tuple(ms)


def _model_ref(m: dict, ctx: _Context) -> ModelRef:
    from ..models.load import resolve_model_source

    memo = (m["name"], m["dtype"], m.get("revision"))
    if memo not in ctx.models:
        if m["dtype"] not in DTYPES:
            raise ActsparseError(f"model.dtype must be one of {list(DTYPES)}, got {m['dtype']!r}")
        src = resolve_model_source(m["name"])
        if src.kind == "hub":  # a hub id is identified by name and revision (weights are not local yet)
            key = content_key("model", "hub", src.path, m.get("revision") or "main", m["dtype"])
        else:                  # a folder by its files' content, wherever it lies
            key = content_key("model", "files", m["dtype"], _dir_fingerprint(Path(src.path)))
        encoder, model_type = _model_kind(src)
        ctx.models[memo] = ModelRef(m["name"], m["dtype"], m.get("revision"), src.kind, key, encoder, model_type)
    return ctx.models[memo]


def _model_kind(src) -> tuple[bool, str]:
    """(is an encoder, config.model_type) from the model's config, without loading weights.

    A hub model's config is read through transformers (cached, or fetched when online); when it cannot
    be read, the model counts as a decoder and its evaluation says otherwise if it is not.
    """
    import json
    import types

    from ..models.load import config_is_encoder

    try:
        if src.kind == "hub":
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(src.path)
        else:
            cfg = types.SimpleNamespace(**json.loads((Path(src.path) / "config.json").read_text()))
    except Exception:
        return False, ""
    return config_is_encoder(cfg), str(getattr(cfg, "model_type", "") or "")


def _dir_fingerprint(path: Path) -> dict:
    """Identify a model folder's files: content hash for small files, size + mtime for large ones."""
    out = {}
    for f in sorted(path.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        st = f.stat()
        if st.st_size <= _HASH_LIMIT:
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
        else:
            out[f.name] = f"{st.st_size}:{st.st_mtime_ns}"
    return out


def _data_key(spec: str, what: str, ctx: _Context) -> str:
    if spec not in ctx.data:
        from ..data.text import text_data

        if isinstance(spec, str) and spec.startswith("hf:"):
            from ..models.load import hub_offline

            if hub_offline():
                raise ActsparseError(f"{what}={spec!r} needs the Hugging Face hub, which cannot be reached "
                                     "(offline); use bundled:calib / bundled:eval or a local text file")
            ctx.data[spec] = spec  # the hub dataset's name; its content is fetched by the task
        else:
            try:
                ctx.data[spec] = text_data(spec).key
            except ActsparseError as e:
                raise ActsparseError(f"{what}: {e}") from e
    return ctx.data[spec]
