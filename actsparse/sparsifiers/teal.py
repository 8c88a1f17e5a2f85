"""teal: training-free magnitude thresholding of every site's input (TEAL, arXiv 2408.14690).

Each site's input x is replaced by x * 1[|x| > t_site], with t_site the empirical quantile of |x| at
the site's sparsity, taken over the calibration statistics' uniform sample of the site's input
(`sample_size` values, 2^17 by default: a subsample, so t can sit off the quantile over every
calibration value, by up to 1.3% on tiny-llama's 16,384 calibration tokens; `sequential=True` takes it
over all captured values instead).
Reference code: FasterDecoding/TEAL.

Allocation:
- `uniform`: every site at the target. With `sequential=True`, layer l's thresholds are fitted on
  inputs computed with every site before it already sparsified (one pass per layer and stage over
  `calib_tokens` calibration tokens), so the measured sparsity follows the target instead of
  drifting above it as upstream zeros shrink downstream inputs.
- `greedy` (TEAL's block-wise greedy, greedyopt.py in FasterDecoding/TEAL): per block, starting from all-dense,
  repeatedly raise the sparsity of the one site whose increment least increases the block-output
  error on calibration inputs; site r's increment is base_step * P_o / P_r (P = the site's weight
  elements, P_o the attention output projection's), so every step adds about the same effective
  sparsity. Block effective sparsity = sum_r P_r s_r / sum_r P_r. Each step is recorded; the plan
  takes the recorded level closest to the target. Runs on single blocks over `calib_tokens`
  calibration tokens (default 2048); each step scores one candidate per site, from parts of the block
  memoized by the levels they depend on instead of a whole-block forward each (greedy.py).

Deliberate differences from the reference (conf/method/teal_paper.yaml sets the reference's
protocol where it is a setting: sweeps/teal_paper.yaml adds its evaluation token policy):
- thresholds are quantiles of |x| at the target; the reference takes the inverse CDF of a fitted
  symmetric distribution of the signed x at 0.5 + s/2 (histograms). On tiny-llama with the same
  16,384 calibration tokens the uniform thresholds differ by a median 3.9 / 2.0 / 1.2% at
  s = 0.25 / 0.5 / 0.7, and these hit the target closer;
- the reference sparsifies only the last half of each sequence's positions, in the greedy search
  and in its perplexity evaluation; here the greedy search masks every position unless
  `greedy_mask_fraction` says otherwise (0.5 = the reference), and evaluation follows the
  token policy (`last_fraction=0.5` = the reference);
- the greedy search runs on `calib_tokens` = 2,048 tokens with `base_step` 0.05 by default; the
  reference calibrates on 10 sequences of 2,048 tokens, and its script steps by 0.025;
- the relative site sizes come from the model's own weight shapes; the reference hard-codes them
  per model, with k/v at 1/8 of q for Llama-2-7B/13B (no GQA there: 1) and Mistral-7B (8 of 32 KV
  heads: 1/4);
- the block-output error is the mean over tokens of the per-token L2 error on the last
  `last_fraction` of positions (the reference takes a norm along the sequence axis, then a mean);
- the greedy loop stops once the target is reached instead of always running to 90%.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Literal

import torch

from ..calibration.quantile import AbsThresholds
from ..errors import ActsparseError
from ._calib import calib_windows, fit_in_order, require_model
from .greedy import greedy_rules
from .plan import Rule
from .registry import Method, register_method

TEAL_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "down")


def check_roles(method: str, roles) -> None:
    """Raise unless roles is a non-empty subset of the known site roles."""
    bad = [r for r in roles if r not in TEAL_ROLES]
    if bad or not roles:
        raise ActsparseError(f"{method} roles must be a non-empty subset of {list(TEAL_ROLES)}, got {list(roles)}")


@dataclasses.dataclass
class ThresholdParams:
    """Parameters shared by the per-site threshold methods (teal, wina): allocation and its greedy search."""
    method: ClassVar[str] = "teal"
    allocation: Literal["uniform", "greedy"] = "uniform"
    roles: tuple[str, ...] = TEAL_ROLES
    sequential: bool = False       # uniform: fit layer l on inputs computed with layers < l sparsified
    base_step: float = 0.05        # greedy: sparsity increment of a site the size of the o projection
    last_fraction: float = 0.25    # greedy: block error is measured on this last fraction of positions
    calib_tokens: int = 2048       # greedy and sequential: calibration tokens run through the model
    greedy_mask_fraction: float = 1.0   # greedy: sparsify only this last fraction of each window (TEAL: 0.5)

    def __post_init__(self):
        check_roles(self.method, self.roles)
        if not 0.0 < self.base_step <= 0.5:
            raise ActsparseError(f"{self.method} base_step must be in (0, 0.5], got {self.base_step}")
        if not 0.0 < self.last_fraction <= 1.0:
            raise ActsparseError(f"{self.method} last_fraction must be in (0, 1], got {self.last_fraction}")
        if self.calib_tokens < 2:
            raise ActsparseError(f"{self.method} calib_tokens must be >= 2, got {self.calib_tokens}")
        if not 0.0 < self.greedy_mask_fraction <= 1.0:
            raise ActsparseError(f"{self.method} greedy_mask_fraction must be in (0, 1], got {self.greedy_mask_fraction}")
        if self.sequential and self.allocation == "greedy":
            raise ActsparseError(f"{self.method}: sequential=True is offered with allocation='uniform' only "
                                 "(the greedy search already replays each block on its own inputs)")


@register_method("teal")
class Teal(Method):
    """Threshold every site input at its |x| quantile, uniformly or by TEAL's block-wise greedy allocation."""

    Params = ThresholdParams

    @classmethod
    def needs_model_for(cls, params) -> bool:
        return params.allocation == "greedy" or params.sequential

    def fit(self, stats, sparsity, params, model):
        if params.sequential:
            require_model("teal", model, "with sequential=True calibrates on sparsified inputs")
            names = [s for s in stats.meta["sites"] if s.rsplit(".", 1)[-1] in params.roles]
            return fit_in_order(model, stats, names, calib_windows(stats, params.calib_tokens),
                                lambda site, X: threshold_rule(site.name, AbsThresholds(X)(sparsity), sparsity,
                                                               sequential=True),
                                sequential=True)
        if params.allocation == "uniform":
            return uniform_rules(stats, sparsity, params.roles)
        require_model("teal", model, "with allocation='greedy' measures block-output errors")
        return greedy_rules(stats, sparsity, params, model, thresholds=abs_quantiles, rule=greedy_threshold_rule)


def threshold_rule(site: str, thresh, sparsity: float, **attrs) -> Rule:
    """A `threshold` rule on a site's input: scalar or per-channel [C] threshold."""
    t = torch.as_tensor(thresh, dtype=torch.float32).detach().cpu()
    return Rule(site, "threshold", {"thresh": t}, attrs=attrs, skips=[site], expected_sparsity=sparsity)


def uniform_rules(stats, sparsity: float, roles) -> list[Rule]:
    """One threshold rule per site with role in `roles`, each at the same target sparsity."""
    rules = []
    for site in stats.meta["sites"]:
        if site.rsplit(".", 1)[-1] not in roles:
            continue
        rules.append(threshold_rule(site, stats[site].abs_quantile(sparsity), sparsity))
    return rules


def abs_quantiles(stats, sites) -> dict[str, Callable[[float], float]]:
    """TEAL's per-site threshold at a sparsity level: the |x| quantile of the calibration sample."""
    return {s.name: AbsThresholds(stats[s.name].sample) for s in sites}


def greedy_threshold_rule(site: str, thresholds, level: float, **attrs) -> Rule:
    """A greedy search's `threshold` rule at the site's chosen level."""
    return threshold_rule(site, thresholds(level), level, **attrs)
