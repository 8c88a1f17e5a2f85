"""A rotated residual stream: LaRoSA's and WINA's transform folded into the engine's weights.

The torch backend rotates at each read point (`sparsifiers/rotation.py`): z = Qᵀ(x / g), sparsify z, feed
g ⊙ Q z_s to the unmodified linear. Decoding wants no extra product per read, so here the stream itself is
kept rotated, as the papers deploy it. In row vectors, with x the model's stream and s = x Q the engine's:

- an RMSNorm with unit weight commutes with Q (n(s) = n(x) Q), so a read point's normalised input is z itself;
  its norm weight g folds into the readers: W' = W diag(g) Q (q/k/v, gate/up; the norm's weight becomes 1);
- what a block writes into the stream arrives rotated: W_o' = Qᵀ W_o, W_down' = Qᵀ W_down;
- where the basis changes (layer to layer, and between the attention and MLP reads when each has its own),
  an adapter M = Q_aᵀ Q_b moves the stream (s_b = s_a M, one dense [D, D] product in the model's dtype: an fp32
  stream is rounded to it there, as a bf16 model's own residual is at every add); the embedding starts in the
  first basis (E' = E Q), and the head reads the last (W_lm' = W_lm diag(g_f) Q).

Every step is exact algebra (Q orthogonal), so the dense logits do not change beyond rounding. A layer without
a rotation reads in the identity basis. The rules' own g must be the model's norm weight (LaRoSA's fold_norm,
its default): a rotation of the norm's output (fold_norm=False) does not commute with the norm and would need a
[D, D] product at every read, which is refused. Gemma's post-norms and mixture-of-experts layers are refused:
LaRoSA and WINA's transform fit neither. Memory: the folded copy (one layout per matrix) sits beside the model's
weights while the plan is set; replacing one rotated plan by another briefly holds both copies.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .weights import Weights

GROUPS = ("attn", "mlp")


def check_rotations(w: Weights, rotations: dict, n_layers: int) -> None:
    """Raise ValueError where a plan's rotations cannot be folded into these weights (see the module docstring)."""
    d = w.embed.shape[1]
    for (i, group), (q, g) in rotations.items():
        if not 0 <= i < n_layers or group not in GROUPS:
            raise ValueError(f"a rotation at layer {i}, read {group!r}: expected a layer < {n_layers} and a read in "
                             f"{GROUPS}")
        lw = w.layers[i]
        if lw.router is not None or lw.post_attn_norm is not None:
            raise ValueError(f"layers.{i}: a rotated stream folds into pre-norm blocks with one dense MLP; this "
                             "layer is a mixture of experts or has post-norms")
        if tuple(q.shape) != (d, d) or tuple(g.shape) != (d,):
            raise ValueError(f"layers.{i}.{group}: the rotation must be [{d}, {d}] and its norm weight [{d}], got "
                             f"{tuple(q.shape)} and {tuple(g.shape)}")
        norm = (lw.attn_norm if group == "attn" else lw.mlp_norm).float().cpu()
        # in the engine's dtype: a plan fitted on the float32 model meets its bf16 copy here
        if not torch.allclose(g.to(lw.attn_norm.dtype).float().cpu(), norm, rtol=1e-2, atol=1e-6):
            raise ValueError(f"layers.{i}.{group}: the rotation's norm weight is not the model's: it rotates the "
                             "norm's output (LaRoSA fold_norm=False), which does not commute with the norm, so the "
                             "engine would need a [D, D] product at every read; fit with fold_norm=True")
        if (norm == 0).any():
            raise ValueError(f"layers.{i}.{group}: a zero norm weight drops its channel before the rotation, "
                             "which a rotated stream cannot reproduce")


