"""The block-wise greedy search: the staged evaluator takes the steps of a plain whole-block greedy, on every family."""
import pytest
import torch

import actsparse as asp
from actsparse.calibration.quantile import AbsThresholds
from actsparse.models.sites import find_blocks
from actsparse.sparsifiers import greedy
from actsparse.sparsifiers._calib import calib_windows, capture_blocks, collect
from actsparse.sparsifiers.wina import WinaParams, WinaThresholds, site_scores
from tests.families.models import VOCAB, make_family
from tests.methods.conftest import np_quantile_abs, random_norms, tiny_llama


def _record(model, layer, windows):
    """The block's inputs, call kwargs and dense outputs, every window in one batch."""
    block = find_blocks(model)[layer].module
    got = {}
    hooks = [block.register_forward_pre_hook(
                 lambda m, a, kw: got.update(h=a[0] if a else kw["hidden_states"],
                                             kw={k: v for k, v in kw.items() if k != "hidden_states"}),
                 with_kwargs=True),
             block.register_forward_hook(lambda m, a, out: got.update(y=out[0] if isinstance(out, tuple) else out))]
    try:
        with torch.no_grad():
            model(windows, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return got


def reference_greedy(model, layer, windows, thresh, target, base_step, last_fraction=0.25, mask_fraction=1.0,
                     mask=None):
    """Independent: TEAL's greedy with every candidate scored by a plain forward of the whole block.

    `thresh[name](level)` is the site's threshold; `mask(name, x, t)` masks its input (default x * (|x| > t)).
    Returns {site: level} at the recorded step closest to the target, and that step's block effective sparsity.
    """
    b = find_blocks(model)[layer]
    sites = list(b.sites.values())
    rec = _record(model, layer, windows)
    size = {s.name: s.n_params for s in sites}
    total = sum(size.values())
    step = {n: base_step * b.sites["o"].n_params / p for n, p in size.items()}
    level = {n: 0.0 for n in size}
    history = [(0.0, dict(level))]

    def error(lv):
        hooks = []
        for s in sites:
            t = thresh[s.name](lv[s.name])
            if not torch.is_tensor(t) and t <= 0.0:           # sparsity 0 leaves the input as it is
                continue

            def pre(m, a, t=t, name=s.name):
                x = a[0]
                xs = x * (x.abs() > t) if mask is None else mask(name, x, t)
                keep_from = x.shape[1] - int(x.shape[1] * mask_fraction)
                xs[:, :keep_from] = x[:, :keep_from]
                return (xs,)
            hooks.append(s.module.register_forward_pre_hook(pre))
        try:
            with torch.no_grad():
                out = b.module(rec["h"], **rec["kw"])
        finally:
            for h in hooks:
                h.remove()
        y = out[0] if isinstance(out, tuple) else out
        start = int(y.shape[1] * (1 - last_fraction))
        return float((y[:, start:] - rec["y"][:, start:]).norm(dim=-1).mean())

    def effective(lv):
        return sum(size[n] * lv[n] for n in lv) / total
    while effective(level) < target - 1e-12:
        errs = {n: error({**level, n: level[n] + step[n]}) for n in size if level[n] + step[n] <= 0.99}
        best = min(errs, key=errs.get)
        level[best] += step[best]
        history.append((effective(level), dict(level)))
    return min(history, key=lambda fl: abs(fl[0] - target))


@pytest.fixture(scope="module")
def fresh(tok):
    """A tiny Llama never seen by another test, calibrated on 1,024 tokens (two greedy batches of 16 windows)."""
    model = random_norms(tiny_llama(seed=23), seed=24)
    return model, asp.calibrate(model, tok, tokens=1024, seq_len=32, batch_size=8, sample_size=8192, progress=False)


@pytest.mark.parametrize("mask_fraction", [1.0, 0.5])
def test_teal_greedy_chooses_the_levels_of_an_independent_whole_block_greedy(fresh, mask_fraction):
    model, stats = fresh
    greedy._TRAJECTORIES.clear()
    plan = asp.fit("teal", stats, 0.4, model=model, allocation="greedy", calib_tokens=1024,
                   greedy_mask_fraction=mask_fraction)
    windows = calib_windows(stats, 1024)
    for b in find_blocks(model):
        thresh = {s.name: (lambda lv, v=stats[s.name].sample: np_quantile_abs(v, lv) if lv > 0 else 0.0)
                  for s in b.sites.values()}
        f, want = reference_greedy(model, b.layer, windows, thresh, 0.4, 0.05, mask_fraction=mask_fraction)
        got = {n: plan.rules[n].expected_sparsity for n in want}
        assert got == want
        assert plan.rules[f"layers.{b.layer}.o"].attrs["block_effective"] == f
        assert len({v for v in got.values()}) > 2          # the search spread the levels: a real test


def test_wina_paper_greedy_chooses_the_levels_of_an_independent_whole_block_greedy(fresh):
    model, stats = fresh
    greedy._TRAJECTORIES.clear()
    kw = dict(transform=True, selection="topk", allocation="greedy", calib_tokens=1024, greedy_mask_fraction=0.99)
    plan = asp.fit("wina", stats, 0.4, model=model, **kw)
    windows = calib_windows(stats, 1024)
    params = WinaParams(**kw)
    for b in find_blocks(model):
        sites = list(b.sites.values())
        scores = site_scores(model, params, {s.name for s in sites})
        X = collect(model, windows, {s.name: (s.module, "input") for s in sites})
        wt = {s.name: WinaThresholds(X[s.name], scores[s.name], "cpu") for s in sites}
        f, want = reference_greedy(model, b.layer, windows, wt, 0.4, 0.05, mask_fraction=0.99,
                                   mask=lambda name, x, t: wt[name].mask(x, t))
        for s in sites:
            r = plan.rules[s.name]
            c = s.in_features
            assert r.attrs["n_zero"] == c - int(c * (1.0 - want[s.name])), s.name
            assert r.attrs["block_effective"] == f
        assert want[f"layers.{b.layer}.k"] >= 0.5        # the rotated GQA k's zero columns are free steps


def _family_windows(n=20, t=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n, t), generator=g)


