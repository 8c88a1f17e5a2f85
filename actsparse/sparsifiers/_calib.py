"""Calibration-time forward passes shared by the methods that fit on real activations.

TEAL's greedy allocation, SCAP's KDE mode choice and sequential calibration, N:M's learnable affine,
COUNTDOWN's predictors, R-Sparse's thresholds and alpha search and FFN thresholding all need more
than the streamed statistics: whole activation matrices, or block inputs to replay a block. They run
the model on the calibration token ids kept in `stats.tokens` (never on evaluation text), capped by
each method's `calib_tokens` parameter.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import ActsparseError
from ..models.moe import install_routing
from ..models.sites import Block, find_blocks, find_sites
from ..models.split import input_device
from .plan import Rule, SparsityPlan


def calib_windows(stats, max_tokens: int) -> torch.Tensor:
    """Return at most `max_tokens` calibration token ids from stats.tokens, as windows [n, T]."""
    toks = stats.tokens
    if toks is None or toks.numel() == 0:
        raise ActsparseError("these stats hold no calibration token ids; re-run asp.calibrate()")
    if max_tokens < 2:
        raise ActsparseError(f"calib_tokens must be >= 2, got {max_tokens}")
    t = toks.shape[-1]
    if max_tokens < t:
        return toks[:1, :max_tokens]
    return toks[: max(1, min(len(toks), max_tokens // t))]


def require_model(method: str, model, why: str) -> None:
    """Raise a clear error when a method variant that runs forward passes got no model."""
    if model is None:
        raise ActsparseError(f"method {method!r} {why} and runs forward passes on the calibration tokens "
                             "while fitting: pass model=... to asp.fit")


def _device(model) -> torch.device:
    return input_device(model)


class _Stop(Exception):
    """Raised by a hook to end a forward pass whose remaining layers are not needed."""


@torch.no_grad()
def run_windows(model, windows: torch.Tensor, batch_size: int = 4, stop_after: torch.nn.Module | None = None) -> None:
    """Run the model over calibration windows (outputs discarded; hooks do the work).

    With `stop_after`, each forward ends once that module has run: the layers after it cannot change
    what the hooks up to it saw.
    """
    dev = _device(model)
    hook = None
    if stop_after is not None:
        def stop(m, args, out):
            raise _Stop
        hook = stop_after.register_forward_hook(stop)
    try:
        for i in range(0, len(windows), batch_size):
            try:
                model(windows[i:i + batch_size].to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        if hook is not None:
            hook.remove()


@torch.no_grad()
def collect(model, windows: torch.Tensor, points: dict, batch_size: int = 4,
            stop_after: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Return {name: [N, C] float32 on CPU}: every token's tensor at each (module, 'input'|'output') point."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in points}
    hooks = []

    def keep(name, t):
        got[name].append(t.detach().reshape(-1, t.shape[-1]).float().cpu())

    for name, (mod, where) in points.items():
        if where == "input":
            hooks.append(mod.register_forward_pre_hook(lambda m, args, _n=name: keep(_n, args[0])))
        else:
            hooks.append(mod.register_forward_hook(
                lambda m, args, out, _n=name: keep(_n, out[0] if isinstance(out, tuple) else out)))
    try:
        run_windows(model, windows, batch_size, stop_after)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) if v else torch.zeros(0, 0) for n, v in got.items()}   # [0, 0]: never reached (an unrouted expert)


class BlockCalls:
    """The recorded calls of one transformer block: inputs [B, T, H] + kwargs per batch, and dense outputs."""

    def __init__(self, block: Block):
        self.block = block
        self.inputs: list[torch.Tensor] = []
        self.kwargs: list[dict] = []
        self.outputs: list[torch.Tensor] = []

    def run(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        """Run the block on `hidden` with the kwargs of recorded batch i; return its hidden output."""
        out = self.block.module(hidden, **self.kwargs[i])
        return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_blocks(model, windows: torch.Tensor, batch_size: int = 4) -> list[BlockCalls]:
    """Record every block's inputs, call kwargs and dense outputs on the calibration windows."""
    install_routing(model)   # MoE experts run through hookable per-expert linears (a no-op elsewhere)
    calls = [BlockCalls(b) for b in find_blocks(model)]
    hooks = []
    for c in calls:
        def pre(m, args, kwargs, _c=c):
            h = args[0] if args else kwargs["hidden_states"]
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            _c.inputs.append(h.detach())
            _c.kwargs.append(kw)

        def post(m, args, kwargs, out, _c=c):
            _c.outputs.append((out[0] if isinstance(out, tuple) else out).detach())
        hooks.append(c.block.module.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(c.block.module.register_forward_hook(post, with_kwargs=True))
    try:
        run_windows(model, windows, batch_size)
    finally:
        for h in hooks:
            h.remove()
    return calls


def plan_of(rules: list[Rule], stats, method: str = "_fit") -> SparsityPlan:
    """Wrap rules into a throwaway plan, for installing a partial fit with sparsify()."""
    site_params = {s: int(i * o) for s, (i, o) in stats.meta["sites"].items()}
    return SparsityPlan(method, {}, 0.0, {r.point: r for r in rules}, site_params)


@contextmanager
def installed(model, rules: list[Rule], stats):
    """Install rules on the model (token policy 'all') for the duration of the block."""
    from .apply import sparsify

    with sparsify(model, plan_of(rules, stats)) as handle:
        yield handle


@torch.no_grad()
def measure(model, rules: list[Rule], stats, windows: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """Return the measured activation sparsity of each rule's point on the calibration windows."""
    with installed(model, rules, stats) as handle:
        run_windows(model, windows, batch_size)
        return handle.measured_sparsity()["per_point"]


# forward order of the sites inside a block: a stage's inputs depend only on the stages before it
STAGES = (("q", "k", "v", "qkv"), ("o",), ("gate", "up"), ("down",))


def _stage(role: str) -> int:
    base = role.rsplit(".", 1)[-1]   # expert{e}.gate -> gate
    return next((i for i, st in enumerate(STAGES) if base in st), len(STAGES))


@torch.no_grad()
def fit_in_order(model, stats, names: list[str], windows: torch.Tensor, fit_one, sequential: bool) -> list[Rule]:
    """Fit one rule per site from its captured inputs X [N, C], layer by layer: `fit_one(site, X) -> Rule`.

    With `sequential`, sites are captured stage by stage in forward order with every rule fitted so far
    installed, so each site calibrates on the inputs it will see once upstream sites are sparsified
    (sequential calibration). Otherwise one dense pass per layer; capturing a layer at a time bounds
    memory to one layer's inputs over the calibration tokens.
    """
    sites = find_sites(model)
    blocks = {b.layer: b for b in find_blocks(model)}
    rules: list[Rule] = []
    for layer in sorted({sites[s].layer for s in names}):
        mine = [s for s in names if sites[s].layer == layer]
        groups = ([[s for s in mine if _stage(sites[s].role) == i] for i in range(len(STAGES) + 1)]
                  if sequential else [mine])
        for group in groups:
            if not group:
                continue
            with installed(model, rules if sequential else [], stats):
                X = collect(model, windows, {s: (sites[s].module, "input") for s in group},
                            stop_after=blocks[layer].module)
            rules += [fit_one(sites[s], X[s]) for s in group]
    return rules


def mlp_parts(block: Block) -> dict[str, str | None]:
    """Names, relative to the block's MLP module, of its gate/up/down linears and activation module."""
    if block.mlp is None or "up" not in block.sites or "down" not in block.sites:
        raise ActsparseError(f"layer {block.layer}: no MLP with up and down projections was recognised")
    names = {id(m): n for n, m in block.mlp.named_modules()}
    parts = {}
    for key, mod in (("gate", block.sites["gate"].module if "gate" in block.sites else None),
                     ("up", block.sites["up"].module), ("down", block.sites["down"].module), ("act", block.act)):
        if mod is None:
            parts[key] = None
            continue
        if id(mod) not in names:
            raise ActsparseError(f"layer {block.layer}: the MLP's {key} module is not inside the MLP module; "
                                 "MLP-level rules need gate/up/down/act as children of one MLP module")
        parts[key] = names[id(mod)]
    if parts["act"] is None:
        raise ActsparseError(f"layer {block.layer}: the MLP's activation module was not recognised "
                             "(expected mlp.act_fn or mlp.act)")
    return parts


def mlp_intermediate(module: torch.nn.Module, parts: dict, x: torch.Tensor) -> torch.Tensor:
    """The MLP's intermediate (the down projection's input): act(gate·x) ⊙ up·x, or act(up·x) ungated."""
    up = module.get_submodule(parts["up"])
    act = module.get_submodule(parts["act"])
    if parts.get("gate"):
        return act(module.get_submodule(parts["gate"])(x)) * up(x)
    return act(up(x))
