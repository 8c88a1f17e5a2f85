"""wina: weight-informed activation sparsity (WINA, Chen et al., arXiv 2505.19427; code: microsoft/wina).

Channel i of a site's input x is kept when |x_i| * ||W_{:,i}||_2 is large, W [out, in] the weight that
reads x: the activation's magnitude times the norm of the weight column it multiplies, which bounds the
channel's contribution ||W_{:,i} x_i|| to the output.

Selection (`selection`):
- `threshold` (default): x_s = x * 1[|x_i| ||W_{:,i}|| > t], i.e. a per-channel threshold t / ||W_{:,i}||
  on |x|, so without the transform the plan is ordinary `threshold` rules with [C] thresholds, run as is
  by the torch backend and the triton kernels (`eval=speed` measures it). t is the target quantile of the
  scores over every entry of the site's inputs on `calib_tokens` calibration tokens (captured one layer
  at a time), so the zero fraction of x_s is the target.
- `topk`: per token, keep the int(C (1 - s)) channels of largest score (`topk_token` rules;
  `rotated_topk` under the transform), the reference evaluation's `mask_by='topk'`: every token's
  sparsity is the target. The kernels have no Top-K, so `eval=speed` skips these plans.

Sites that read one input (q/k/v; gate/up) each get their own mask, as in the reference.
`column_norms` picks the weights that score each site:
- `reference` (default, microsoft/wina's code): the attention input is scored with k_proj's column
  norms at k and plain |x| at q and v; the MLP input with gate_proj's norms at gate and |x| at up; o and
  down by |x|. A fused qkv or an ungated MLP's up projection (an MoE expert's too) is scored with its
  own norms (the reference's fused-projection path).
- `own`: every site with its own weight's column norms (the paper's criterion applied per layer).

The transform (`transform=True`, the reference's `--transform`, utils/tensor_transform.py there): fold
each RMSNorm weight g into the linears that read its output and rotate what every layer reads by Q, the
right singular vectors of the folded k_proj (attention input) or gate_proj (MLP input), so that those
two matrices become column-orthogonal, the condition of the paper's optimality bound; the scores then
use the column norms of the rotated weights W diag(g) Q. The rotated k_proj of a GQA model has
in - out columns of norm 0 (a tiny model with 2 of 4 KV heads: half); their inputs are always dropped,
at no cost, and count as skipped weight reads, so a site's expected sparsity is the larger of its level
and that fraction. The rotation runs at the read points (rotation.py, shared with larosa): rules
`rotated_threshold` / `rotated_topk` map x to z = Qᵀ(x / g), drop low-score entries and feed g ⊙ Q z_s
to the unmodified linear, which equals the transformed model's W diag(g) Q z_s; the model's weights
stay as they are. o and down read unrotated inputs (the transform rotates their outputs, which leaves
their column norms unchanged). Supported families: Llama, Mistral, Qwen2, Qwen3; others are refused.

Allocation: `uniform` (every site at the target) or `greedy` (TEAL's block-wise greedy search, shared
with `teal`: the same trajectory, each level's mask a threshold on the WINA scores, as the reference's
greedyopt.py runs it also when evaluating by Top-K). `sequential=True` (uniform thresholds only) fits
layer l on inputs computed with layers < l already sparsified. The reference's protocol (transform,
greedy at step 0.025 with the first 1% of positions dense, Top-K) is conf/method/wina_paper.yaml.

Deliberate differences from the reference:
- the transform rotates at the read points instead of rewriting the weights and adding the residual
  adapters Q_lᵀ Q_{l+1} (same arithmetic up to rounding; the reference also casts the rotated weights
  back to the model's dtype). The reference's fuse_layernorm also subtracts each embedding row's mean,
  a LayerNorm step (SliceGPT's) that changes an RMSNorm model's function; it is not done here, so the
  dense model's logits are unchanged. The final norm and the LM head, which nothing sparsifies, are
  left alone;
- channels whose (rotated) weight column has norm 0 are always dropped and counted as skipped reads;
  the reference's Top-K keeps int(C (1 - s)) entries, zero-norm columns among them when s is below
  their fraction (the same output), and counts s;
- thresholds are exact quantiles over the captured calibration inputs (the reference fits a
  histogram and reads its inverse CDF);
- the greedy search's relative site sizes come from the weight shapes (the reference hard-codes them
  per model), and it stops at the target instead of always running to 0.66;
- the reference's Phi-3 fused qkv / gate_up path is not offered with the transform.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Literal

import torch

from ..calibration.quantile import AbsThresholds
from ..errors import ActsparseError
from ..models.sites import Site, find_blocks, find_sites
from ._calib import calib_windows, collect, fit_in_order, require_model
from .plan import Rule
from .registry import Method, register_method
from .rotation import ROTATED, folded, group_of, norm_weights, require_rotatable, rotate, svd_basis
from .rules import rotated_threshold
from .greedy import greedy_rules
from .teal import ThresholdParams, threshold_rule

# the site of each shared input whose column norms score it in the reference code
_REFERENCE_SCORED = ("k", "qkv", "gate")
# the site whose folded weight the transform makes column-orthogonal, per read group
_BASIS_OF = {"attn": "k", "mlp": "gate"}


def scoring_norms(site: Site, column_norms: str, gated: bool) -> torch.Tensor | None:
    """The column norms ||W_{:,i}||_2 [in] that score this site's input, or None for plain |x|."""
    role = site.role.rsplit(".", 1)[-1]
    if column_norms == "own" or role in _REFERENCE_SCORED or (role == "up" and not gated):
        return site.weight.detach().float().norm(dim=0)
    return None


