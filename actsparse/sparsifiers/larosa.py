"""larosa: layerwise rotated Top-K activation sparsity (LaRoSA, Liu et al., ICML 2025, arXiv 2507.01299).

Per layer l, an orthogonal Q_l from PCA of the layer's calibration inputs: the eigenvectors, by
descending eigenvalue, of C_l = sum_t n_t n_tᵀ over the normalised inputs n of the attention block
(h1) and of the MLP (h3), n = x / g with g the RMSNorm weight (the paper folds g into the next
linears first, which makes the rotation exact: RMSNorm(h Q) = RMSNorm(h) Q with a unit weight).
The rotated input z = Q_lᵀ n is sparsified per token by Top-K, keeping the (1 - sparsity) C
largest |z|, so every token's sparsity is the target by construction. The o and down inputs (h2, h4)
are sparsified by per-token Top-K in their own basis (`topk_token`), the same fraction.

How the rotation runs: the paper rotates the residual stream by Q_l inside layer l, folds Q_l into the
weights (W diag(g) Q_l at q/k/v/gate/up, Q_lᵀ W at o/down) and adds residual adapters Q_lᵀ Q_{l+1}
between layers. The torch backend computes the same thing without touching a weight: each read point
of the residual stream maps its input x to z = Q_lᵀ (x / g), drops the small entries, and feeds
g ⊙ Q_l z_s to the unmodified linear, since W diag(g) Q_l z_s = W (g ⊙ Q_l z_s). The unrotated
residual stream between read points is what the adapters Q_lᵀ Q_{l+1} reconstruct, so they need not
exist here, and `sparsify` leaves the model's weights as they were (nothing to copy, nothing to lift).
The plan holds Q_l once per layer (shared by that layer's q/k/v/gate/up rules, saved once). Cost on
the torch backend: two [C x C] products per read point and token, acceptable for quality runs.
Supported families: Llama, Mistral, Qwen2 and Qwen3 (pre-RMSNorm blocks with input_layernorm and
post_attention_layernorm, whose weight multiplies the normalised input); others are refused (Gemma's
norm scales by 1 + weight; MoE blocks have no single MLP input to Top-K). The decode engine (`eval=speed`) does
fold the rotation, as the paper deploys it: engine/rotation.py keeps its residual stream rotated, and each token's
Top-K is found on the device before every op (batch 1; fold_norm=False is refused there).

Deliberate differences from the paper:
- rotation applied at the read points instead of folded into weights (same arithmetic; a fused-weight
  deployment would fold W diag(g) Q_l and add the adapters);
- one uniform Top-K fraction at every sparsified input; the paper's per-layer/per-block sparsity
  choices are not reproduced;
- the covariance is taken over `calib_tokens` calibration tokens of the dense model.

The public code (alibaba/EfficientAI, larosa/gen_act/grab_acts_rotate_diff_Q_llama.py and
larosa/inference/) differs from the paper's description in ways two options reproduce:
`bases='block_input'` takes one basis per read group, from the attention input's covariance for
q/k/v and from the MLP input's for gate/up (the code's separate D for self_attn and mlp), and
`fold_norm=False` takes the covariance of, and rotates, the norm's output x itself (the code never
folds g; the rotation stays exact either way). conf/method/larosa_paper.yaml sets both, with the
code's 10 x 2,048 WikiText-2 train tokens. Kept different from that code: it masks the rotated input
with a threshold read from a histogram of rotated Alpaca activations (TEAL's icdf(0.5 + s/2)), here
it is per-token Top-K as the paper describes; its o and down inputs are thresholded likewise.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from ..errors import ActsparseError
from ..models.sites import find_blocks
from ._calib import calib_windows, collect, require_model
from .plan import Rule
from .registry import Method, register_method
from .rotation import ROTATED, group_of, norm_weights, normalised, require_rotatable
from .teal import check_roles

LAROSA_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@register_method("larosa")
class Larosa(Method):
    """Rotate each layer's attention and MLP inputs by the PCA basis of its calibration inputs, then Top-K per token."""

    needs_model = True   # the rotation comes from the model's own inputs and norm weights

    @dataclasses.dataclass
    class Params:
        roles: tuple[str, ...] = LAROSA_ROLES
        calib_tokens: int = 2048
        bases: Literal["layer", "block_input"] = "layer"   # one Q per layer, or one per attention / MLP input
        fold_norm: bool = True    # rotate x / g (g folded into the readers), or the norm's output x itself

        def __post_init__(self):
            check_roles("larosa", self.roles)
            bad = [r for r in self.roles if r not in LAROSA_ROLES]
            if bad:
                raise ActsparseError(f"larosa roles must be a subset of {list(LAROSA_ROLES)}, got {list(self.roles)}")
            if self.calib_tokens < 2:
                raise ActsparseError(f"larosa calib_tokens must be >= 2, got {self.calib_tokens}")

    def fit(self, stats, sparsity, params, model):
        require_model("larosa", model, "computes each layer's rotation from the model's inputs")
        require_rotatable("larosa", model)
        windows = calib_windows(stats, params.calib_tokens)
        rules: list[Rule] = []
        for b in find_blocks(model):
            norms = norm_weights(b, "larosa")
            if not params.fold_norm:
                norms = {p: torch.ones_like(g) for p, g in norms.items()}
            readers = {"attn": b.sites["q"], "mlp": b.sites["gate"]}
            if any(r in params.roles for r in ROTATED):
                X = collect(model, windows, {p: (s.module, "input") for p, s in readers.items()},
                            stop_after=b.module)
                n = {p: normalised(X[p], norms[p]) for p in readers}
                if params.bases == "layer":
                    q = dict.fromkeys(readers, pca_basis(list(n.values())))
                else:
                    q = {p: pca_basis([n[p]]) for p in readers}
            for role in params.roles:
                site = b.sites[role]
                c = site.in_features
                n_zero = int(round(sparsity * c))
                if role in ROTATED:
                    grp = group_of(role)
                    rules.append(Rule(site.name, "rotated_topk", {"Q": q[grp], "g": norms[grp]},
                                      attrs={"n_zero": n_zero},
                                      skips=[site.name], expected_sparsity=n_zero / c))
                else:
                    rules.append(Rule(site.name, "topk_token", attrs={"n_zero": n_zero}, skips=[site.name],
                                      expected_sparsity=n_zero / c))
        return rules


def pca_basis(parts: list[torch.Tensor]) -> torch.Tensor:
    """Q [C, C] float32: eigenvectors of sum_t n_t n_tᵀ over every row of `parts`, by descending eigenvalue."""
    cov = sum(p.t() @ p for p in parts)                       # [C, C] float64
    _, vecs = torch.linalg.eigh(cov)                          # ascending eigenvalues
    return vecs.flip(-1).float().contiguous()
