"""The built-in rule kinds' arithmetic, for the torch backend (the kinds' registry is kinds.py).

A rule kind is a function `apply(rule, x, forward, module) -> (y, n_zero)`:
  x        the tensor at the hook point for the selected tokens, [..., C]
  forward  the original computation from x (the site's linear layer for site points; the whole MLP
           for `layers.{i}.mlp` points; identity for probe points, whose x is already the module's output)
  module   the hooked module (the site's linear, the MLP, or the activation/up module of a probe), for
           rules that read weights (MLP-level predictors, low-rank paths)
  y        what the module returns instead, and n_zero the number of entries of x zeroed (a 0-d tensor;
           kept on device so measuring sparsity never synchronises).
New methods either reuse a kind or register their own with @register_rule (kinds.py); threshold, topk_token,
rotated_topk and rotated_threshold live here because several methods share them.
"""
from __future__ import annotations

import torch

from .kinds import register_rule
from .plan import Rule
from .rotation import rotate


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


def _topk_keep(score: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, False at the k smallest scores (and at ties with the k-th), True elsewhere."""
    kth = score.kthvalue(k, dim=-1, keepdim=True).values
    return score > kth


def _select(score: torch.Tensor, w: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """The keep mask of a Top-K rule: not among the k smallest scores, and never a channel with w_i = 0."""
    keep = _topk_keep(score, k) if k > 0 else None
    if w is not None:
        live = w.to(score.device) > 0
        keep = live.expand_as(score) if keep is None else keep & live
    return keep


@register_rule("topk_token")
def topk_token(rule: Rule, x: torch.Tensor, forward, module=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, zero the n_zero entries of smallest score (ties at the cut too), then forward.

    The score is |x|, or |x_i|·w_i with the optional per-channel weight `w` [C] (WINA's column norms); a
    channel with w_i = 0 multiplies a zero weight column and is always zeroed, at n_zero = 0 too.
    """
    k = int(rule.attrs["n_zero"])
    w = rule.tensors.get("w")
    keep = _select(x.abs() if w is None else x.abs() * w.to(x.device, x.dtype), w, k)
    if keep is None:
        return forward(x), x.new_zeros((), dtype=torch.long)
    return forward(x * keep), (~keep).sum()


def _rotated(rule: Rule, x: torch.Tensor, forward, select) -> tuple[torch.Tensor, torch.Tensor]:
    """y = forward(g ⊙ Q z_s) with z = Qᵀ(x / g) and z_s = z · select(z) (rotation.py says why)."""
    q = rule.tensors["Q"].to(x.device, torch.float32)
    g = rule.tensors["g"].to(x.device, torch.float32)
    z = rotate(x, q, g, torch.float32)                              # [..., C] rotated
    keep = select(z)
    if keep is None:
        n_zero = x.new_zeros((), dtype=torch.long)
    else:
        z = z * keep
        n_zero = (~keep).sum()
    xs = ((z @ q.t()) * g).to(x.dtype)
    return forward(xs), n_zero


@register_rule("rotated_topk")
def rotated_topk(rule: Rule, x: torch.Tensor, forward, module=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, keep the largest-score entries of z = Qᵀ(x / g) and map back: y = forward(g ⊙ Q z_s).

    `Q` [C, C] is orthogonal (columns = the rotated basis), `g` [C] the weight of the norm that produced x
    (x = g ⊙ n), so z is the rotated normalised input that a model with g folded into its weights and its
    residual stream rotated by Q would feed this layer (LaRoSA, WINA's transform). The score is |z|, or
    |z_i|·w_i with the optional `w` [C] (the rotated weight's column norms; channels with w_i = 0 are always
    zeroed). `n_zero` entries of z are zeroed per token (ties at the cut too); with n_zero = 0 and no w
    the rotation still runs, and y equals forward(x) up to rounding. A zero g_i carries nothing forward,
    so its channel of n is taken as 0.
    """
    k = int(rule.attrs["n_zero"])
    w = rule.tensors.get("w")
    return _rotated(rule, x, forward,
                    lambda z: _select(z.abs() if w is None else z.abs() * w.to(z.device, z.dtype), w, k))


@register_rule("rotated_threshold")
def rotated_threshold(rule: Rule, x: torch.Tensor, forward, module=None) -> tuple[torch.Tensor, torch.Tensor]:
    """z = Qᵀ(x / g), z_s = z * 1[|z| > thresh] (scalar or per-channel [C]), y = forward(g ⊙ Q z_s)."""
    t = rule.tensors["thresh"]
    return _rotated(rule, x, forward, lambda z: z.abs() > t.to(z.device, z.dtype))
