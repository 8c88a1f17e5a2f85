"""ffn_threshold: zero-enforcing per-layer percentile thresholds on FFN outputs (arXiv 2412.12178,
nobeldhar/llm-activation-sparsity, "Activation Sparsity Opportunities for Compressing General LLMs").

What it sparsifies, per layer, each with its own threshold T = the target-percentile of |output|
over the calibration tokens (x kept where |x| >= T, zeroed otherwise):
- `gate`: the gate projection's output g (pre-activation) -- act(0) = 0 for SiLU/GELU, so a zero g is
  a dropped neuron: `up` rows and `down` columns need not be read (gate itself is read in full);
- `up`: the up projection's output u (for a two-layer MLP: its pre-activation) -- a zero u drops the
  neuron's `down` column; up is read in full;
- `down`: the FFN output (the down projection's output), as the paper does; this saves no weight reads.
The down projection's input (the intermediate, zero where either g or u was zeroed) is counted at
the `down` point; its expected sparsity is measured on the calibration tokens with the thresholds
installed. The paper uses one sparsity level for all three categories; so do we. In MoE layers every routed
expert (and a shared expert) is an MLP of its own, with thresholds from the tokens routed to it.

With it comes the paper's mask-stability analysis, as an evaluation any method can use:
actsparse.eval.stability.mask_stability.

Forward passes: the gate/up/down outputs on `calib_tokens` calibration tokens (default 2048), then
one more pass with the thresholds installed to measure the intermediate's sparsity.

Deliberate differences from the reference:
- thresholds are calibrated on calibration text; the reference collects them on the WikiText-2 *test*
  split it then evaluates on (a leak);
- percentiles are exact over all captured calibration entries (the reference: np.percentile over
  fp16 HDF5 dumps of whole windows);
- the reference also ships variants that threshold act(g)*u; we implement the paper's gate/up/down.
"""
from __future__ import annotations

import dataclasses

import torch

from ..calibration.quantile import AbsThresholds
from ..errors import ActsparseError
from ..models.sites import find_blocks
from ._calib import calib_windows, collect, measure, require_model
from .plan import Rule
from .registry import Method, register_method
from .kinds import register_rule

OUTPUTS = ("gate", "up", "down")


@register_method("ffn_threshold")
class FFNThreshold(Method):
    """Percentile thresholds on the gate, up and FFN outputs of every layer."""
    needs_model = True

    @dataclasses.dataclass
    class Params:
        outputs: tuple[str, ...] = OUTPUTS
        calib_tokens: int = 2048

        def __post_init__(self):
            bad = [o for o in self.outputs if o not in OUTPUTS]
            if bad or not self.outputs:
                raise ActsparseError(f"ffn_threshold outputs must be a non-empty subset of {list(OUTPUTS)}, "
                                     f"got {list(self.outputs)}")
            if self.calib_tokens < 2:
                raise ActsparseError(f"ffn_threshold calib_tokens must be >= 2, got {self.calib_tokens}")

    def fit(self, stats, sparsity, params, model):
        require_model("ffn_threshold", model, "thresholds projection outputs")
        # every MLP with up and down: dense MLPs, each routed expert and a shared expert (prefix P)
        mlps = [(b.layer, m) for b in find_blocks(model) for m in b.mlps if "up" in m.sites and "down" in m.sites]
        if not mlps:
            raise ActsparseError("ffn_threshold thresholds MLP outputs, and this model has no MLP with up and down "
                                 "projections (an SSM mixer is not an MLP); use teal or scap on its sites")
        if params.outputs == ("gate",) and not any(m.gated for _, m in mlps):
            raise ActsparseError("ffn_threshold outputs=('gate',) needs a gated MLP; this model has none")
        windows = calib_windows(stats, params.calib_tokens)
        points = {}
        for i, m in mlps:
            for o in params.outputs:
                if o in m.sites:
                    points[f"layers.{i}.{m.prefix}{o}"] = (m.sites[o].module, "output")
        acts = collect(model, windows, points)
        dev = next(model.parameters()).device    # sort each [tokens, channels] on the model's device
        rules = []
        for i, m in mlps:
            base = f"layers.{i}.{m.prefix}"
            # an expert no calibration token was routed to gets no threshold (and no rule)
            t = {o: AbsThresholds(acts[base + o], dev)(sparsity) for o in params.outputs
                 if base + o in acts and acts[base + o].numel()}
            if not t:
                continue
            if "gate" in t:
                rules.append(Rule(base + "gate", "output_threshold", {"thresh": torch.tensor(t["gate"])},
                                  skips=[base + "up"], expected_sparsity=sparsity))
            if "up" in t:
                rules.append(Rule(base + "up_out", "threshold", {"thresh": torch.tensor(t["up"])},
                                  skips=[], expected_sparsity=sparsity))
            # always: count the intermediate's zeros at down's input (down skips its columns), and
            # threshold the FFN output when asked
            rules.append(Rule(base + "down", "ffn_down", {"out_thresh": torch.tensor(t.get("down", 0.0))},
                              skips=[base + "down"], expected_sparsity=0.0))
        measured = measure(model, rules, stats, windows)
        for r in rules:
            if r.kind == "ffn_down":
                r.expected_sparsity = measured.get(r.point, 0.0)
        return rules


@register_rule("output_threshold")
def output_threshold(rule: Rule, x: torch.Tensor, forward, module=None):
    """y = forward(x) with |y| < thresh zeroed; n_zero counts zeroed outputs, scaled to a fraction of x's size."""
    y = forward(x)
    keep = y.abs() >= rule.tensors["thresh"].to(y.device, y.dtype)
    return y * keep, (~keep).sum() * (x.shape[-1] / y.shape[-1])


@register_rule("ffn_down")
def ffn_down(rule: Rule, x: torch.Tensor, forward, module=None):
    """Count x's zeros (the intermediate upstream rules produced); zero outputs with |y| < out_thresh."""
    y = forward(x)
    y = y * (y.abs() >= rule.tensors["out_thresh"].to(y.device, y.dtype))   # a threshold of 0 keeps all
    return y, (x == 0).sum()
