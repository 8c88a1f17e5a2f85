"""TEAL block-wise greedy allocation: first step, level choice, thresholds, staged parts vs whole-block replays."""
import pytest
import torch

import actsparse as asp
from actsparse.models.sites import find_blocks
from actsparse.sparsifiers import greedy
from actsparse.sparsifiers._calib import calib_windows, capture_blocks
from tests.methods.conftest import np_quantile_abs


def _block_error(model, stats, layer, site_levels, tokens=512, last_fraction=0.25, mask_fraction=1.0):
    """Independent: block output error with each site's input masked at numpy's |x| quantile
    (on the last `mask_fraction` of positions only)."""
    block = find_blocks(model)[layer]
    calls = capture_blocks(model, calib_windows(stats, tokens), batch_size=16)[layer]
    hooks = []
    for role, site in block.sites.items():
        lv = site_levels.get(site.name, 0.0)
        if lv > 0:
            t = np_quantile_abs(stats[site.name].sample, lv)
            def pre(m, a, t=t):
                x = a[0]
                start = x.shape[1] - int(x.shape[1] * mask_fraction)
                keep = x.abs() > t
                keep[:, :start] = True
                return (x * keep,)
            hooks.append(site.module.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            errs = []
            for i, h in enumerate(calls.inputs):
                y = calls.run(h, i)
                s = int(y.shape[1] * (1 - last_fraction))
                errs.append((y[:, s:] - calls.outputs[i][:, s:]).norm(dim=-1).flatten())
    finally:
        for hk in hooks:
            hk.remove()
    return float(torch.cat(errs).mean())


def test_greedy_first_step_takes_the_least_harmful_site(llama):
    model, stats = llama
    block = find_blocks(model)[0]
    o = block.sites["o"].n_params
    total = sum(s.n_params for s in block.sites.values())
    target = 0.8 * 0.05 * o / total          # most of one step: the closest recorded level is one step
    plan = asp.fit("teal", stats, target, model=model, allocation="greedy", calib_tokens=512)
    levels = {s.name: plan.rules[s.name].expected_sparsity for s in block.sites.values()}
    raised = [n for n, v in levels.items() if v > 0]
    assert len(raised) == 1
    step = {s.name: 0.05 * o / s.n_params for s in block.sites.values()}
    errors = {n: _block_error(model, stats, 0, {n: step[n]}) for n in step}
    assert raised[0] == min(errors, key=errors.get)
    assert levels[raised[0]] == pytest.approx(step[raised[0]])


def test_greedy_mask_fraction_masks_only_the_last_positions_while_searching(llama):
    model, stats = llama
    block = find_blocks(model)[1]
    o = block.sites["o"].n_params
    total = sum(s.n_params for s in block.sites.values())
    target = 0.8 * 0.05 * o / total
    plan = asp.fit("teal", stats, target, model=model, allocation="greedy", calib_tokens=512, greedy_mask_fraction=0.5)
    levels = {s.name: plan.rules[s.name].expected_sparsity for s in block.sites.values()}
    raised = [n for n, v in levels.items() if v > 0]
    step = {s.name: 0.05 * o / s.n_params for s in block.sites.values()}
    errors = {n: _block_error(model, stats, 1, {n: step[n]}, mask_fraction=0.5) for n in step}
    assert raised == [min(errors, key=errors.get)]
    with pytest.raises(asp.ActsparseError, match="teal greedy_mask_fraction must be in"):
        asp.fit("teal", stats, 0.5, model=model, allocation="greedy", greedy_mask_fraction=0.0)


def test_teal_paper_preset_holds_valid_teal_params():
    from pathlib import Path

    import yaml

    from actsparse.sparsifiers.registry import get_method, make_params
    conf = yaml.safe_load((Path(__file__).resolve().parents[2] / "conf/method/teal_paper.yaml").read_text())
    p = make_params(get_method(conf["name"]), conf["params"])
    assert (p.allocation, p.base_step, p.calib_tokens, p.greedy_mask_fraction) == ("greedy", 0.025, 20480, 0.5)


def test_greedy_reaches_target_with_numpy_thresholds(gelu):
    model, stats = gelu
    plan = asp.fit("teal", stats, 0.4, model=model, allocation="greedy", calib_tokens=256, base_step=0.2)
    for b in find_blocks(model):
        sites = list(b.sites.values())
        f = sum(s.n_params * plan.rules[s.name].expected_sparsity for s in sites) / sum(s.n_params for s in sites)
        half_step = 0.5 * 0.2 * b.sites["o"].n_params / sum(s.n_params for s in sites)
        assert abs(f - 0.4) <= half_step + 1e-9
        assert plan.rules[sites[0].name].attrs["block_effective"] == pytest.approx(f)
        for s in sites:
            r = plan.rules[s.name]
            assert r.tensors["thresh"].item() == pytest.approx(np_quantile_abs(stats[s.name].sample, r.expected_sparsity),
                                                              rel=1e-5, abs=1e-7)
    assert plan.effective_sparsity == pytest.approx(0.4, abs=0.01)


def test_greedy_staged_parts_choose_what_whole_block_replays_choose(llama, monkeypatch):
    model, stats = llama
    kw = dict(model=model, allocation="greedy", calib_tokens=256, base_step=0.2)
    greedy._TRAJECTORIES.clear()
    fast = asp.fit("teal", stats, 0.3, **kw)
    monkeypatch.setattr(greedy.Staged, "build", classmethod(lambda cls, *a: None))
    greedy._TRAJECTORIES.clear()
    slow = asp.fit("teal", stats, 0.3, **kw)
    assert {p: r.expected_sparsity for p, r in fast.rules.items()} == {p: r.expected_sparsity for p, r in slow.rules.items()}


def test_greedy_trajectory_is_reused_and_extended_across_targets(gelu, monkeypatch):
    model, stats = gelu
    kw = dict(model=model, allocation="greedy", calib_tokens=256, base_step=0.2)
    greedy._TRAJECTORIES.clear()
    fresh = {s: asp.fit("teal", stats, s, **kw) for s in (0.2, 0.45)}     # 0.45 extends 0.2's trajectory
    calls = []
    monkeypatch.setattr(greedy, "capture_blocks", lambda *a, **k: calls.append(1))
    again = asp.fit("teal", stats, 0.3, **kw)                              # read off the cached trajectory
    assert calls == []
    greedy._TRAJECTORIES.clear()
    monkeypatch.undo()
    for s, plan in fresh.items():
        scratch = asp.fit("teal", stats, s, **kw)
        greedy._TRAJECTORIES.clear()
        assert {p: r.expected_sparsity for p, r in plan.rules.items()} == \
            {p: r.expected_sparsity for p, r in scratch.rules.items()}
    assert again.effective_sparsity == pytest.approx(0.3, abs=0.05)


def test_greedy_bad_inputs(llama):
    model, stats = llama
    with pytest.raises(asp.ActsparseError, match="pass model="):
        asp.fit("teal", stats, 0.5, allocation="greedy")
    with pytest.raises(asp.ActsparseError, match="base_step"):
        asp.fit("teal", stats, 0.5, allocation="greedy", base_step=0.0, model=model)
    with pytest.raises(asp.ActsparseError, match="last_fraction"):
        asp.fit("teal", stats, 0.5, allocation="greedy", last_fraction=1.5, model=model)
    with pytest.raises(asp.ActsparseError, match="allocation must be one of"):
        asp.fit("teal", stats, 0.5, allocation="greedyy")
    with pytest.raises(asp.ActsparseError, match="roles"):
        asp.fit("teal", stats, 0.5, roles=("mlp",))
