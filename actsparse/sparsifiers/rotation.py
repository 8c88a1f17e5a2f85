"""Residual-stream rotations applied at read points: the algebra LaRoSA and WINA's transform share.

Both methods rotate what a pre-RMSNorm block reads from its residual stream by an orthogonal Q (one per
layer and read group: the attention input read by q/k/v, the MLP input read by gate/up) after folding the
norm's weight g into the reading linears: W' = W diag(g) Q, z = Qᵀ n with n = x / g the normalised input,
so W' z = W x. Instead of rewriting weights and adding residual adapters between layers, the rules rotate
at each read point (`rotated_topk`, `rotated_threshold` in rules.py): z = Qᵀ (x / g), sparsify z, feed
g ⊙ Q z_s to the unmodified linear. The residual stream between read points stays unrotated, which is what
the adapters Q_lᵀ Q_{l+1} would reconstruct. Only the basis differs: LaRoSA takes the PCA of the inputs,
WINA the right singular vectors of the folded k_proj / gate_proj.
"""
from __future__ import annotations

import torch

from ..errors import ActsparseError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
GROUPS = {"attn": ("q", "k", "v"), "mlp": ("gate", "up")}   # read group -> the roles reading its input
ROTATED = GROUPS["attn"] + GROUPS["mlp"]
_NORMS = {"attn": "input_layernorm", "mlp": "post_attention_layernorm"}


def group_of(role: str) -> str:
    """The read group ('attn' or 'mlp') of a role that reads the residual stream."""
    return "attn" if role in GROUPS["attn"] else "mlp"


def require_rotatable(who: str, model) -> None:
    """Raise unless the model is a family whose RMSNorm weights fold into the next linears."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in SUPPORTED:
        raise ActsparseError(f"{who} supports {', '.join(SUPPORTED)} models (pre-RMSNorm blocks whose "
                             f"norm weights fold into the next linears); this model is {kind!r}")


def norm_weights(block, method: str) -> dict[str, torch.Tensor]:
    """The RMSNorm weight g [C] (float32, cpu) in front of each read group of a block."""
    out = {}
    for group, name in _NORMS.items():
        w = getattr(getattr(block.module, name, None), "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ActsparseError(f"{method}: layer {block.layer} has no {name} with a weight; it folds the RMSNorm "
                                 "weights of Llama/Mistral/Qwen2/Qwen3 blocks")
        out[group] = w.detach().float().cpu().clone()
    return out


def normalised(x: torch.Tensor, g: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """n = x / g (the norm's output before its weight); channels with g = 0 carry nothing: 0."""
    g = g.to(x.device, dtype)
    safe = torch.where(g != 0, g, torch.ones_like(g))
    return torch.where(g != 0, x.to(dtype) / safe, torch.zeros((), dtype=dtype, device=x.device))


def rotate(x: torch.Tensor, q: torch.Tensor, g: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """z = Qᵀ (x / g) [..., C]: the input a model with g folded and its stream rotated by Q would read."""
    return normalised(x, g, dtype) @ q.to(x.device, dtype)


def folded(site, g: torch.Tensor) -> torch.Tensor:
    """W diag(g) [out, in] float64: the site's weight with the norm weight in front of it folded in."""
    return site.weight.detach().double().cpu() * g.double()


def svd_basis(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q [C, C] float32 whose columns are w's right singular vectors, and the column norms of w Q [C].

    w Q = U S is column-orthogonal; its column norms are the singular values, and the columns past w's
    rank (all of them beyond out_features when out < in, as in a GQA k_proj) are exactly 0.
    """
    w = w.double()
    _, s, vh = torch.linalg.svd(w, full_matrices=True)         # vh [C, C], s [min(out, in)], descending
    q = vh.t().contiguous()
    norms = (w @ q).norm(dim=0)                                 # [C], recomputed on the rotated weight
    rank = int((s > s.max() * max(w.shape) * torch.finfo(torch.float64).eps).sum()) if s.numel() else 0
    norms[rank:] = 0.0
    return q.float(), norms.float()
