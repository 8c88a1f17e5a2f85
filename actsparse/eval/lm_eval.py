"""Accuracy through lm-evaluation-harness, on the sparsified model in memory.

`lm_eval_accuracy(model, tok, tasks)` wraps the model object and its tokenizer in lm-eval's HFLM
(batch size on the wrapper) and runs any registered task by name, plus the offline tasks shipped in
actsparse/eval/tasks/ (actsparse_continuation, actsparse_continuation_local, group actsparse_offline).

Token policy: under 'decode', each log-likelihood request is scored with its context dense and its
continuation sparse — exactly the positions whose logits score continuation tokens are sparsified,
the convention asp.perplexity uses for scored tokens. Generation (generate_until tasks) goes through
model.generate: the prefill is dense and every one-token decode step is sparse. 'all' sparsifies every
position; 'last_fraction=f' the last f of each (right-padded) batch window.

lm-eval is an optional dependency, imported only when this function runs.
"""
from __future__ import annotations

import difflib
import functools
import math
import os
from pathlib import Path

import torch

from ..errors import ActsparseError
from ..models.load import hub_offline, require_decoder
from ..sparsifiers.apply import active_handle

TASK_DIR = Path(__file__).resolve().parent / "tasks"
LM_EVAL_VERSION = "0.4.13"
# datasets an lm-eval task may name that are read from local files, not the hub
_LOCAL_BUILDERS = {"json", "csv", "text", "parquet", "arrow"}


def offline_tasks() -> list[str]:
    """Names of the bundled offline tasks and their group."""
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ActsparseError("accuracy evaluation needs lm-evaluation-harness: "
                             f"pip install 'lm-eval[hf]=={LM_EVAL_VERSION}'") from e
    return lm_eval


@functools.lru_cache(maxsize=2)
def task_manager(defaults: bool = True):
    """Return lm-eval's TaskManager with the bundled tasks included (the full index takes ~15 s: cached)."""
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=defaults)


def _manager_for(names: list[str]):
    return task_manager(not set(names) <= set(offline_tasks()))  # positional: one lru_cache key per kind


def check_tasks(names: list[str], tm=None) -> None:
    """Raise ActsparseError for a task lm-eval does not know (listing close matches) or one needing the hub offline."""
    tm = tm or _manager_for(names)
    known = tm.all_tasks
    for name in names:
        if name not in tm.task_index:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ActsparseError(f"unknown lm-eval task {name!r}{hint}. Offline tasks: {', '.join(offline_tasks())}; "
                                 "list all with `lm-eval ls tasks`")
    if not hub_offline():
        return
    for name in names:
        for cfg in _leaf_configs(tm, name):
            need = _hub_dataset(cfg)
            if need and not _in_dataset_cache(need):
                raise ActsparseError(f"task {name!r} reads its data from the Hugging Face hub (dataset {need!r}), "
                                     "which cannot be reached (offline), and the dataset is not in the local cache. "
                                     f"Offline, use the bundled tasks: {', '.join(offline_tasks())}")


def _leaf_configs(tm, name: str, depth: int = 0) -> list[dict]:
    """The configs of the tasks a task/group/tag name expands to (unresolved YAML, enough to see the dataset)."""
    from lm_eval.tasks._index import Kind

    e = tm.task_index.get(name)
    if e is None or depth > 8:
        return []
    if e.kind == Kind.TAG:
        return [c for k, v in tm.task_index.items() if name in v.tags for c in _leaf_configs(tm, k, depth + 1)]
    if e.kind == Kind.GROUP:
        out = []
        for child in (e.cfg or {}).get("task", []):
            out.extend(_leaf_configs(tm, child, depth + 1) if isinstance(child, str) else [child])
        return out
    return [e.cfg or {"class": True}]


def _hub_dataset(cfg: dict) -> str | None:
    """The hub dataset a task config downloads, or None when it reads local files."""
    if cfg.get("custom_dataset"):
        return None
    path = cfg.get("dataset_path")
    if path is None:
        return "<defined in Python>" if cfg.get("class") else None
    if path in _LOCAL_BUILDERS or Path(str(path)).exists():
        return None
    return str(path)


def _in_dataset_cache(path: str) -> bool:
    if path.startswith("<"):
        return False
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    ds = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets"))
    return (hub / f"datasets--{path.replace('/', '--')}").exists() or (ds / path.replace("/", "___")).exists()


