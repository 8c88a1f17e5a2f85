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
  takes the recorded level closest to the target. Runs forward passes of single blocks on
  `calib_tokens` calibration tokens (default 2048); fit cost is about
  (target / step) x (number of sites) block forwards per block.

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
from ..models.sites import find_blocks
from ._calib import calib_windows, capture_blocks, fit_in_order, require_model
from .plan import Rule
from .registry import Method, register_method

TEAL_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "down")
MAX_SITE_SPARSITY = 0.99  # a site is never pushed past this in the greedy search (|x| quantile at 1 = all zero)


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
        return greedy_rules(stats, sparsity, params, model)


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


# Greedy trajectories do not depend on the target (TEAL computes one lookup table per block and reads
# any target off it), so fits at several targets in one process extend one trajectory instead of
# recomputing it: (stats key, params, layer, weights) -> [(block effective sparsity, {site: level})].
_TRAJECTORIES: dict[tuple, list] = {}
_MAX_CACHED = 64


def abs_quantiles(stats, sites) -> dict[str, Callable[[float], float]]:
    """TEAL's per-site threshold at a sparsity level: the |x| quantile of the calibration sample."""
    return {s.name: AbsThresholds(stats[s.name].sample) for s in sites}


@torch.no_grad()
def greedy_rules(stats, target: float, params, model, thresholds=abs_quantiles, tag: tuple = (),
                 rule: Callable[..., Rule] | None = None) -> list[Rule]:
    """TEAL's block-wise greedy allocation: per block, the recorded level closest to `target`.

    `thresholds(stats, sites)` returns, per site, the map from a sparsity level to the threshold on the
    site's input (a float, or a per-channel tensor; a map with a `mask(x, t)` method masks the input its
    own way); `tag` tells apart the trajectories of methods whose thresholds differ (WINA).
    `rule(site, thresholds, level, **attrs)` makes each site's rule at its chosen level (default: a
    `threshold` rule).
    """
    if rule is None:
        def rule(site, th, level, **attrs):
            return threshold_rule(site, th(level), level, **attrs)
    blocks = [b for b in find_blocks(model) if any(r in params.roles for r in b.sites)]
    ident = (params.method,) + tag + (stats.key, tuple(params.roles), params.base_step, params.last_fraction,
                                      params.calib_tokens, params.greedy_mask_fraction)
    # a block's identity includes its weights (pointer, in-place version, checksum): a changed model refits
    keys = {b.layer: ident + (b.layer,) + tuple((s.module.weight.data_ptr(), s.module.weight._version,
                                                 float(s.module.weight.detach().float().sum()))
                                                for r, s in sorted(b.sites.items()) if r in params.roles)
            for b in blocks}
    traj = {b.layer: _TRAJECTORIES.get(keys[b.layer]) for b in blocks}
    todo = [b.layer for b in blocks if traj[b.layer] is None or traj[b.layer][-1][0] < target - 1e-12]
    calls = {}
    if todo:
        calls = {c.block.layer: c for c in capture_blocks(model, calib_windows(stats, params.calib_tokens), batch_size=16)}
    rules: list[Rule] = []
    for b in blocks:
        sites = [s for r, s in b.sites.items() if r in params.roles]
        quantiles = thresholds(stats, sites)
        if b.layer in todo:
            traj[b.layer] = greedy_block(calls[b.layer], sites, quantiles, target, params.base_step,
                                         params.last_fraction, resume=traj[b.layer],
                                         mask_fraction=params.greedy_mask_fraction)
            if len(_TRAJECTORIES) >= _MAX_CACHED:
                _TRAJECTORIES.pop(next(iter(_TRAJECTORIES)))
            _TRAJECTORIES[keys[b.layer]] = traj[b.layer]
        f, levels = min(traj[b.layer], key=lambda fl: abs(fl[0] - target))
        rules += [rule(s.name, quantiles[s.name], levels[s.name], allocation="greedy", block_effective=f)
                  for s in sites]
    return rules