def rotate_weights(w: Weights, rotations: dict, n_layers: int
                   ) -> tuple[Weights, list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]]:
    """(the weights a rotated stream reads, per layer the adapters (M before the attention read, M before the MLP
    read), None where the basis does not change). rotations: {(layer, "attn" | "mlp"): (Q [D, D], g [D])}."""
    dev, dt = w.embed.device, w.embed.dtype
    d = w.embed.shape[1]
    basis = {k: q.to(dev, torch.float32) for k, (q, _) in rotations.items()}

    def left(q, m):  # Qᵀ·m, m [D, N] (a transposed reader or a natural writer), in the model's dtype
        return None if m is None else (q.t() @ m.float()).to(m.dtype)

    def right(m, q):  # m·Q, m [N, D]
        return None if m is None else (m.float() @ q).to(m.dtype)

    def reader(m, g, q, natural: bool):  # W diag(g) Q: natural [N, D] → W·diag(g)·Q; transposed [D, N] → Qᵀ·diag(g)·W
        if m is None:
            return None
        gf = g.float()
        return (m.float() * gf @ q).to(m.dtype) if natural else (q.t() @ (gf[:, None] * m.float())).to(m.dtype)

    layers, adapters = [], []
    first = basis.get((0, "attn"))
    prev = first  # the stream's basis so far (None: the model's own); the embedding starts in layer 0's
    eye = torch.eye(d, device=dev)
    for i, lw in enumerate(w.layers[:n_layers]):
        qa, qm = basis.get((i, "attn")), basis.get((i, "mlp"))
        m_attn = _adapter(prev, qa, eye, dt)
        m_mlp = _adapter(qa, qm, eye, dt)
        prev = qm
        qa = eye if qa is None else qa
        qm = eye if qm is None else qm
        ga, gm = lw.attn_norm, lw.mlp_norm
        # One layout per matrix in the copy: the kernels' transposed one where loaded (cuBLAS reads it as well),
        # so the copy costs one set of the blocks' weights, not two.
        lw = dataclasses.replace(
            lw, wqkv=None if lw.wqkv_t is not None else lw.wqkv, wo=None if lw.wo_t is not None else lw.wo,
            w13=None if lw.wg_t is not None and lw.wu_t is not None else lw.w13,
            wd=None if lw.wd_t is not None else lw.wd)
        inter = None if lw.w13 is None else lw.w13.shape[0] // 2
        layers.append(dataclasses.replace(
            lw, attn_norm=torch.ones_like(ga), mlp_norm=torch.ones_like(gm),
            wqkv=reader(lw.wqkv, ga, qa, True), wqkv_t=reader(lw.wqkv_t, ga, qa, False),
            wo=left(qa, lw.wo), wo_t=right(lw.wo_t, qa),
            w13=None if lw.w13 is None else torch.cat([reader(lw.w13[:inter], gm, qm, True),
                                                        reader(lw.w13[inter:], gm, qm, True)]),
            wg_t=reader(lw.wg_t, gm, qm, False), wu_t=reader(lw.wu_t, gm, qm, False),
            wu=reader(lw.wu, gm, qm, True), wg=reader(lw.wg, gm, qm, True),
            wd=left(qm, lw.wd), wd_t=right(lw.wd_t, qm)))
        adapters.append((m_attn, m_mlp))
    embed = w.embed if first is None else torch.cat([right(c, first) for c in w.embed.split(16384)])
    lm_head = w.lm_head if prev is None else torch.cat(
        [reader(c, w.final_norm, prev, True) for c in w.lm_head.split(16384)])
    final_norm = w.final_norm if prev is None else torch.ones_like(w.final_norm)
    return dataclasses.replace(w, embed=embed, lm_head=lm_head, final_norm=final_norm, layers=layers), adapters


def _adapter(qa: Optional[torch.Tensor], qb: Optional[torch.Tensor], eye: torch.Tensor,
             dtype: torch.dtype) -> Optional[torch.Tensor]:
    """M = Q_aᵀ Q_b [D, D] in dtype (the stream moves from basis a to b: s_b = s_a M); None where a is b."""
    if (qa is None and qb is None) or (qa is not None and qb is not None and torch.equal(qa, qb)):
        return None
    return ((eye if qa is None else qa).t() @ (eye if qb is None else qb)).to(dtype)


def adapt(x: torch.Tensor, m: Optional[torch.Tensor]) -> torch.Tensor:
    """The stream x [B, D] moved by adapter m (in m's dtype, back to x's)."""
    return x if m is None else (x.to(m.dtype) @ m).to(x.dtype)

