"""The built-in rule kinds' arithmetic, for the torch backend (the kinds' registry is kinds.py).

A rule kind is a function `apply(rule, x, forward, module) -> (y, n_zero)`:
  x        the tensor at the hook point for the selected tokens, [..., C]
  forward  the original computation from x (the site's linear layer for site points; the whole MLP
           for `layers.{i}.mlp` points; identity for probe points, whose x is already the module's output)
  module   the hooked module (the site's linear, the MLP, or the activation/up module of a probe), for
           rules that read weights (MLP-level predictors, low-rank paths)
  y        what the module returns instead, and n_zero the number of entries of x zeroed (a 0-d tensor;
           kept on device so measuring sparsity never synchronises).
New methods either reuse a kind or register their own with @register_rule (kinds.py); threshold, topk_token
and rotated_topk live here because several methods share them.
"""
from __future__ import annotations

import torch

from .kinds import register_rule
from .plan import Rule


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