def greedy_block(calls, sites, quantiles, target: float, base_step: float, last_fraction: float,
                 resume: list | None = None, mask_fraction: float = 1.0) -> list[tuple[float, dict]]:
    """Run (or continue) the greedy search on one block until its effective sparsity reaches the target.

    Returns the trajectory [(block effective sparsity, {site: sparsity})], starting all-dense.
    """
    size = {s.name: s.n_params for s in sites}
    ref = calls.block.sites["o"].n_params if "o" in calls.block.sites else min(size.values())
    step = {n: base_step * ref / p for n, p in size.items()}
    total = sum(size.values())
    history = list(resume) if resume else [(0.0, {n: 0.0 for n in size})]
    level = dict(history[-1][1])
    thresh = {n: quantiles[n](level[n]) for n in size}

    def effective(lv):
        return sum(size[n] * lv[n] for n in lv) / total

    def mask_input(name):
        mask = getattr(quantiles[name], "mask", None)

        def pre(m, args):
            t = thresh[name]
            if not torch.is_tensor(t) and t <= 0.0:
                return None
            x = args[0]                                     # [B, T, C]
            xs = x * (x.abs() > t) if mask is None else mask(x, t)
            if mask_fraction < 1.0:                          # TEAL masks only the last positions
                start = x.shape[1] - int(x.shape[1] * mask_fraction)
                xs = torch.cat([x[:, :start], xs[:, start:]], dim=1)
            return (xs,) + tuple(args[1:])
        return pre

    hooks = [s.module.register_forward_pre_hook(mask_input(s.name)) for s in sites]
    try:
        # an MLP-site candidate changes only the MLP's output; in a pre-LN block that output is added to
        # the residual, so y = y_base - mlp_base + mlp(x_mlp) on the scored positions, without re-running
        # attention (checked once per block; otherwise every candidate replays the whole block)
        # (the shortcut replays the MLP on the scored positions only, where a position-dependent mask
        # would be misplaced: off when only the last positions are masked)
        mlp = calls.block.mlp if mask_fraction >= 1.0 and _mlp_is_additive(calls) else None
        in_mlp = {s.name for s in sites if mlp is not None and s.role in ("gate", "up", "down")}
        base = _State.run(calls, mlp, last_fraction)
        while effective(level) < target - 1e-12:
            best, best_err, best_state = None, float("inf"), None
            for n in size:
                nxt = level[n] + step[n]
                if nxt > MAX_SITE_SPARSITY:
                    continue
                thresh[n] = quantiles[n](nxt)
                state = base.mlp_changed() if n in in_mlp else _State.run(calls, mlp, last_fraction)
                e = state.error()
                thresh[n] = quantiles[n](level[n])
                if e < best_err:
                    best, best_err, best_state = n, e, state
            if best is None:
                break
            level[best] += step[best]
            thresh[best] = quantiles[best](level[best])
            base = best_state
            history.append((effective(level), dict(level)))
    finally:
        for h in hooks:
            h.remove()
    return history


class _State:
    """Block outputs on the scored (last) positions at one allocation, with the MLP's input and output there."""

    def __init__(self, calls, mlp, starts, ys, x_mlp, o_mlp):
        self.calls, self.mlp, self.starts = calls, mlp, starts
        self.ys, self.x_mlp, self.o_mlp = ys, x_mlp, o_mlp

    @classmethod
    def run(cls, calls, mlp, last_fraction: float) -> "_State":
        """Replay the whole block (with whatever input masks are installed)."""
        starts = [int(h.shape[1] * (1.0 - last_fraction)) for h in calls.inputs]
        got = []
        hook = mlp.register_forward_hook(lambda m, a, out: got.append((a[0], out))) if mlp is not None else None
        try:
            ys = [calls.run(h, i)[:, s:] for i, (h, s) in enumerate(zip(calls.inputs, starts))]  # [B, T', H]
        finally:
            if hook is not None:
                hook.remove()
        x_mlp = [x[:, s:] for (x, _), s in zip(got, starts)]
        o_mlp = [o[:, s:] for (_, o), s in zip(got, starts)]
        return cls(calls, mlp, starts, ys, x_mlp, o_mlp)

    def mlp_changed(self) -> "_State":
        """The state after re-running only the MLP (its masks changed) on the scored positions."""
        o_new = [self.mlp(x) for x in self.x_mlp]
        ys = [y - o + on for y, o, on in zip(self.ys, self.o_mlp, o_new)]
        return _State(self.calls, self.mlp, self.starts, ys, self.x_mlp, o_new)

    def error(self) -> float:
        """Mean over scored tokens of the L2 distance to the dense block output."""
        err, n = 0.0, 0
        for y, o, s in zip(self.ys, self.calls.outputs, self.starts):
            d = (y - o[:, s:]).float().norm(dim=-1)   # [B, T']
            err += float(d.sum())
            n += d.numel()
        return err / max(n, 1)


@torch.no_grad()
def _mlp_is_additive(calls) -> bool:
    """True if adding d to the MLP's output adds exactly d to the block's output (pre-LN residual)."""
    mlp = calls.block.mlp
    if mlp is None or not calls.inputs:
        return False
    h = calls.inputs[0]
    y0 = calls.run(h, 0)
    delta = {}

    def bump(m, a, out):
        delta["d"] = torch.randn_like(out) * (out.float().std() + 1e-6)
        return out + delta["d"]
    hook = mlp.register_forward_hook(bump)
    try:
        y1 = calls.run(h, 0)
    finally:
        hook.remove()
    d = delta.get("d")
    return d is not None and torch.allclose(y1 - y0, d, rtol=1e-3, atol=1e-4 * float(d.abs().max()))
