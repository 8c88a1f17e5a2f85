"""teal: training-free magnitude thresholding of every site's input (TEAL, arXiv 2408.14690).

Each site's input x is replaced by x * 1[|x| > t_site]. `uniform` allocation uses one target for
every site, with t_site = the exact target-quantile of |x| over the calibration sample.
Deliberate differences from FasterDecoding/TEAL: we take the exact empirical quantile of |x| rather
than the inverse CDF of a fitted symmetric distribution.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from ..errors import ActsparseError
from .plan import Rule
from .registry import Method, register_method

TEAL_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "down")


@register_method("teal")
class Teal(Method):
    """Threshold every site input at its |x| quantile."""

    @dataclasses.dataclass
    class Params:
        allocation: Literal["uniform", "greedy"] = "uniform"
        roles: tuple = TEAL_ROLES

        def __post_init__(self):
            bad = [r for r in self.roles if r not in TEAL_ROLES]
            if bad or not self.roles:
                raise ActsparseError(f"teal roles must be a non-empty subset of {list(TEAL_ROLES)}, got {list(self.roles)}")

    def fit(self, stats, sparsity, params, model):
        if params.allocation != "uniform":
            raise ActsparseError("teal allocation='greedy' needs the method library (actsparse.sparsifiers.library)")
        return uniform_rules(stats, sparsity, params.roles)


def uniform_rules(stats, sparsity: float, roles) -> list[Rule]:
    """One threshold rule per site with role in `roles`, each at the same target sparsity."""
    rules = []
    for site in stats.meta["sites"]:
        if site.rsplit(".", 1)[-1] not in roles:
            continue
        t = stats[site].abs_quantile(sparsity)
        rules.append(Rule(site, "threshold", {"thresh": torch.tensor(t, dtype=torch.float32)},
                          skips=[site], expected_sparsity=sparsity))
    return rules