@functools.lru_cache(maxsize=1)
def _wrapper_class():
    """HFLM that marks, under token policy 'decode', the continuation-scoring positions of each batch."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:  # HFLM needs lm-eval's `hf` extra (accelerate, peft)
        raise ActsparseError(f"lm-eval's Hugging Face backend is missing {e.name or 'a dependency'}: "
                             f"pip install 'lm-eval[hf]=={LM_EVAL_VERSION}'") from e

    class SparseHFLM(HFLM):
        _cont: dict | None = None

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            handle = active_handle(self.model)
            if handle is None or handle.policy != "decode":
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            # the model input of a request is (context + continuation)[-(max_length+1):][:-1]; its last
            # len(continuation) positions score the continuation (longest one when inputs coincide)
            cont: dict[tuple, int] = {}
            for _, ctx, c in requests:
                key = tuple((ctx + c)[-(self.max_length + 1):][:-1])
                cont[key] = max(cont.get(key, 0), len(c))
            self._cont = cont
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            finally:
                self._cont = None

        def _model_call(self, inps, attn_mask=None, labels=None):
            handle = active_handle(self.model)
            if self._cont is None or handle is None:
                return super()._model_call(inps, attn_mask, labels)
            mask = torch.zeros_like(inps, dtype=torch.bool)  # [B, T] positions to sparsify
            rows = inps.tolist()
            for b, row in enumerate(rows):
                n, c = _continuation(row, self._cont)
                mask[b, n - c:n] = True
            with handle.positions(mask):
                return super()._model_call(inps, attn_mask, labels)

    return SparseHFLM


def _continuation(row: list[int], cont: dict[tuple, int]) -> tuple[int, int]:
    """(input length, continuation length) of a right-padded (with 0) batch row."""
    n = len(row)
    while n > 0:
        c = cont.get(tuple(row[:n]))
        if c is not None:
            return n, c
        if row[n - 1] != 0:
            break
        n -= 1
    raise ActsparseError("internal: a batch row matches no log-likelihood request; cannot mark its continuation")


def lm_eval_accuracy(model, tok, tasks: "str | list[str]" = "actsparse_offline", num_fewshot: int | None = None,
                     limit: "int | float | None" = None, batch_size: int = 8, seed: int = 0,
                     max_length: int | None = None) -> dict:
    """Return {"acc/<task>", "acc_norm/<task>", "acc_avg", "versions", "n_samples", "n_shot"} from lm-eval.

    `tasks`: names (or one comma-separated string) of lm-eval tasks, groups or tags; acc_avg is the mean
    acc of the names asked for (a group counts once, with its aggregate). `num_fewshot` None keeps each
    task's default; `limit` caps the items per task (an int, or a fraction < 1).
    """
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise ActsparseError(f"tasks must name at least one lm-eval task, got {tasks!r}")
    require_decoder(model, "lm-eval accuracy")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise ActsparseError(f"num_fewshot must be a non-negative integer or None, got {num_fewshot!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ActsparseError(f"batch_size must be a positive integer, got {batch_size!r}")
    lm_eval = _import_lm_eval()
    tm = _manager_for(names)
    check_tasks(names, tm)
    lm = _wrapper_class()(pretrained=model, tokenizer=tok, batch_size=batch_size, backend="causal",
                          max_length=max_length, logits_cache=True)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                                  bootstrap_iters=0, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    return summarize(out, names)


def summarize(out: dict, names: list[str]) -> dict:
    """Flatten lm-eval's results into actsparse's metric names, standard errors included.

    A task's standard error is lm-eval's where it computed one, else the binomial sqrt(p(1-p)/(n-1)) over
    its n items (what lm-eval's mean_stderr gives for 0/1 scores); a group's is that of the item-weighted
    mean of its tasks, sqrt(sum n_i^2 se_i^2) / sum n_i, as is acc_avg's over the names asked for (equal weights).
    `n_samples` are the items scored, `n_total` the items the task has: fewer when `limit` subsampled it.
    """
    res: dict = {}
    results = out.get("results", {})
    counts = {t: v for t, v in out.get("n-samples", {}).items() if isinstance(v, dict)}
    n_of = {t: int(v.get("effective", v.get("original", 0)) or 0) for t, v in counts.items()}
    for group, subtasks in (out.get("group_subtasks") or {}).items():
        if group not in n_of and subtasks:
            n_of[group] = sum(n_of.get(t, 0) for t in subtasks)
    for task, metrics in results.items():
        for m in ("acc", "acc_norm"):
            v = metrics.get(f"{m},none")
            if not isinstance(v, (int, float)) or math.isnan(v):
                continue
            res[f"{m}/{task}"] = float(v)
            se = metrics.get(f"{m}_stderr,none")
            subtasks = (out.get("group_subtasks") or {}).get(task)
            if not isinstance(se, (int, float)) or math.isnan(se):
                if subtasks:
                    parts = [(n_of.get(t, 0), _task_stderr(results.get(t, {}), m, n_of.get(t, 0))) for t in subtasks]
                    parts = [(n, e) for n, e in parts if n and e is not None]
                    se = math.sqrt(sum(n * n * e * e for n, e in parts)) / sum(n for n, _ in parts) if parts else None
                else:
                    se = _task_stderr(metrics, m, n_of.get(task, 0))
            if se is not None:
                res[f"{m}_stderr/{task}"] = float(se)
    accs = [n for n in names if f"acc/{n}" in res]
    if accs:
        res["acc_avg"] = sum(res[f"acc/{n}"] for n in accs) / len(accs)
        if all(f"acc_stderr/{n}" in res for n in accs):
            res["acc_avg_stderr"] = math.sqrt(sum(res[f"acc_stderr/{n}"] ** 2 for n in accs)) / len(accs)
    res["versions"] = {k: v for k, v in out.get("versions", {}).items()}
    res["n_samples"] = dict(n_of)
    res["n_total"] = {k: int(v.get("original", n_of.get(k, 0)) or 0) for k, v in counts.items()}
    res["n_shot"] = dict(out.get("n-shot", {}))
    return res


def _task_stderr(metrics: dict, m: str, n: int) -> float | None:
    """lm-eval's standard error of metric m of one task, or the binomial one from its score and n items."""
    se = metrics.get(f"{m}_stderr,none")
    if isinstance(se, (int, float)) and not math.isnan(se):
        return float(se)
    p = metrics.get(f"{m},none")
    if not isinstance(p, (int, float)) or math.isnan(p) or n < 2:
        return None
    return math.sqrt(p * (1 - p) / (n - 1))
