"""cats: Contextually-Aware Thresholding for Sparsity (CATS, arXiv 2404.08763, ScalingIntelligence/CATS).

What it sparsifies: the output of the MLP's activation function in a gated MLP, a = SiLU(gate·x).
Per layer, a_s = a * 1[|a| > t_l] with t_l the exact target-quantile of |a| over the calibration
sample (the `gate_act` probe). The MLP output is down((a_s) ⊙ up·x), so every zero of a_s lets a
decode step skip the matching row of `up` and column of `down`; `gate` is always read in full.

Effective sparsity is therefore about 2/3 of the MLP activation sparsity times the MLP's share of
site weights (gate, up, down are the same size in Llama-like MLPs): the plan's accounting says so
(skips = [up, down]), never the target.

The reference's training-free protocol (calibration data, sparsities, every position sparsified) is
conf/method/cats_paper.yaml with sweeps/cats_paper.yaml.

Deliberate differences from the reference:
- the threshold is the exact empirical quantile of |a| over the calibration sample; the reference
  reads it off a 1000-bin histogram on [-1, 1] (coarse where |a| is small);
- the reference zeroes where |a| < t (keeps equality), we keep where |a| > t: a measure-zero difference.
MoE layers: every routed expert (and a shared expert) is a gated MLP of its own, thresholded at the
quantile of its own activations over the tokens routed to it (probe `layers.i.expert{e}.gate_act`).
Only gated MLPs have a CATS: a two-layer MLP's activation output is the down projection's input,
which is `teal` with roles=('down',).
"""
from __future__ import annotations

import dataclasses
import re

import torch

from ..errors import ActsparseError
from .plan import Rule
from .registry import Method, register_method


def gated_mlps(stats, method: str) -> list[tuple[int, str]]:
    """(layer, MLP prefix) of every gated MLP, from the sites: the dense MLP (prefix ''), each routed expert
    ('expert{e}.') and a shared expert ('shared_expert.'); raise if the model has none."""
    found = []
    for s in stats.meta["sites"]:
        m = re.match(r"^layers\.(\d+)\.(.*)gate$", s)
        if m and f"layers.{m[1]}.{m[2]}up" in stats.meta["sites"]:
            found.append((int(m[1]), m[2]))
    if not found:
        raise ActsparseError(f"{method} needs a gated MLP (gate, up and down projections, e.g. Llama's SwiGLU); "
                             "this model's MLPs have no gate projection. For a two-layer MLP use "
                             "teal with roles=('down',) or scap")
    return sorted(found, key=lambda lp: (lp[0], _prefix_order(lp[1])))


def _prefix_order(prefix: str) -> tuple:
    m = re.match(r"^expert(\d+)\.$", prefix)
    return (0, 0) if prefix == "" else (1, 0) if not m else (2, int(m[1]))


@register_method("cats")
class Cats(Method):
    """Threshold |SiLU(gate·x)| per gated MLP (per expert in MoE layers); zeros skip up rows and down columns."""

    @dataclasses.dataclass
    class Params:
        pass

    def fit(self, stats, sparsity, params, model):
        rules = []
        for i, p in gated_mlps(stats, "cats"):
            point = f"layers.{i}.{p}gate_act"
            t = stats[point].abs_quantile(sparsity)
            rules.append(Rule(point, "threshold", {"thresh": torch.tensor(t, dtype=torch.float32)},
                              skips=[f"layers.{i}.{p}up", f"layers.{i}.{p}down"], expected_sparsity=sparsity))
        return rules
