"""wina: weight-informed thresholding of site inputs (WINA, Chen et al., arXiv 2505.19427; code: microsoft/wina).

Channel i of a site's input x is kept when |x_i| * ||W_{:,i}||_2 > t, W [out, in] the weight that reads
x: the activation's magnitude times the norm of the weight column it multiplies, which bounds the
channel's contribution ||W_{:,i} x_i|| to the output. That is a per-channel threshold on |x|:
    x_s = x * 1[|x| > t / ||W_{:,i}||_2]
so the plan is an ordinary `threshold` rule with a [C] threshold, run as is by the torch backend and by
the triton kernels (per-channel thresholds), and `eval=speed` measures it. t is the target quantile of
the scores |x_i| ||W_{:,i}|| over every entry of the site's inputs on `calib_tokens` calibration tokens
(captured one layer at a time), so the zero fraction of x_s is the target.

Sites that read one input (q/k/v; gate/up) each get their own threshold and mask, as in the reference.
`column_norms` picks the weights that score each site:
- `reference` (default, microsoft/wina's code): the attention input is scored with k_proj's column
  norms at k and plain |x| at q and v; the MLP input with gate_proj's norms at gate and |x| at up; o and
  down by |x|. A fused qkv or an ungated MLP's up projection is scored with its own norms (the
  reference's fused-projection path).
- `own`: every site with its own weight's column norms (the paper's criterion applied per layer).

Allocation: `uniform` (every site at the target) or `greedy` (TEAL's block-wise greedy search, shared
with `teal`: the same trajectory, each level's threshold taken from the WINA scores; the reference's
greedyopt.py does the same). `sequential=True` (uniform only) fits layer l on inputs computed with
layers < l already sparsified.

Deliberate differences from the reference:
- no "tensor transformation": the reference (with --transform) first rotates the residual stream by the
  SVD of k_proj / gate_proj so that those matrices become column-orthogonal, the condition of the
  paper's optimality bound; here the criterion runs on the model as given;
- thresholds (a fixed t per site, from calibration) instead of the reference evaluation's per-token
  top-k (`mask_by='topk'`), so a token's sparsity varies around the target while the kernels stay
  threshold kernels;
- the quantile is exact over the captured calibration inputs (the reference fits a histogram).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch

from ..calibration.quantile import AbsThresholds
from ..errors import ActsparseError
from ..models.sites import Site, find_blocks, find_sites
from ._calib import calib_windows, collect, fit_in_order, require_model
from .registry import Method, register_method
from .teal import ThresholdParams, greedy_rules, threshold_rule

# the site of each shared input whose column norms score it in the reference code
_REFERENCE_SCORED = ("k", "qkv", "gate")


def scoring_norms(site: Site, column_norms: str, gated: bool) -> torch.Tensor | None:
    """The column norms ||W_{:,i}||_2 [in] that score this site's input, or None for plain |x|."""
    role = site.role.rsplit(".", 1)[-1]
    if column_norms == "own" or role in _REFERENCE_SCORED or (role == "up" and not gated):
        return site.weight.detach().float().norm(dim=0)
    return None


class WinaThresholds:
    """Per-channel thresholds t(level) / ||W_{:,i}|| from the sorted scores |x_i| ||W_{:,i}|| of one site."""

    def __init__(self, X: torch.Tensor, norms: torch.Tensor | None, device):
        self.norms = None if norms is None else norms.to(device)
        x = X.to(device)
        self.sorted = AbsThresholds(x if norms is None else x * self.norms)   # [N, C] scores, sorted once

    def __call__(self, level: float):
        t = self.sorted(level)
        if self.norms is None or t <= 0.0:
            return t
        return t / self.norms.clamp_min(torch.finfo(torch.float32).tiny)   # [C]; a zero column is never kept


@dataclasses.dataclass
class WinaParams(ThresholdParams):
    method: ClassVar[str] = "wina"
    column_norms: Literal["reference", "own"] = "reference"


@register_method("wina")
class Wina(Method):
    """Threshold each site input on |x_i| * ||W_{:,i}||_2 (per-channel thresholds), uniformly or by greedy allocation."""

    Params = WinaParams
    needs_model = True   # the scores read the weights

    def fit(self, stats, sparsity, params, model):
        require_model("wina", model, "scores inputs with the weights' column norms")
        sites = find_sites(model)
        names = [s for s in stats.meta["sites"] if s.rsplit(".", 1)[-1] in params.roles]
        missing = [s for s in names if s not in sites]
        if missing:
            raise ActsparseError(f"wina: the stats name sites this model lacks ({missing[:3]}); "
                                 "fit with the model the stats were calibrated on")
        gated = {b.layer: b.gated for b in find_blocks(model)}
        windows = calib_windows(stats, params.calib_tokens)
        dev = next(model.parameters()).device

        def thresholds_of(site, X):
            return WinaThresholds(X, scoring_norms(site, params.column_norms, gated[site.layer]), dev)

        if params.allocation == "greedy":
            blocks = {b.layer: b.module for b in find_blocks(model)}

            def block_thresholds(stats, block_sites):
                X = collect(model, windows, {s.name: (s.module, "input") for s in block_sites},
                            stop_after=blocks[block_sites[0].layer])
                return {s.name: thresholds_of(s, X[s.name]) for s in block_sites}
            return greedy_rules(stats, sparsity, params, model, thresholds=block_thresholds,
                                tag=(params.column_norms,))
        return fit_in_order(model, stats, names, windows,
                            lambda site, X: threshold_rule(site.name, thresholds_of(site, X)(sparsity), sparsity,
                                                           sequential=params.sequential),
                            sequential=params.sequential)