@dataclasses.dataclass
class Score:
    """How one site's input is scored: |z_i| * w_i with z = Qᵀ(x / g) under the transform, else z = x."""
    w: torch.Tensor | None = None     # [C] column norms, None for plain |z|
    q: torch.Tensor | None = None     # [C, C] rotation, shared by the sites that read one input
    g: torch.Tensor | None = None     # [C] norm weight folded into the readers

    @functools.cached_property
    def n_dead(self) -> int:
        """Channels that multiply a zero weight column: always dropped."""
        return 0 if self.w is None else int((self.w == 0).sum())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = x if self.q is None else rotate(x, self.q, self.g, torch.float32)   # as the rules rotate
        return z.abs() if self.w is None else z.abs() * self.w.to(z.device, z.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in (("Q", self.q), ("g", self.g), ("w", self.w)) if v is not None}


def site_scores(model, params, names=None) -> dict[str, Score]:
    """The Score of every site (of those in `names`): its column norms and, with the transform, its rotation."""
    out = {}
    for b in find_blocks(model):
        sites = {r: s for r, s in b.sites.items() if names is None or s.name in names}
        if not sites:
            continue
        gated = {s.name: m.gated for m in b.mlps for s in m.sites.values()}
        bases = {}
        if params.transform:
            g = norm_weights(b, "wina")
            bases = {grp: (*svd_basis(folded(b.sites[r], g[grp])), g[grp]) for grp, r in _BASIS_OF.items()}
        for role, site in sites.items():
            if role not in ROTATED or not bases:
                out[site.name] = Score(scoring_norms(site, params.column_norms, gated.get(site.name, False)))
                continue
            q, w, g = bases[group_of(role)]
            if role not in _BASIS_OF.values():
                w = (folded(site, g) @ q.double()).norm(dim=0).float() if params.column_norms == "own" else None
            out[site.name] = Score(w, q, g)
    return out


class WinaThresholds:
    """Per-channel thresholds t(level) / w_i on |z| from the sorted scores |z_i| w_i of one site."""

    def __init__(self, X: torch.Tensor, score: Score, device):
        self.score = Score(*(None if t is None else t.to(device) for t in (score.w, score.q, score.g)))
        self.sorted = AbsThresholds(self.score(X.to(device)))   # [N, C] scores, sorted once

    def __call__(self, level: float):
        t = self.sorted(level)
        w = self.score.w
        if w is None or (t <= 0.0 and self.score.n_dead == 0):
            return t
        # a zero column is never kept
        return torch.where(w > 0, t / w.clamp_min(torch.finfo(torch.float32).tiny), torch.inf)

    def mask(self, x: torch.Tensor, t) -> torch.Tensor:
        """The site's input with its low-score entries dropped (in the rotated basis under the transform)."""
        if self.score.q is None:
            return x * (x.abs() > t)
        rule = Rule("", "rotated_threshold", {"Q": self.score.q, "g": self.score.g, "thresh": torch.as_tensor(t)})
        return rotated_threshold(rule, x, lambda xs: xs)[0]


