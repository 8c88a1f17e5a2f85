"""nm: N:M structured activation pruning with error mitigation (arXiv 2509.22166,
On-Point-RND/Structured-Sparse-Activations-Inference).

What it sparsifies: the input of every chosen site (default all seven), per token: in each group of
M consecutive input channels keep the N entries with the largest score, zero the rest, so exactly
1 - N/M of the input is zero whatever the data (`uses_target = False`: the pattern sets the sparsity).
`pattern="unstructured"` keeps the top (1 - unstructured_sparsity) of each token's whole row instead
(the paper's unstructured per-token baseline).

Scores (per input channel k of a site with weight W [out, in]):
- `magnitude`: |x_k|;
- `variance_weighted`: |x_k * Var(W[:, k])|;
- `amber`: |x_k| * ||Ŵ[:, k]|| with Ŵ = (W - mean) / std, mean and std taken over the weights inside
  the 0.5%-99.5% quantile range (outliers removed), as Amber-Pruner does.

Error mitigation (one of):
- `variance`: per token, rescale the kept entries by sqrt(Var(x) / Var(x_s)) (variances over channels);
- `shift`: prune x - eta instead of x and add eta back: W(prune(x - eta) + eta) = W prune(x - eta)
  + eta * rowsum(W) -- a sparse product plus a rank-1 term with the weight row sums precomputed.
  eta is each token's median over channels (`shift_eta="token"`, the reference's dynamic path) or one
  static value (`"static"`: the mean of per-token medians over the calibration tokens);
- `scaling` (SmoothQuant-style, alpha = 1/2): s_k = sqrt(max_t |x_tk| / max_o |W_ok|), prune x / s and
  multiply by W diag(s) (s folded into the weights, so no extra reads); max_t over calibration tokens;
- `learnable`: a per-output affine y' = a ⊙ y + c (a init 1, c init 0) of every sparsified site, trained
  block by block with Adam on the MSE between the sparsified block's output and the dense block's
  output on the same (already sparsified upstream) inputs -- the reference's sequential training.

Forward passes: `scaling`, `shift_eta="static"` and `learnable` run the model on `calib_tokens`
calibration tokens (default 2048); `learnable` also takes `learn_steps` Adam steps per block.

The reference's default configuration (2:4 by magnitude on all seven inputs, learnable scale and
shift) is conf/method/nm_paper.yaml.

Deliberate differences from the reference:
- `scaling` uses calibration-time per-channel maxima (static), the reference the current batch's;
- `learnable` trains scale and shift (the reference's `scale_shift` option) for `learn_steps`
  full-batch Adam steps at `learn_lr` and keeps the best affines seen (the identity included), rather
  than the reference's AdamW epoch over WikiText-2 train at lr 1e-4 with a linear schedule;
- default roles are all seven sites, as the reference's act_prune/configs/config.py (its older
  config_outdated.yaml prunes o, gate, up and down only);
- the static eta is measured on the calibration tokens, not on the first 100 evaluation batches.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import ActsparseError
from ..models.sites import find_sites
from ._calib import calib_windows, capture_blocks, collect, installed, require_model
from .plan import Rule
from .registry import Method, register_method
from .kinds import register_rule
from .teal import check_roles

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """Return (N, M) for 'N:M', or raise with what a valid pattern looks like."""
    m = _PATTERN.match(str(pattern))
    if not m:
        raise ActsparseError(f"nm pattern must be 'N:M' (e.g. '2:4', '8:16', '16:32') or 'unstructured', "
                             f"got {pattern!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not (1 <= n < mm):
        raise ActsparseError(f"nm pattern {pattern!r} needs 1 <= N < M (N kept of every M), got N={n}, M={mm}")
    return n, mm


@register_method("nm")
class NM(Method):
    """Per token, keep the N highest-scoring of every M consecutive input channels of each site."""
    uses_target = False

    @dataclasses.dataclass
    class Params:
        pattern: str = "2:4"
        score: Literal["magnitude", "variance_weighted", "amber"] = "magnitude"
        mitigation: Literal["none", "variance", "shift", "scaling", "learnable"] = "none"
        roles: tuple[str, ...] = ("q", "k", "v", "qkv", "o", "gate", "up", "down")
        shift_eta: Literal["token", "static"] = "token"
        unstructured_sparsity: float = 0.5  # only for pattern='unstructured'
        learn_steps: int = 100
        learn_lr: float = 1e-3
        calib_tokens: int = 2048

        def __post_init__(self):
            if self.pattern != "unstructured":
                parse_pattern(self.pattern)
            check_roles("nm", self.roles)
            if not 0.0 < self.unstructured_sparsity < 1.0:
                raise ActsparseError(f"nm unstructured_sparsity must be in (0, 1), got {self.unstructured_sparsity}")
            if self.learn_steps < 0:
                raise ActsparseError(f"nm learn_steps must be >= 0, got {self.learn_steps}")
            if not self.learn_lr > 0:
                raise ActsparseError(f"nm learn_lr must be > 0, got {self.learn_lr}")
            if self.calib_tokens < 2:
                raise ActsparseError(f"nm calib_tokens must be >= 2, got {self.calib_tokens}")

    @classmethod
    def nominal_sparsity(cls, params) -> float:
        """The fraction of each chosen site's input the pattern zeroes: what a target sparsity would have set."""
        if params.pattern == "unstructured":
            return params.unstructured_sparsity
        n, m = parse_pattern(params.pattern)
        return 1.0 - n / m

    @classmethod
    def needs_model_for(cls, params) -> bool:
        return params.score != "magnitude" or params.mitigation in ("shift", "scaling", "learnable")

    def fit(self, stats, sparsity, params, model):
        names = [s for s in stats.meta["sites"] if s.rsplit(".", 1)[-1] in params.roles]
        if params.pattern != "unstructured":
            _, m = parse_pattern(params.pattern)
            for s in names:
                c = stats.meta["sites"][s][0]
                if c % m:
                    raise ActsparseError(f"nm pattern {params.pattern!r}: M={m} must divide every sparsified "
                                         f"site's input width, but {s} has {c} input channels ({c} % {m} = {c % m}); "
                                         f"pick M dividing {c}, or restrict roles")
        if self.needs_model_for(params):
            why = {"shift": "with mitigation='shift' precomputes weight row sums",
                   "scaling": "with mitigation='scaling' measures channel maxima and weight scales",
                   "learnable": "with mitigation='learnable' trains per-output affines"}.get(
                params.mitigation, f"with score={params.score!r} reads the weights")
            require_model("nm", model, why)
        sites = find_sites(model) if model is not None else {}
        windows = calib_windows(stats, params.calib_tokens) if model is not None else None
        xmax, eta = {}, {}
        if params.mitigation == "scaling" or (params.mitigation == "shift" and params.shift_eta == "static"):
            X = collect(model, windows, {s: (sites[s].module, "input") for s in names})
            for s in names:
                xmax[s] = X[s].abs().amax(0)                       # [C]
                eta[s] = float(X[s].median(dim=-1).values.mean())  # mean per-token median
            del X
        rules = []
        for s in names:
            c_in, c_out = stats.meta["sites"][s]
            if params.pattern == "unstructured":
                n, m = c_in - int(round(params.unstructured_sparsity * c_in)), c_in
            else:
                n, m = parse_pattern(params.pattern)
            tensors: dict[str, torch.Tensor] = {}
            extra = 0
            w = sites[s].weight.detach().double().cpu() if s in sites else None   # [out, in]
            if params.score == "variance_weighted":
                tensors["col_score"] = w.var(0, unbiased=False).float()
            elif params.score == "amber":
                tensors["col_score"] = amber_scores(w).float()
            if params.mitigation == "shift":
                tensors["rowsum"] = w.sum(1).float()
                if params.shift_eta == "static":
                    tensors["eta"] = torch.tensor(eta[s], dtype=torch.float32)
                extra = c_out  # the rank-1 term reads the row sums
            elif params.mitigation == "scaling":
                wmax = w.abs().amax(0).float()
                tensors["smooth"] = (xmax[s].clamp(min=1e-8) / wmax.clamp(min=1e-8)).sqrt()
            elif params.mitigation == "learnable":
                tensors["out_scale"] = torch.ones(c_out)
                tensors["out_shift"] = torch.zeros(c_out)
                extra = 2 * c_out
            rules.append(Rule(s, "nm", tensors, attrs={"n": n, "m": m, "mitigation": params.mitigation,
                                                       "score": params.score},
                              skips=[s], expected_sparsity=1.0 - n / m, extra_params=extra))
        if params.mitigation == "learnable" and params.learn_steps > 0:
            _train_affines(model, stats, rules, windows, params.learn_steps, params.learn_lr)
        return rules


