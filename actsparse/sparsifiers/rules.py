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
        from .registry import _load_builtin

        _load_builtin()
    if kind not in RULE_KINDS:
        raise ActsparseError(f"unknown rule kind {kind!r}; known: {', '.join(sorted(RULE_KINDS))}. A kind "
                             f"registered by a plugin needs that plugin's module imported before sparsify()")
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


@register_rule("topk_token")
def topk_token(rule: Rule, x: torch.Tensor, forward, module=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, zero the n_zero smallest-|x| entries (ties at the cut are zeroed too), then forward."""
    k = int(rule.attrs["n_zero"])
    if k <= 0:
        return forward(x), x.new_zeros((), dtype=torch.long)
    kth = x.abs().kthvalue(k, dim=-1, keepdim=True).values
    keep = x.abs() > kth
    return forward(x * keep), (~keep).sum()


@register_rule("rotated_topk")
def rotated_topk(rule: Rule, x: torch.Tensor, forward, module=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, keep the largest-|z| entries of z = Qᵀ(x / g) and map back: y = forward(g ⊙ Q z_s).

    `Q` [C, C] is orthogonal (columns = the rotated basis), `g` [C] the weight of the norm that produced x
    (x = g ⊙ n), so z is the rotated normalised input that a model with g folded into its weights and its
    residual stream rotated by Q would feed this layer (LaRoSA). `n_zero` entries of z are zeroed per
    token (ties at the cut too); with n_zero = 0 the rotation still runs, and y equals forward(x) up to
    rounding. A zero g_i carries nothing forward, so its channel of n is taken as 0.
    """
    q = rule.tensors["Q"].to(x.device, torch.float32)
    g = rule.tensors["g"].to(x.device, torch.float32)
    xf = x.float()
    n = torch.where(g != 0, xf / torch.where(g != 0, g, torch.ones_like(g)), torch.zeros_like(xf))
    z = n @ q                                                       # [..., C] rotated
    k = int(rule.attrs["n_zero"])
    if k > 0:
        kth = z.abs().kthvalue(k, dim=-1, keepdim=True).values
        keep = z.abs() > kth
        z = z * keep
        n_zero = (~keep).sum()
    else:
        n_zero = x.new_zeros((), dtype=torch.long)
    xs = ((z @ q.t()) * g).to(x.dtype)
    return forward(xs), n_zero
