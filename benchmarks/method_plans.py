"""Engine plans of each method's rule kind at a target sparsity, for random-weight decode benchmarks.

A random-weight model has no calibration text that means anything, so each plan is calibrated on the engine's
own dense activations (`engine_thresholds.record`: random teacher-forced tokens), with the method's rule kind
and the sizes its published recipe gives at that target:

- wina: per-channel thresholds τ / c_i, scores |x_i|·c_i with c_i the column norms of the weight the site
  feeds (column_norms=own), τ the target quantile of the scores;
- scap (its default roles gate, up, down): a per-channel shift m (the inputs' median: the mode SCAP estimates
  sits there for these unimodal inputs) and the target quantile of |x − m|; the engine folds W·m into a bias;
- nm: 2:4 (the method's default pattern; 0.5 whatever the target);
- rsparse (alpha 0.8, its default): the sparse part keeps (1 − s)·alpha of the channels by |x_i|·c_i, the rest
  of the budget goes to a rank r = ⌊(in·out·(1 − s) − keep·out) / (in + out)⌋ path per site, as the method
  sizes it; the factors are random of that rank (their values do not change what is read);
- countdown (mode m): the target quantile of |up·x| selects the gate rows and down columns;
- topk: every site zeroes each token's round(s·K) smallest |x| (WINA's selection=topk, unweighted);
- larosa: the same on a rotated residual stream, one random orthogonal basis per layer (bases='layer') with the
  engine's norm weights: what LaRoSA's deployment costs beyond the Top-K (folded weights, adapters).

  import sys; sys.path.insert(0, "benchmarks")
  from method_plans import method_plan
"""

from __future__ import annotations

import math

import torch

from actsparse.engine.plan import EnginePlan, SiteRule
from engine_thresholds import OPS, record

SITES = ("q", "k", "v", "o", "gate", "up", "down")
METHODS = ("topk", "larosa", "wina", "scap", "nm", "rsparse", "countdown")


def _weights(eng, i: int) -> dict[str, torch.Tensor]:
    """Each site's weight in the kernels' layout [K, N] (in, out) of layer i."""
    lw, cfg = eng.w.layers[i], eng.cfg
    q, kv = cfg.q_size, cfg.kv_size
    wqkv = lw.wqkv_t if lw.wqkv_t is not None else lw.wqkv.t()
    inter = cfg.intermediate_size
    return {"q": wqkv[:, :q], "k": wqkv[:, q:q + kv], "v": wqkv[:, q + kv:],
            "o": lw.wo_t if lw.wo_t is not None else lw.wo.t(),
            "gate": lw.wg_t if lw.wg_t is not None else lw.w13[:inter].t(),
            "up": lw.wu_t if lw.wu_t is not None else lw.w13[inter:].t(),
            "down": lw.wd_t if lw.wd_t is not None else lw.wd.t()}


def _quantile(a: torch.Tensor, q: float) -> float:
    """The q-quantile of a's entries (a sample of at most 2^24 of them: torch.quantile's limit)."""
    a = a.flatten().float()
    if a.numel() > 1 << 24:
        a = a[torch.randperm(a.numel(), device=a.device)[: 1 << 24]]
    return float(torch.quantile(a, q))


def _topk_plan(eng, s: float, rotate: bool) -> EnginePlan:
    cfg = eng.cfg
    plan = EnginePlan.empty(cfg.n_layers)
    if rotate:
        gen = torch.Generator(device=eng.device).manual_seed(0)
        for i, lw in enumerate(eng.w.layers):
            q = torch.linalg.qr(torch.randn(cfg.hidden_size, cfg.hidden_size, device=eng.device, generator=gen))[0]
            plan.rotations[(i, "attn")] = (q, lw.attn_norm.float())
            plan.rotations[(i, "mlp")] = (q, lw.mlp_norm.float())
    widths = {"q": cfg.hidden_size, "k": cfg.hidden_size, "v": cfg.hidden_size, "o": cfg.q_size,
              "gate": cfg.hidden_size, "up": cfg.hidden_size, "down": cfg.intermediate_size}
    for layer in plan.layers:
        for role, k in widths.items():
            n = round(s * k)
            layer[role] = SiteRule(topk=n, expected=n / k)
    return plan


@torch.no_grad()
def method_plan(eng, method: str, s: float, n_tokens: int = 16) -> EnginePlan:
    """The engine plan of `method`'s rule kind at target sparsity s (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if eng.cfg.moe:
        raise ValueError("these plans are for dense models")
    eng.clear_thresholds()   # the model's own weights: a rotated plan's copy would be read (and folded) otherwise
    if method in ("topk", "larosa"):
        plan = _topk_plan(eng, s, rotate=method == "larosa")
        eng.set_plan(plan)
        return plan
    acts = record(eng, n_tokens, 1, seed=0, sparse=False)   # [T, 1, K] per op input
    plan = EnginePlan.empty(eng.cfg.n_layers)
    gen = torch.Generator(device=eng.device).manual_seed(0)
    for i, layer in enumerate(plan.layers):
        ws = _weights(eng, i)
        for role in SITES:
            x = acts[f"layers.{i}.{OPS[role]}"][:, 0]          # [T, K]
            w = ws[role]
            k, n = w.shape
            if method == "wina" or method == "rsparse":
                c = w.float().norm(dim=1)                      # the column norm of each input channel
                keep = (1 - s) * (0.8 if method == "rsparse" else 1.0)
                tau = _quantile(x.abs() * c, 1 - keep)
                rule = SiteRule(thresh=tau / c.clamp_min(1e-30), expected=1 - keep)
                if method == "rsparse":
                    r = math.floor((k * n * (1 - s) - int(k * keep) * n) / (k + n))
                    if r > 0:
                        rule.lowrank = (torch.randn(k, r, device=eng.device, generator=gen) / k**0.5,
                                        torch.randn(n, r, device=eng.device, generator=gen) / r**0.5)
                layer[role] = rule
            elif method == "scap" and role in ("gate", "up", "down"):
                m = x.median(dim=0).values
                layer[role] = SiteRule(thresh=_quantile((x - m).abs(), s), shift=m, expected=s)
            elif method == "nm":
                layer[role] = SiteRule(nm=(2, 4), expected=0.5)
        if method == "countdown":
            xn = acts[f"layers.{i}.gu"][:, 0]
            up = (xn @ ws["up"].float()).abs()                   # |up·x| [T, I]
            layer["up_out"] = SiteRule(thresh=_quantile(up, s), expected=s)
            layer["gate"] = SiteRule(expected=s)
            layer["down"] = SiteRule(expected=s)
    eng.set_plan(plan)
    return plan
