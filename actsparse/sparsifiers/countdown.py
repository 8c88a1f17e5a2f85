"""countdown: COUNTDOWN's indirect-coefficient activation sparsity (arXiv 2505.17701, rustic-snob/COUNTDOWN).

COUNTDOWN views the MLP output as down · (act(g) ⊙ u) = sum_i (act(g_i) u_i) d_i and sparsifies the
coefficients of the down projection's columns rather than act(g) alone (as CATS does). Modes:

- `m` (M-COUNTDOWN, gated MLPs): keep neuron i where |u_i| > tau_l, u = up·x, with tau_l the
  exact target-quantile of |u| over the calibration sample (the `up_out` probe). `up` is read in full
  (its output decides the mask); `gate` rows and `down` columns of dropped neurons are skipped.
- `d` (D-COUNTDOWN): per layer a low-rank predictor logit = x V U^T (V [H, r], U [F, r]) of which
  neurons hold the per-token top (1 - s) of |act(g) ⊙ u|, trained with binary cross-entropy on the
  calibration tokens (AdamW, weight decay 0.01; init: the scaled singular vectors of a Xavier-uniform
  matrix, as the reference); neurons whose logit is below the layer's threshold are dropped, so all
  MLP projections skip them. The predictor's r (H + F) weights are read every decode step and count
  against effective sparsity (`extra_params`). Uses `calib_tokens` calibration tokens (default 4096),
  `train_steps` minibatches of `batch_tokens` tokens.
- `oracle`: the per-token top (1 - s) of |act(g) ⊙ u| exactly (what D-COUNTDOWN's predictor tries to
  predict): an upper bound for analysis, not a deployable method; its accounting assumes a free oracle.

The reference's practical M-COUNTDOWN runs (0.7 / 0.8 / 0.9, every position) are
conf/method/countdown_paper.yaml with sweeps/countdown_paper.yaml.

Deliberate differences from the reference:
- M-COUNTDOWN's tau_l is the global quantile of |u| over the calibration sample (the same estimator
  our CATS uses, so the two compare on the choice of signal only); the reference averages per-token
  kth-value thresholds;
- D-COUNTDOWN's decision threshold is the per-layer quantile of the predictor's logits on the
  calibration tokens, so the predicted sparsity matches the target; the reference thresholds logits
  at 0, which leaves the sparsity to the classifier's calibration;
- predictor training is full-precision Adam(W) at `lr` for `train_steps` steps (CPU-sized defaults),
  not the reference's bf16 run with an inverse-sqrt schedule at lr 2e-5 over a large trace set.
At target 0, `d` emits no rules (a predictor that drops nothing would only cost reads).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F

from ..calibration.quantile import quantile
from ..errors import ActsparseError
from ..models.sites import find_blocks
from ._calib import calib_windows, collect, mlp_intermediate, mlp_parts, require_model
from .cats import gated_mlps
from .plan import Rule
from .registry import Method, register_method
from .kinds import register_rule


@register_method("countdown")
class Countdown(Method):
    """M-COUNTDOWN (threshold |up·x|), D-COUNTDOWN (learned low-rank predictor) or the top-k oracle."""

    @dataclasses.dataclass
    class Params:
        mode: Literal["m", "d", "oracle"] = "m"
        rank: int = 0               # d: predictor rank; 0 = hidden_size // 8
        train_steps: int = 300
        lr: float = 1e-2
        batch_tokens: int = 1024
        calib_tokens: int = 4096
        seed: int = 0

        def __post_init__(self):
            if self.rank < 0:
                raise ActsparseError(f"countdown rank must be >= 0 (0 = hidden_size // 8), got {self.rank}")
            if self.train_steps < 1:
                raise ActsparseError(f"countdown train_steps must be >= 1, got {self.train_steps}")
            if not self.lr > 0:
                raise ActsparseError(f"countdown lr must be > 0, got {self.lr}")
            if self.batch_tokens < 1:
                raise ActsparseError(f"countdown batch_tokens must be >= 1, got {self.batch_tokens}")
            if self.calib_tokens < 2:
                raise ActsparseError(f"countdown calib_tokens must be >= 2, got {self.calib_tokens}")

    @classmethod
    def needs_model_for(cls, params) -> bool:
        return params.mode == "d"

    def fit(self, stats, sparsity, params, model):
        if params.mode == "m":
            return m_rules(stats, sparsity)
        if params.mode == "oracle":
            rules = []
            sites = stats.meta["sites"]
            for down in (s for s in sites if s.rsplit(".", 1)[-1] == "down"):
                base = down[:-len("down")]                        # layers.i.{prefix}
                c = sites[down][0]
                skips = [base + r for r in ("gate", "up", "down") if base + r in sites]
                rules.append(Rule(down, "topk_token", attrs={"n_zero": int(c * sparsity)},
                                  skips=skips, expected_sparsity=int(c * sparsity) / c))
            return rules
        require_model("countdown", model, "with mode='d' trains per-layer predictors")
        if sparsity == 0.0:
            return []
        return d_rules(stats, sparsity, params, model)


def m_rules(stats, sparsity: float) -> list[Rule]:
    """M-COUNTDOWN: per gated layer, threshold |up·x| at its calibration quantile; gate and down skip."""
    rules = []
    for i, p in gated_mlps(stats, "countdown mode 'm'"):      # dense MLPs, and each expert of MoE layers
        point = f"layers.{i}.{p}up_out"
        t = stats[point].abs_quantile(sparsity)
        rules.append(Rule(point, "threshold", {"thresh": torch.tensor(t, dtype=torch.float32)},
                          skips=[f"layers.{i}.{p}gate", f"layers.{i}.{p}down"], expected_sparsity=sparsity))
    return rules


def topk_labels(z: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per row, True where |z| is above the row's k-th smallest |z|, k = max(1, int(C * sparsity)): [N, C]."""
    a = z.abs().float()
    k = max(1, int(a.shape[-1] * sparsity))
    kth = a.kthvalue(k, dim=-1, keepdim=True).values
    return a > kth


