"""The built-in measures: perplexity, lm-eval accuracy, output fidelity, decode speed, mask stability.

Declarations only: each `run` imports its implementation module (eval/perplexity.py, lm_eval.py, fidelity.py,
speed.py, stability.py) when a cell runs, so the config schema and `actsparse ls measures` load without torch.
`measures.py` imports this module the first time the registry is read.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import List, Optional

from ..errors import ActsparseError
from .measures import Context, Measure, Skip, register_measure


def _need(cond: bool, what: str, s) -> None:
    if not cond:
        raise ActsparseError(f"{what}; got {dataclasses.asdict(s)}")


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

    Not refused at validation: a cell without a GPU, a model the engine decodes or a plan of threshold rules
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
