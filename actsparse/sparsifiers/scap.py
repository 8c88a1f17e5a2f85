"""scap: Statistical Calibrated Activation Pruning with mode-centering (SCAP, arXiv 2412.07174, IntelLabs/SCAP).

What it sparsifies: the input of each chosen site (default the MLP's gate, up and down inputs).
Per site a scalar mode m is subtracted before thresholding and added back through the bias:
    x_s = (x - m) * 1[|x - m| > t],   y = W x_s + b + W (m 1)
with W (m 1) = m * rowsum(W) folded into the bias once at fit time, and t the exact target-quantile
of |x - m|, so the zero fraction of x_s is the target. Modes:
- `zero`: m = 0 (plain magnitude thresholding, TEAL on the chosen sites);
- `median`: m = the median of x over the calibration sample;
- `kde`: candidate modes are the highest peaks of a Gaussian kernel density estimate of x
  (bandwidth: Scott's rule times `kde_bw_adjust`, as the reference's seaborn call with bw_adjust=0.5);
  the candidate whose sparsified output W (x_s + m) is closest (L2) to the dense W x on the
  calibration inputs wins.
`center_roles` limits centering to some roles (the others use m = 0); SCAP centres where inputs are
off-zero, e.g. the down projection of a GELU MLP.

`sequential=True` fits sites in forward order (per layer: q/k/v, o, gate/up, down) with the rules
fitted so far installed, so downstream sites calibrate on already-sparsified inputs — what the
reference gets by calibrating inside one hooked forward pass. Forward passes: `kde` captures the
chosen sites' inputs once; `sequential` runs one pass per layer and stage; each on `calib_tokens`
calibration tokens (default 2048).

The reference's Llama-2 / Mistral calibration (FFN inputs, no centering, calibrated in one sparsifying
forward pass on 16,384 tokens) is conf/method/scap_paper.yaml.

Deliberate differences from the reference:
- thresholds (and the median) come from the calibration statistics' uniform sample (non-sequential)
  or from all captured calibration entries (sequential); the reference uses the first batch it sees;
- KDE candidates are the `kde_candidates` highest local maxima of one binned KDE over the robust
  range (0.1%-99.9% quantiles) instead of the global maxima of three KDEs on 100k/200k/300k-element
  subsamples; the selection criterion (output L2 error) is the reference's;
- the reference's keep test is |x - m| > t too (it zeroes |x - m| <= t), so sparsity matches exactly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F

from ..calibration.quantile import AbsThresholds, quantile
from ..errors import ActsparseError
from ..models.sites import find_sites
from ._calib import calib_windows, collect, fit_in_order, require_model
from .plan import Rule
from .registry import Method, register_method
from .teal import check_roles

@register_method("scap")
class Scap(Method):
    """Mode-centred thresholding of chosen site inputs, the mode folded into the bias."""

    @dataclasses.dataclass
    class Params:
        roles: tuple[str, ...] = ("gate", "up", "down")
        mode: Literal["zero", "median", "kde"] = "kde"
        center_roles: tuple[str, ...] | None = None  # roles that get `mode`; the rest use zero. None: all of `roles`
        sequential: bool = False
        kde_candidates: int = 3
        kde_bw_adjust: float = 0.5
        calib_tokens: int = 2048

        def __post_init__(self):
            check_roles("scap", self.roles)
            if self.center_roles is not None:
                bad = [r for r in self.center_roles if r not in self.roles]
                if bad:
                    raise ActsparseError(f"scap center_roles must be a subset of roles {list(self.roles)}, "
                                         f"got {list(self.center_roles)}")
            if self.kde_candidates < 1:
                raise ActsparseError(f"scap kde_candidates must be >= 1, got {self.kde_candidates}")
            if not self.kde_bw_adjust > 0:
                raise ActsparseError(f"scap kde_bw_adjust must be > 0, got {self.kde_bw_adjust}")
            if self.calib_tokens < 2:
                raise ActsparseError(f"scap calib_tokens must be >= 2, got {self.calib_tokens}")

    @classmethod
    def needs_model_for(cls, params) -> bool:
        return params.sequential or (params.mode != "zero" and params.center_roles != ())

    def fit(self, stats, sparsity, params, model):
        centred = set(params.roles if params.center_roles is None else params.center_roles)
        modes = {r: (params.mode if r in centred else "zero") for r in params.roles}
        if params.sequential:
            require_model("scap", model, "with sequential=True calibrates on sparsified inputs")
        elif any(m != "zero" for m in modes.values()):
            require_model("scap", model, f"with mode={params.mode!r} folds W·m into the bias (and kde "
                                         "compares sparsified outputs)")
        names = [s for s in stats.meta["sites"] if s.rsplit(".", 1)[-1] in params.roles]
        if model is None:  # zero mode only: thresholds straight from the statistics
            return [_rule(s, "zero", 0.0, stats[s].abs_quantile(sparsity), None, sparsity) for s in names]
        sites = find_sites(model)
        windows = calib_windows(stats, params.calib_tokens)

        def fit_one(site, sample, X):
            return _fit_site(site, modes[site.role.rsplit(".", 1)[-1]], sparsity, sample, X,
                             params.kde_candidates, params.kde_bw_adjust)
        if params.sequential:
            return fit_in_order(model, stats, names, windows, lambda site, X: fit_one(site, X.flatten(), X),
                                sequential=True)
        need_x = [s for s in names if modes[s.rsplit(".", 1)[-1]] == "kde"]
        X = collect(model, windows, {s: (sites[s].module, "input") for s in need_x}) if need_x else {}
        return [fit_one(sites[s], stats[s].sample, X.get(s)) for s in names]


def _rule(site: str, mode: str, m: float, t: float, w: torch.Tensor | None, sparsity: float) -> Rule:
    tensors = {"thresh": torch.tensor(t, dtype=torch.float32)}
    if m != 0.0:
        tensors["shift"] = torch.tensor(m, dtype=torch.float32)
        tensors["bias_fold"] = (m * w.double().sum(1)).float()  # W (m 1): [out]
    return Rule(site, "threshold", tensors, attrs={"mode": mode, "m": m}, skips=[site], expected_sparsity=sparsity)


@torch.no_grad()
def _fit_site(site, mode: str, sparsity: float, sample: torch.Tensor, X: torch.Tensor | None,
              n_candidates: int, bw_adjust: float) -> Rule:
    """Choose the mode m and threshold t of one site from a 1-D sample of its input (and X [N, C] for kde)."""
    w = site.weight.detach().float()      # [out, in], on the model's device: the KDE criterion's W·x
    dev = w.device                        # products ([calib tokens x in] x [in x out]) run there
    v = sample.double().flatten()
    if mode == "zero":
        m = 0.0
    elif mode == "median":
        m = quantile(v, 0.5)
    else:
        cands = kde_peaks(v, n_candidates, bw_adjust)
        if len(cands) == 1:
            m = cands[0]
        else:
            Xd = X.to(dev)
            m = min(cands, key=lambda c: _output_error(Xd, w, c, sparsity))
    t = AbsThresholds(v - m, dev)(sparsity)
    return _rule(site.name, mode, m, t, w.cpu(), sparsity)


def _output_error(X: torch.Tensor, w: torch.Tensor, m: float, sparsity: float) -> float:
    """||W (x_s + m) - W x|| over the calibration inputs, for candidate mode m (the reference's criterion)."""
    xc = X.float() - m                                  # [N, C]
    t = AbsThresholds(xc)(sparsity)
    xs = xc * (xc.abs() > t) + m
    return float((F.linear(xs, w) - F.linear(X.float(), w)).norm())


def kde_peaks(v: torch.Tensor, k: int, bw_adjust: float = 0.5, grid: int = 2048) -> list[float]:
    """Return up to k modes of a Gaussian KDE of v (highest density first), on a binned grid."""
    v = v.double().flatten()
    lo, hi = quantile(v, 0.001), quantile(v, 0.999)
    if not hi > lo:
        return [quantile(v, 0.5)]
    v = v[(v >= lo) & (v <= hi)]
    h = bw_adjust * float(v.std()) * v.numel() ** (-0.2)  # Scott's rule, scaled as seaborn's bw_adjust
    width = (hi - lo) / grid
    counts = torch.histc(v, bins=grid, min=lo, max=hi)     # [grid]
    half = min(grid, int(math.ceil(4 * h / width)))
    offs = torch.arange(-half, half + 1, dtype=torch.float64) * width
    kern = torch.exp(-0.5 * (offs / max(h, 1e-300)) ** 2)
    dens = F.conv1d(counts.view(1, 1, -1), kern.view(1, 1, -1), padding=half).view(-1)  # [grid]
    left = torch.cat([dens.new_tensor([-1.0]), dens[:-1]])
    right = torch.cat([dens[1:], dens.new_tensor([-1.0])])
    idx = torch.nonzero((dens > left) & (dens >= right)).flatten()
    if idx.numel() == 0:
        idx = dens.argmax().view(1)
    idx = idx[dens[idx].argsort(descending=True)][:k]
    return [lo + (int(i) + 0.5) * width for i in idx]
