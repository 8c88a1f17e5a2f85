"""Rule kinds: the arithmetic of each kind of rule, for the torch backend.

A rule kind is a function `apply(rule, x, forward, module) -> (y, n_zero)`:
  x        the tensor at the hook point for the selected tokens, [..., C]
  forward  the original computation from x (the site's linear layer for site points; the whole MLP
           for `layers.{i}.mlp` points; identity for probe points, whose x is already the module's output)
  module   the hooked module (the site's linear, the MLP, or the activation/up module of a probe), for
           rules that read weights (MLP-level predictors, low-rank paths)
  y        what the module returns instead, and n_zero the number of entries of x zeroed (a 0-d tensor;
           kept on device so measuring sparsity never synchronises).
New methods either reuse a kind or register their own with @register_rule.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import ActsparseError
from .plan import Rule

RuleFn = Callable[[Rule, torch.Tensor, Callable[[torch.Tensor], torch.Tensor], torch.nn.Module],
                  tuple[torch.Tensor, torch.Tensor]]
RULE_KINDS: dict[str, RuleFn] = {}


def register_rule(kind: str):
    """Register a rule kind's torch arithmetic under `kind`."""
    def deco(fn: RuleFn) -> RuleFn:
        RULE_KINDS[kind] = fn
        return fn
    return deco


def rule_fn(kind: str) -> RuleFn:
    """Return the arithmetic of a rule kind, or raise naming the known kinds."""
    if kind not in RULE_KINDS:
        raise ActsparseError(f"unknown rule kind {kind!r}; known: {', '.join(sorted(RULE_KINDS))}")
    return RULE_KINDS[kind]


@register_rule("threshold")
def threshold(rule: Rule, x: torch.Tensor, forward, module=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x_s = (x - m) * 1[|x - m| > t]; y = forward(x_s) + bias_fold, where bias_fold = W·m (folded once).

    `thresh` is a scalar or per-channel [C]; `shift` (m) and `bias_fold` are optional. Without a shift
    this is TEAL/CATS magnitude thresholding: x * 1[|x| > t].
    """
    t = rule.tensors["thresh"].to(x.device, x.dtype)
    m = rule.tensors.get("shift")
    xc = x if m is None else x - m.to(x.device, x.dtype)
    keep = xc.abs() > t
    xs = xc * keep
    y = forward(xs)
    fold = rule.tensors.get("bias_fold")
    if fold is not None:
        y = y + fold.to(y.device, y.dtype)
    return y, (~keep).sum()
