"""The method registry behind asp.fit(name, ...): a method is one decorated class in one file.

A method declares its typed parameters as a dataclass (`Params`, validated in __post_init__) and
implements `fit(stats, sparsity, params, model) -> list[Rule]`. Methods that need forward passes
(greedy allocation, KDE modes, learned predictors) set `needs_model = True` and read the calibration
tokens from `stats.tokens`.
"""
from __future__ import annotations

import dataclasses
import difflib
import time
import typing
from typing import ClassVar

from ..artifacts import content_key
from ..calibration.stats import Stats
from ..errors import ActsparseError
from .builtin import load_builtin
from .plan import Rule, SparsityPlan

METHODS: dict[str, type["Method"]] = {}


class Method:
    """Base class of a sparsification method."""
    name: ClassVar[str] = ""
    needs_model: ClassVar[bool] = False
    uses_target: ClassVar[bool] = True   # False for methods whose sparsity comes from params (dense, nm)

    @dataclasses.dataclass
    class Params:
        pass

    @classmethod
    def needs_model_for(cls, params) -> bool:
        """Whether fitting with these params runs forward passes (some methods need it only for some modes)."""
        return cls.needs_model

    def fit(self, stats: Stats, sparsity: float, params, model) -> list[Rule]:
        raise NotImplementedError


def register_method(name: str):
    """Register a Method subclass under `name`."""
    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def get_method(name: str) -> type[Method]:
    """Return the registered method class, or raise naming close matches."""
    load_builtin()
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), METHODS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ActsparseError(f"unknown method {name!r}{hint}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def methods() -> dict[str, dict[str, dict]]:
    """Return registered method names with their parameters: {method: {param: {type, default}}}."""
    load_builtin()
    out = {}
    for name, cls in sorted(METHODS.items()):
        hints = typing.get_type_hints(cls.Params)
        out[name] = {f.name: {"type": getattr(hints.get(f.name), "__name__", str(hints.get(f.name))),
                              "default": f.default if f.default is not dataclasses.MISSING else None}
                     for f in dataclasses.fields(cls.Params)}
    return out


def make_params(cls: type[Method], params: dict):
    """Build the method's typed Params from a dict, rejecting unknown names and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    unknown = [k for k in params if k not in fields]
    if unknown:
        raise ActsparseError(f"method {cls.name!r} has no parameter(s) {unknown}; "
                             f"its parameters: {', '.join(fields) or 'none'}")
    hints = typing.get_type_hints(cls.Params)
    clean = {}
    for k, v in params.items():
        t = hints[k]
        clean[k] = _coerce(cls.name, k, v, t)
    try:
        return cls.Params(**clean)
    except (TypeError, ValueError) as e:
        raise ActsparseError(f"method {cls.name!r}: {e}") from e


def _coerce(method: str, key: str, v, t):
    origin = typing.get_origin(t)
    if t is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if t is int and isinstance(v, int) and not isinstance(v, bool):
        return v
    if t is bool and isinstance(v, bool):
        return v
    if t is str and isinstance(v, str):
        return v
    if origin is typing.Literal:
        if v in typing.get_args(t):
            return v
        raise ActsparseError(f"method {method!r}: {key} must be one of {list(typing.get_args(t))}, got {v!r}")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for a in typing.get_args(t):
            if a is type(None) and v is None:
                return None
            try:
                return _coerce(method, key, v, a)
            except ActsparseError:
                pass
    if (t in (list, tuple) or origin in (list, tuple)) and isinstance(v, (list, tuple)):
        return list(v) if list in (t, origin) else tuple(v)
    if t is typing.Any:
        return v
    name = getattr(t, "__name__", str(t))
    raise ActsparseError(f"method {method!r}: {key} must be {name}, got {v!r} ({type(v).__name__})")


def check_sparsity(sparsity) -> float:
    """Return sparsity as float, or raise unless it is a number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ActsparseError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ActsparseError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def fit(method: str, stats: Stats, sparsity: float = 0.0, model=None, **params) -> SparsityPlan:
    """Return the SparsityPlan of `method` at target `sparsity`, fitted on calibration `stats`."""
    cls = get_method(method)
    sparsity = check_sparsity(sparsity)
    p = make_params(cls, params)
    if not isinstance(stats, Stats):
        raise ActsparseError(f"stats must come from asp.calibrate(), got {type(stats).__name__}")
    if cls.needs_model_for(p) and model is None:
        raise ActsparseError(f"method {method!r} runs forward passes while fitting: pass model=...")
    target = sparsity if cls.uses_target else 0.0
    t0 = time.perf_counter()
    rules = cls().fit(stats, target, p, model)
    p_dict = dataclasses.asdict(p)
    site_params = {s: int(i * o) for s, (i, o) in stats.meta["sites"].items()}
    meta = {"stats_key": stats.key, "plan_key": content_key(stats.key, method, p_dict, target),
            "fit_s": time.perf_counter() - t0, "model": stats.meta.get("model")}
    return SparsityPlan(method, p_dict, target, {r.point: r for r in rules}, site_params, meta)
