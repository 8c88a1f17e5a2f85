"""TEAL's block-wise greedy allocation (greedyopt.py in FasterDecoding/TEAL), shared by teal and wina.

Per block, from all-dense, repeatedly raise the sparsity of the one site whose increment least increases the
block-output error on calibration inputs (teal.py describes the search and how it differs from the reference).
Each step scores one candidate per site: the block-output error at an allocation that differs from the current
one in that site alone. Replaying the whole block for every candidate (`Replay`) costs (target / step) x sites
block forwards per block, hours on a CPU at the reference's 20 x 1,024 tokens and step 0.025. `Staged` computes
the same errors from parts, each computed once per levels of the sites it depends on:
- the block is its attention module A, which mixes positions, and a position-wise rest (norms, residual adds,
  the MLP); the error is scored on the last `last_fraction` of positions only, so the rest runs on those alone,
  fed A's output there;
- no site runs before A, so A's output depends only on the levels of the sites inside it, and o's input (the
  attention core) only on those before o: a candidate at o, gate, up or down runs no attention at all, and the
  next step's candidates reuse every part whose sites kept their levels;
- where the MLP's output is added to the residual, the rest splits into the rest without the MLP and the MLP on
  its input, so a candidate inside the MLP re-runs the MLP alone;
- a site's output is memoized by its level and those of the sites upstream of it, so an unchanged projection (k
  and v while q moves, up while gate moves) is not recomputed, nor its mask (WINA's rotation).
Each split is checked on the block's first batch before it is used (the rest reproduces the block's output from
A's, A's output is o's, the MLP adds to the residual); a block that fails the first check is replayed whole, one
that fails another keeps the splits that passed. The parts compute what the replay computes, on fewer
positions, so the errors agree to rounding and the search takes the same steps
(tests/methods/test_greedy.py checks it against an independent whole-block greedy).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..models.sites import find_blocks
from ._calib import _stage, calib_windows, capture_blocks
from .plan import Rule

MAX_SITE_SPARSITY = 0.99  # a site is never pushed past this in the greedy search (|x| quantile at 1 = all zero)
_ATTN_ROLES = ("q", "k", "v", "qkv", "o")

# Greedy trajectories do not depend on the target (TEAL computes one lookup table per block and reads
# any target off it), so fits at several targets in one process extend one trajectory instead of
# recomputing it: (method, tag, stats key, params, layer, weights) -> [(block effective sparsity, {site: level})].
_TRAJECTORIES: dict[tuple, list] = {}
_MAX_CACHED = 64


@torch.no_grad()
def greedy_rules(stats, target: float, params, model, thresholds: Callable, rule: Callable[..., Rule],
                 tag: tuple = ()) -> list[Rule]:
    """TEAL's block-wise greedy allocation: per block, the recorded level closest to `target`.

    `thresholds(stats, sites)` returns, per site, the map from a sparsity level to the threshold on the
    site's input (a float, or a per-channel tensor; a map with a `mask(x, t)` method masks the input its
    own way); `tag` tells apart the trajectories of methods whose thresholds differ (WINA).
    `rule(site, thresholds, level, **attrs)` makes each site's rule at its chosen level.
    """
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
            calls[b.layer] = None            # its recorded inputs are not needed again
            if len(_TRAJECTORIES) >= _MAX_CACHED:
                _TRAJECTORIES.pop(next(iter(_TRAJECTORIES)))
            _TRAJECTORIES[keys[b.layer]] = traj[b.layer]
        f, levels = min(traj[b.layer], key=lambda fl: abs(fl[0] - target))
        rules += [rule(s.name, quantiles[s.name], levels[s.name], allocation="greedy", block_effective=f)
                  for s in sites]
    return rules


@torch.no_grad()
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

    def effective(lv):
        return sum(size[n] * lv[n] for n in lv) / total

    masks = Masks(quantiles, mask_fraction)
    if effective(level) >= target - 1e-12:
        return history
    with Staged.build(calls, sites, masks, last_fraction) or Replay(calls, sites, masks, last_fraction) as ev:
        while effective(level) < target - 1e-12:
            best, best_err = None, float("inf")
            for n in size:
                nxt = level[n] + step[n]
                if nxt > MAX_SITE_SPARSITY:
                    continue
                e = ev.error({**level, n: nxt})
                if e < best_err:
                    best, best_err = n, e
            if best is None:
                break
            level[best] += step[best]
            ev.advance(level)
            history.append((effective(level), dict(level)))
    return history


class Masks:
    """The sites' input masks at the allocation being scored: each site's threshold at its level, applied to the
    last `mask_fraction` of each window's positions (TEAL masks only the last half).

    A part run on a window's tail sets `offset` (the tail's first position) and `length` (the window's), so the
    masked positions are the same as in a replay of the whole window.
    """

    def __init__(self, quantiles: dict, mask_fraction: float):
        self.quantiles, self.mask_fraction = quantiles, mask_fraction
        self.level: dict[str, float] = {}
        self.offset, self.length = 0, None
        self._thresh: dict[tuple[str, float], object] = {}

    def thresh(self, name: str):
        key = (name, self.level[name])
        if key not in self._thresh:
            self._thresh[key] = self.quantiles[name](self.level[name])
        return self._thresh[key]

    @contextlib.contextmanager
    def at(self, offset: int, length: int | None):
        """Mask inputs that start at position `offset` of windows of `length` positions."""
        saved = self.offset, self.length
        self.offset, self.length = offset, length
        try:
            yield
        finally:
            self.offset, self.length = saved

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Site `name`'s input x [B, T, C] with its entries below the threshold zeroed."""
        t = self.thresh(name)
        if not torch.is_tensor(t) and t <= 0.0:
            return x
        mask = getattr(self.quantiles[name], "mask", None)
        xs = x * (x.abs() > t) if mask is None else mask(x, t)
        if self.mask_fraction < 1.0:
            n = self.length or x.shape[1]
            start = n - int(n * self.mask_fraction) - self.offset
            if start > 0:
                xs = torch.cat([x[:, :start], xs[:, start:]], dim=1)
        return xs


class Replay:
    """Scores an allocation by replaying the whole block on every batch with each site's input masked."""

    def __init__(self, calls, sites, masks: Masks, last_fraction: float):
        self.calls, self.sites, self.masks = calls, sites, masks
        self.starts = [int(h.shape[1] * (1.0 - last_fraction)) for h in calls.inputs]
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        for s in self.sites:
            hook = s.module.register_forward_pre_hook(
                lambda m, args, _n=s.name: (self.masks(_n, args[0]),) + tuple(args[1:]))
            self._stack.callback(hook.remove)
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def error(self, level: dict[str, float]) -> float:
        """Mean over scored tokens of the L2 distance to the dense block output."""
        self.masks.level = level
        err, n = 0.0, 0
        for i, (h, s) in enumerate(zip(self.calls.inputs, self.starts)):
            d = (self.calls.run(h, i)[:, s:] - self.calls.outputs[i][:, s:]).float().norm(dim=-1)   # [B, T']
            err += float(d.sum())
            n += d.numel()
        return err / max(n, 1)

    def advance(self, level: dict[str, float]) -> None:
        """The search moved to `level` (nothing kept between allocations)."""


class _Stop(Exception):
    """Raised in o's pre-hook: the attention core (o's input) is all a core run needs."""


@contextlib.contextmanager
def _forward(module: torch.nn.Module, fn):
    """Run `fn` in place of module.forward while the context lasts."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


def _versions(v) -> tuple:
    """The in-place versions of the tensors in v (a tensor or a tuple): a memoized value changed in place is stale."""
    return tuple(t._version for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-12)


def _attention(block) -> tuple[torch.nn.Module, str] | None:
    """The block's attention module (the lowest module holding every attention site) and its path in the block."""
    names = {id(m): n for n, m in block.module.named_modules()}
    paths = [names.get(id(s.module)) for r, s in block.sites.items() if r in _ATTN_ROLES]
    if not paths or None in paths:
        return None
    parts = [p.split(".") for p in paths]
    common = parts[0][:-1] if len(parts) == 1 else []
    if len(parts) > 1:
        for seg in zip(*parts):
            if len(set(seg)) != 1:
                break
            common.append(seg[0])
    if not common or ".".join(common) in paths:
        return None
    path = ".".join(common)
    return block.module.get_submodule(path), path


class Staged:
    """Scores an allocation from memoized parts of the block (the module's docstring says which and why)."""

    def __init__(self, calls, sites, masks: Masks, last_fraction: float, attn, in_attn, in_mlp):
        self.calls, self.sites, self.masks = calls, sites, masks
        self.block = calls.block
        self.attn, self.mlp = attn, self.block.mlp
        self.in_attn, self.in_mlp = in_attn, in_mlp            # greedy site names inside A / inside the MLP
        self.o = self.block.sites.get("o")
        self.starts = [int(h.shape[1] * (1.0 - last_fraction)) for h in calls.inputs]
        self.scored = [y[:, s:] for y, s in zip(calls.outputs, self.starts)]     # [B, T', H] dense targets
        self.args: list[tuple] = []                           # A's recorded call per batch (args, kwargs)
        self.attn_rest: tuple | None = None                   # A's outputs after the first (None: A returns a tensor)
        self.o_is_output = False
        self.mlp_adds = False
        self.mlp_width = 0
        self.before_o = [n for n in in_attn if self.o is None or n != self.o.name]
        self.parts: dict[tuple, object] = {}
        self.batch = 0                                        # the batch being scored (site outputs are per batch)
        # a site's input depends on the block's input and the levels of the sites of earlier stages (q/k/v, o,
        # gate/up, down) only: its output is keyed by those levels and its own
        stage = {s.name: _stage(s.role) for s in sites}
        self.deps = {n: [m for m in stage if stage[m] < stage[n]] + [n] for n in stage}
        self._stack = contextlib.ExitStack()

    @classmethod
    def build(cls, calls, sites, masks: Masks, last_fraction: float) -> "Staged | None":
        """The staged evaluator of this block, or None where its first check fails (replay the block whole)."""
        block = calls.block
        found = _attention(block)
        if found is None or not calls.inputs:
            return None
        attn, apath = found
        names = {id(m): n for n, m in block.module.named_modules()}
        mpath = names.get(id(block.mlp)) if block.mlp is not None else None

        def inside(site, path):
            p = names.get(id(site.module))
            return path is not None and p is not None and p.startswith(path + ".")
        in_attn = [s.name for s in sites if inside(s, apath)]
        in_mlp = [s.name for s in sites if inside(s, mpath)]
        if len(in_attn) + len(in_mlp) != len(sites):   # a site elsewhere (an MoE expert): no split known to hold
            return None
        ev = cls(calls, sites, masks, last_fraction, attn, in_attn, in_mlp)
        try:
            return ev if ev._record() else None
        except Exception:  # noqa: BLE001 - a block this split cannot run is replayed whole
            return None

    def _record(self) -> bool:
        """Record A's call on every batch (dense), and check the splits on the first batch."""
        got: dict[str, object] = {}

        def pre(m, args, kwargs):
            self.args.append((args, kwargs))

        def post(m, args, kwargs, out):     # hooks return None: a returned value would replace the output
            got.setdefault("attn", out)

        def o_out(m, args, out):
            got.setdefault("o", out)
        hooks = [self.attn.register_forward_pre_hook(pre, with_kwargs=True),
                 self.attn.register_forward_hook(post, with_kwargs=True)]
        if self.o is not None:
            hooks.append(self.o.module.register_forward_hook(o_out))
        try:
            y0 = None
            for i, h in enumerate(self.calls.inputs):
                y = self.calls.run(h, i)
                y0 = y if y0 is None else y0
        finally:
            for hk in hooks:
                hk.remove()
        out = got["attn"]
        a0 = out[0] if isinstance(out, tuple) else out
        self.attn_rest = tuple(out[1:]) if isinstance(out, tuple) else None
        s = self.starts[0]
        # the rest of the block, run on the scored tail with A's output there, reproduces the block's output
        if not _close(self._rest(0, a0[:, s:], mlp=None), y0[:, s:]):
            return False
        self.o_is_output = self.o is not None and isinstance(got.get("o"), torch.Tensor) and torch.equal(got["o"], a0)
        if self.mlp is not None:
            seen = {}
            y_full = self._rest(0, a0[:, s:], mlp=None, spy=seen)
            m = seen.get("out")
            if isinstance(m, torch.Tensor) and m.shape == y_full.shape:
                self.mlp_width = m.shape[-1]
                y_zero, _ = self._pre(0, a0[:, s:])
                d = torch.randn_like(m) * (m.float().std() + 1e-6)
                y_bump = self._rest(0, a0[:, s:], mlp=lambda x: m + d)
                self.mlp_adds = _close(y_full - y_zero, m) and _close(y_bump - y_full, d)
        else:
            self.mlp_adds = False
        return True

    def __enter__(self):
        for s in self.sites:
            self._stack.enter_context(_forward(s.module, self._memoized(s.name, s.module.forward)))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self.parts.clear()

    # -- the site outputs -------------------------------------------------------------------------------
    def _memoized(self, name: str, forward):
        """A site's forward that masks its input, computed once per batch, call context and levels it depends on."""
        def fwd(x, *args, **kwargs):
            key = (("site", name, self.masks.offset, self.masks.length), self.batch,
                   self._key(self.masks.level, self.deps[name]))
            return self._part(key, lambda: forward(self.masks(name, x), *args, **kwargs))
        return fwd

    # -- the parts --------------------------------------------------------------------------------------
    def _part(self, key: tuple, compute):
        """The part `key` = (what, batch, levels of the sites it depends on), computed once."""
        got = self.parts.get(key)
        if got is None or got[1] != _versions(got[0]):
            value = compute()
            got = self.parts[key] = (value, _versions(value))
        return got[0]

    def _core(self, i: int) -> torch.Tensor:
        """o's input on the scored tail of batch i [B, T', C]: A run on the whole window, stopped at o."""
        got = []

        def stop(m, args):
            got.append(args[0][:, self.starts[i]:].contiguous())   # not a view: the whole window is freed
            raise _Stop
        hook = self.o.module.register_forward_pre_hook(stop)
        args, kwargs = self.args[i]
        try:
            with self.masks.at(0, None):
                self.attn(*args, **kwargs)
        except _Stop:
            pass
        finally:
            hook.remove()
        return got[0]

    def _attn_out(self, i: int, level: dict) -> torch.Tensor:
        """A's output on the scored tail of batch i [B, T', H]."""
        s, n = self.starts[i], self.calls.inputs[i].shape[1]
        if self.o_is_output:
            core = self._part(("core", i, self._key(level, self.before_o)), lambda: self._core(i))
            with self.masks.at(s, n):
                return self.o.module(core)
        args, kwargs = self.args[i]
        with self.masks.at(0, None):
            out = self.attn(*args, **kwargs)
        return (out[0] if isinstance(out, tuple) else out)[:, s:].contiguous()

    def _substituted_attn(self, a: torch.Tensor):
        rest = self.attn_rest
        return _forward(self.attn, lambda *args, **kwargs: a if rest is None else (a,) + rest)

    def _rest(self, i: int, a: torch.Tensor, mlp=None, spy: dict | None = None) -> torch.Tensor:
        """The block's output on the scored tail of batch i, from A's output `a` there (`mlp`: in place of the MLP)."""
        h, s = self.calls.inputs[i], self.starts[i]
        with contextlib.ExitStack() as st:
            st.enter_context(self._substituted_attn(a))
            st.enter_context(self.masks.at(s, h.shape[1]))
            if mlp is not None:
                st.enter_context(_forward(self.mlp, mlp))
            if spy is not None:
                def see(m, args, out):
                    spy.setdefault("out", out)
                st.callback(self.mlp.register_forward_hook(see).remove)
            return self.calls.run(h[:, s:], i)

    def _pre(self, i: int, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the block's output on the scored tail without the MLP's, the MLP's input there)."""
        seen = []

        def zero(x, *args, **kwargs):
            seen.append(x)
            return x.new_zeros(*x.shape[:-1], self.mlp_width)
        y = self._rest(i, a, mlp=zero)
        return y, seen[0]

    @staticmethod
    def _key(level: dict, names: list[str]) -> tuple:
        return tuple((n, level[n]) for n in names)

    def error(self, level: dict[str, float]) -> float:
        """Mean over scored tokens of the L2 distance to the dense block output."""
        self.masks.level = level
        ka, km = self._key(level, self.in_attn), self._key(level, self.in_mlp)
        err, n = 0.0, 0
        for i, target in enumerate(self.scored):
            self.batch = i
            a = self._part(("attn", i, ka), lambda: self._attn_out(i, level))
            if self.mlp_adds:
                pre, x = self._part(("pre", i, ka), lambda: self._pre(i, a))
                with self.masks.at(self.starts[i], self.calls.inputs[i].shape[1]):
                    y = pre + self._part(("mlp", i, ka + km), lambda: self.mlp(x))
            else:
                y = self._part(("rest", i, ka + km), lambda: self._rest(i, a))
            d = (y - target).float().norm(dim=-1)                # [B, T']
            err += float(d.sum())
            n += d.numel()
        return err / max(n, 1)

    def advance(self, level: dict[str, float]) -> None:
        """The search moved to `level`: drop what no later allocation can use (levels only rise)."""
        def stale(key):
            return any(lv < level[n] for n, lv in key)
        self.parts = {k: v for k, v in self.parts.items() if not stale(k[2])}