@register_rule("countdown_d")
def countdown_d(rule: Rule, x: torch.Tensor, forward, module):
    """D-COUNTDOWN at the MLP input: predict kept neurons from x, compute only those, return down's output.

    n_zero is the number of dropped intermediate neurons scaled by H/F, so that n_zero / x.numel() is the
    fraction of the intermediate that was dropped.
    """
    parts = rule.attrs["parts"]
    v = rule.tensors["V"].to(x.device, x.dtype)               # [H, r]
    u = rule.tensors["U"].to(x.device, x.dtype)               # [F, r]
    keep = (x @ v) @ u.t() > rule.tensors["tau"].to(x.device, x.dtype)   # [..., F]
    inter = mlp_intermediate(module, parts, x) * keep          # [..., F]
    y = module.get_submodule(parts["down"])(inter)
    return y, (~keep).sum() * (x.shape[-1] / keep.shape[-1])


def d_rules(stats, sparsity: float, params, model) -> list[Rule]:
    """Train one low-rank predictor per layer on the calibration tokens; threshold its logits at the target."""
    blocks = [b for b in find_blocks(model) if b.mlp is not None and "down" in b.sites]
    if not blocks:
        raise ActsparseError("countdown mode 'd' trains one predictor per dense MLP, and this model has none "
                             "(MoE experts and SSM mixers are not supported by mode 'd'); use mode 'm'")
    windows = calib_windows(stats, params.calib_tokens)
    points = {}
    for b in blocks:
        points[f"{b.layer}.x"] = (b.mlp, "input")
        points[f"{b.layer}.z"] = (b.sites["down"].module, "input")
    acts = collect(model, windows, points)
    gen = torch.Generator().manual_seed(params.seed)
    dev = next(model.parameters()).device  # the predictors train where the model is (the CPU generator draws alike)
    rules = []
    for b in blocks:
        x, z = acts[f"{b.layer}.x"].to(dev), acts[f"{b.layer}.z"].to(dev)      # [N, H], [N, F]
        h, f = x.shape[1], z.shape[1]
        r = params.rank or max(1, h // 8)
        labels = topk_labels(z, sparsity).float()
        u, v = train_predictor(x, labels, r, params, gen)
        with torch.no_grad():
            logits = (x @ v) @ u.t()                            # [N, F]
            tau = quantile(logits, sparsity, "nearest")
            pred = logits > tau
            truth = labels.bool()
            recall = float((pred & truth).sum() / truth.sum().clamp(min=1))
            precision = float((pred & truth).sum() / pred.sum().clamp(min=1))
        skips = [b.sites[k].name for k in ("gate", "up", "down") if k in b.sites]
        rules.append(Rule(f"layers.{b.layer}.mlp", "countdown_d",
                          {"U": u.detach().float().cpu(), "V": v.detach().float().cpu(), "tau": torch.tensor(tau)},
                          attrs={"parts": mlp_parts(b), "rank": r, "calib_recall": recall,
                                 "calib_precision": precision},
                          skips=skips, expected_sparsity=float((~pred).float().mean()),
                          extra_params=r * (h + f)))
    return rules


def train_predictor(x: torch.Tensor, labels: torch.Tensor, r: int, params, gen: torch.Generator):
    """Fit logit = x V U^T to the labels with BCE; return (U [F, r], V [H, r])."""
    n, h = x.shape
    f = labels.shape[1]
    init = torch.empty(f, h)
    bound = math.sqrt(6.0 / (f + h))                           # Xavier-uniform, as the reference's init
    init.uniform_(-bound, bound, generator=gen)
    uu, s, vh = torch.linalg.svd(init.to(x.device), full_matrices=False)
    r = min(r, s.numel())
    u = (uu[:, :r] * s[:r].sqrt()).clone().requires_grad_(True)      # [F, r]
    v = (vh[:r].t() * s[:r].sqrt()).clone().requires_grad_(True)     # [H, r]
    opt = torch.optim.AdamW([u, v], lr=params.lr, weight_decay=0.01)
    bs = min(params.batch_tokens, n)
    with torch.enable_grad():
        for _ in range(params.train_steps):
            idx = torch.randint(0, n, (bs,), generator=gen).to(x.device)
            loss = F.binary_cross_entropy_with_logits((x[idx] @ v) @ u.t(), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return u.detach(), v.detach()