# gemma: the MLP's output is normed before the residual add (no MLP split); neox and gpt2: a fused qkv, neox's
# residual in parallel; mixtral and qwen2_moe: expert sites outside a dense MLP (replayed whole)
@pytest.mark.parametrize("family,staged", [("llama", True), ("qwen3", True), ("gemma", True), ("neox", True),
                                           ("gpt2", True), ("mixtral", False), ("qwen2_moe", False)])
@pytest.mark.parametrize("mask_fraction", [1.0, 0.5])
def test_staged_evaluation_takes_the_steps_of_whole_block_replays_on_every_family(family, staged, mask_fraction,
                                                                                  monkeypatch):
    from actsparse.models.moe import install_routing

    model = make_family(family, seed=5)
    install_routing(model)
    windows = _family_windows()
    calls = capture_blocks(model, windows, batch_size=16)[1]           # two batches: 16 + 4 windows
    X = collect(model, windows, {s.name: (s.module, "input") for s in calls.block.sites.values()})
    sites = [s for s in calls.block.sites.values() if X[s.name].numel()]     # experts no token was routed to: none
    th = {s.name: AbsThresholds(X[s.name]) for s in sites}
    masks = greedy.Masks(th, mask_fraction)
    assert (greedy.Staged.build(calls, sites, masks, 0.25) is not None) == staged
    if not staged:
        return
    run = dict(target=0.3, base_step=0.05, last_fraction=0.25, mask_fraction=mask_fraction)
    got = greedy.greedy_block(calls, sites, th, **run)
    monkeypatch.setattr(greedy.Staged, "build", classmethod(lambda cls, *a: None))
    want = greedy.greedy_block(calls, sites, th, **run)
    assert got == want
    assert len(got) > 5


def test_staged_parts_are_dropped_once_no_later_allocation_can_use_them(fresh):
    model, stats = fresh
    calls = capture_blocks(model, calib_windows(stats, 1024), batch_size=16)[0]
    sites = list(calls.block.sites.values())
    th = {s.name: AbsThresholds(stats[s.name].sample) for s in sites}
    ev = greedy.Staged.build(calls, sites, greedy.Masks(th, 1.0), 0.25)
    assert ev.o_is_output and ev.mlp_adds
    level = {s.name: 0.0 for s in sites}
    with ev:
        for s in sites:
            ev.error({**level, s.name: 0.1})
        level["layers.0.q"] = 0.1
        ev.advance(level)
        for key in ev.parts:
            assert all(lv >= level[n] for n, lv in key[2])
        assert any(key[0][0] == "site" for key in ev.parts)                      # site outputs are parts too
        assert any(n == "layers.0.q" for key in ev.parts for n, _ in key[2])   # q's raised level is kept
    assert ev.parts == {}
