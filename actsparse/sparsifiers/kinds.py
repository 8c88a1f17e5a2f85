"""The registry of rule kinds: which function applies each kind of rule, and which module defines it.

A rule kind is a function `apply(rule, x, forward, module) -> (y, n_zero)` (rules.py says what each argument
is). Plans record the module of every kind they use (`rule_module`), so that a fresh interpreter applying a
saved plan imports it (`rule_fn`) without importing the method that fitted it.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import ActsparseError

# (rule: plan.Rule, x, forward, module) -> (y, n_zero); plan.py imports this module, so Rule is not named here
RuleFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
RULE_KINDS: dict[str, RuleFn] = {}


def register_rule(kind: str):
    """Register a rule kind's torch arithmetic under `kind`."""
    def deco(fn: RuleFn) -> RuleFn:
        RULE_KINDS[kind] = fn
        return fn
    return deco


def rule_module(kind: str) -> str | None:
    """Return the module that registered a rule kind (plans record it, so a fresh process can import it)."""
    fn = RULE_KINDS.get(kind)
    return None if fn is None else fn.__module__


def rule_fn(kind: str, module: str | None = None) -> RuleFn:
    """Return the arithmetic of a rule kind, importing the module that defines it when it is not loaded yet.

    Method files register their own kinds when imported, and a plan read back in a fresh interpreter may
    name a kind whose method was never imported there: the built-in methods are imported on a miss, and
    `module` (recorded in the plan for kinds registered outside actsparse) is imported first.
    """
    if kind not in RULE_KINDS and module:
        import importlib

        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ActsparseError(f"rule kind {kind!r} is defined in module {module!r}, which cannot be imported "
                                 f"here ({type(e).__name__}: {e}); install it or import it before sparsify()") from e
    if kind not in RULE_KINDS:
        from .builtin import load_builtin

        load_builtin()
    if kind not in RULE_KINDS:
        raise ActsparseError(f"unknown rule kind {kind!r}; known: {', '.join(sorted(RULE_KINDS))}. A kind "
                             f"registered by a plugin needs that plugin's module imported before sparsify()")
    return RULE_KINDS[kind]