def amber_scores(w: torch.Tensor) -> torch.Tensor:
    """Per input channel, the L2 norm of the column of W standardised with outlier-free mean/std: [in]."""
    flat = w.flatten()
    lo, hi = torch.quantile(flat[:: max(1, flat.numel() // 100_000)].float(), torch.tensor([0.005, 0.995])).double()
    inner = flat[(flat >= lo) & (flat <= hi)]
    if inner.numel() == 0:
        inner = flat
    wn = (w - inner.mean()) / inner.std(unbiased=False).clamp(min=1e-8)
    return wn.norm(dim=0)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask [..., C] keeping the n largest scores in each group of m consecutive channels."""
    g = score.reshape(*score.shape[:-1], score.shape[-1] // m, m)       # [..., C/m, m]
    idx = g.topk(n, dim=-1, sorted=False).indices
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.reshape(score.shape)


@register_rule("nm")
def nm_rule(rule: Rule, x: torch.Tensor, forward, module=None):
    """N:M pruning of x by score, with the rule's mitigation; returns (y, number of zeroed entries)."""
    n, m = rule.attrs["n"], rule.attrs["m"]
    mit = rule.attrs.get("mitigation", "none")
    t = {k: v.to(x.device, x.dtype) for k, v in rule.tensors.items()}
    xc = x
    eta = None
    if mit == "shift":
        eta = t["eta"] if "eta" in t else x.median(dim=-1, keepdim=True).values   # [] or [..., 1]
        xc = x - eta
    elif mit == "scaling":
        xc = x / t["smooth"]
    score = xc.abs() if "col_score" not in t else (xc * t["col_score"]).abs()
    keep = nm_mask(score, n, m)
    xs = xc * keep
    if mit == "variance":
        v = x.var(dim=-1, keepdim=True) / xs.var(dim=-1, keepdim=True).clamp(min=1e-9)
        xs = xs * v.sqrt()
    elif mit == "scaling":
        xs = xs * t["smooth"]        # W diag(s) applied to the pruned x / s
    y = forward(xs)
    if eta is not None:
        y = y + eta * t["rowsum"]    # rank-1 term: eta (per token or static) times the row sums [out]
    if mit == "learnable":
        y = y * t["out_scale"] + t["out_shift"]
    return y, (~keep).sum()


def _train_affines(model, stats, rules: list[Rule], windows, steps: int, lr: float) -> None:
    """Train each block's per-output affines against its dense output, block by block, in place."""
    by_layer: dict[int, list[Rule]] = {}
    for r in rules:
        by_layer.setdefault(int(r.point.split(".")[1]), []).append(r)
    calls = capture_blocks(model, windows, batch_size=len(windows))
    hidden = [h for h in calls[0].inputs]       # inputs of the first block (embeddings) [B, T, H]
    for c in calls:
        layer_rules = by_layer.get(c.block.layer, [])
        with torch.no_grad():
            target = [c.run(h, i) for i, h in enumerate(hidden)]   # dense block on the current inputs
        params = []
        for r in layer_rules:
            for k in ("out_scale", "out_shift"):
                r.tensors[k] = r.tensors[k].to(hidden[0].device).clone().requires_grad_(True)
                params.append(r.tensors[k])
        if params:
            opt = torch.optim.Adam(params, lr=lr)
            best = (float("inf"), None)
            with installed(model, layer_rules, stats), torch.enable_grad():
                for step in range(steps + 1):
                    loss = sum(F.mse_loss(c.run(h, i), y) for i, (h, y) in enumerate(zip(hidden, target)))
                    if float(loss.detach()) < best[0]:     # keep the best affines seen (the identity included)
                        best = (float(loss.detach()), [p.detach().clone() for p in params])
                    if step == steps:
                        break
                    grads = torch.autograd.grad(loss, params)   # only the affines get gradients
                    for p, g in zip(params, grads):
                        p.grad = g
                    opt.step()
            with torch.no_grad():
                for p, b in zip(params, best[1]):
                    p.copy_(b)
        for r in layer_rules:
            for k in ("out_scale", "out_shift"):
                r.tensors[k] = r.tensors[k].detach().float().cpu()
        with torch.no_grad(), installed(model, layer_rules, stats):
            hidden = [c.run(h, i) for i, h in enumerate(hidden)]