def wina_rule(site: Site, score: Score, level: float, selection: str, thresholds=None, **attrs) -> Rule:
    """The site's rule at a sparsity level: Top-K per token, or the threshold `thresholds(level)`."""
    c = site.in_features
    if selection == "topk":
        n_zero = c - int(c * (1.0 - level))                      # the reference keeps int(C (1 - s))
        kind = "topk_token" if score.q is None else "rotated_topk"
        return Rule(site.name, kind, score.tensors(), attrs={"n_zero": n_zero, **attrs}, skips=[site.name],
                    expected_sparsity=max(n_zero, score.n_dead) / c)
    expected = max(level, score.n_dead / c)
    if score.q is None:
        return threshold_rule(site.name, thresholds(level), expected, **attrs)
    t = torch.as_tensor(thresholds(level), dtype=torch.float32)
    return Rule(site.name, "rotated_threshold", {"Q": score.q, "g": score.g, "thresh": t}, attrs=attrs,
                skips=[site.name], expected_sparsity=expected)


@dataclasses.dataclass
class WinaParams(ThresholdParams):
    method: ClassVar[str] = "wina"
    column_norms: Literal["reference", "own"] = "reference"
    transform: bool = False                               # fold norms, rotate by SVD of k_proj / gate_proj
    selection: Literal["threshold", "topk"] = "threshold"

    def __post_init__(self):
        super().__post_init__()
        if self.sequential and self.selection == "topk":
            raise ActsparseError("wina: sequential=True fits thresholds on sparsified inputs; selection='topk' "
                                 "has no thresholds to fit (drop sequential, or use selection='threshold')")


@register_method("wina")
class Wina(Method):
    """Score each site input by |x_i| * ||W_{:,i}||_2 (optionally in WINA's rotated basis); threshold or Top-K it."""

    Params = WinaParams
    needs_model = True   # the scores read the weights

    def fit(self, stats, sparsity, params, model):
        require_model("wina", model, "scores inputs with the weights' column norms")
        if params.transform:
            require_rotatable("wina with transform=True", model)
        sites = find_sites(model)
        names = [s for s in stats.meta["sites"] if s.rsplit(".", 1)[-1] in params.roles]
        missing = [s for s in names if s not in sites]
        if missing:
            raise ActsparseError(f"wina: the stats name sites this model lacks ({missing[:3]}); "
                                 "fit with the model the stats were calibrated on")
        score = site_scores(model, params, set(names))
        windows = calib_windows(stats, params.calib_tokens)
        dev = next(model.parameters()).device

        if params.allocation == "greedy":
            blocks = {b.layer: b.module for b in find_blocks(model)}

            def block_thresholds(stats, block_sites):
                X = collect(model, windows, {s.name: (s.module, "input") for s in block_sites},
                            stop_after=blocks[block_sites[0].layer])
                return {s.name: WinaThresholds(X[s.name], score[s.name], dev) for s in block_sites}

            def rule(name, thresholds, level, **attrs):
                return wina_rule(sites[name], score[name], level, params.selection, thresholds, **attrs)
            return greedy_rules(stats, sparsity, params, model, thresholds=block_thresholds,
                                tag=(params.column_norms, params.transform), rule=rule)
        if params.selection == "topk":
            return [wina_rule(sites[n], score[n], sparsity, "topk") for n in names]
        return fit_in_order(model, stats, names, windows,
                            lambda site, X: wina_rule(site, score[site.name], sparsity, "threshold",
                                                      WinaThresholds(X, score[site.name], dev),
                                                      sequential=params.sequential),
                            sequential=params.sequential)
