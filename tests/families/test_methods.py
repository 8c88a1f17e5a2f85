"""Every registered method on every model family: calibrate, fit, run the torch backend.

A method that needs a dense gated MLP (CATS, M-COUNTDOWN) raises ActsparseError at fit time on other
families; that is a skip with its message as the reason. On dense gated families every method must fit.
"""
from __future__ import annotations

import functools
import re

import pytest
import torch

import actsparse as asp
from actsparse.models.sites import find_sites
from tests.families.models import FAMILIES, VOCAB, make_family, model_output

METHODS = sorted(asp.methods())
SPARSITY = 0.5
# methods run forward passes on their own calibration budget; keep it small on 2 CPU cores
SMALL = {"calib_tokens": 256}
# what a method says when a model has no dense gated MLP (MoE models have experts, not a dense MLP)
NOT_GATED = re.compile(r"needs a gated MLP|no calibration statistics for probe 'layers\.\d+\.(gate_act|up_out)'")
# what a method says when a family has no MLP at all (a Mamba mixer): not applicable, like NOT_GATED
NO_MLP = re.compile(r"has no MLP with up and down projections")
# a method limited to some families names them when refusing another (LaRoSA folds RMSNorm weights)
FAMILY_LIMITED = re.compile(r"larosa supports (?P<kinds>[a-z0-9_, ]+) models")


class _IdTok:
    """Tokenizes a document of space-separated integers into those ids (eos 0)."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": [int(t) for t in text.split()]}


@functools.lru_cache(maxsize=None)
def calibrated(kind: str):
    """(model, stats) for a one-block model of a family: 256 calibration tokens of a fixed random id stream."""
    model = make_family(kind, layers=1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (4, 64), generator=g)
    data = asp.TextData(f"ids-{kind}", tuple(" ".join(map(str, r.tolist())) for r in ids))
    stats = asp.calibrate(model, _IdTok(), data=data, tokens=256, seq_len=64, sample_size=4096, progress=False)
    return model, stats


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_method_runs_on_family_with_torch_backend(kind, method):
    model, stats = calibrated(kind)
    params = {k: v for k, v in SMALL.items() if k in asp.methods()[method]}
    try:
        plan = asp.fit(method, stats, sparsity=SPARSITY, model=model, **params)
    except asp.ActsparseError as e:
        # only "needs a dense gated MLP" is a reason to skip, and only on a family without one
        if NO_MLP.search(str(e)) and kind == "mamba2":
            pytest.skip(f"{method} does not apply to {kind} (no MLP): {e}")
        limited = FAMILY_LIMITED.search(str(e))
        if limited and kind not in limited.group("kinds").split(", "):
            pytest.skip(f"{method} does not support {kind}: {e}")
        if FAMILIES[kind][1] or not NOT_GATED.search(str(e)):
            raise
        pytest.skip(f"{method} does not apply to {kind} (no dense gated MLP): {e}")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    sites = find_sites(model)
    seen: dict[str, torch.Tensor] = {}  # each site's actual input during the sparse pass
    with torch.no_grad():
        dense = model_output(model, ids)
        with asp.sparsify(model, plan, backend="torch") as h:
            hooks = [sites[n].module.register_forward_pre_hook(
                lambda m, a, n=n: seen.__setitem__(n, torch.cat([seen[n], a[0].flatten()]) if n in seen
                                                   else a[0].flatten())) for n in sites]
            try:
                y = model_output(model, ids)
            finally:
                for hk in hooks:
                    hk.remove()
        again = model_output(model, ids)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(again, dense)  # the plan is lifted on exit
    ms = h.measured_sparsity()
    if method == "dense":
        assert plan.rules == {} and torch.equal(y, dense)
        return
    assert plan.rules, f"{method} fitted no rule on {kind}"
    assert not torch.allclose(y, dense), f"{method} changed nothing on {kind}"
    assert ms["mean"] > 0.05 and 0.0 < plan.effective_sparsity <= 1.0
    if method == "teal":
        # every site's input thresholded at its calibration quantile: the measured zero fraction is exactly
        # the fraction of that input at or below its threshold
        assert set(ms["per_point"]) == set(stats.meta["sites"])
        for n, frac in ms["per_point"].items():
            t = float(plan.rules[n].tensors["thresh"])
            assert frac == pytest.approx(float((seen[n].abs() <= t).double().mean()), abs=1e-9), n
        assert 0.2 < ms["mean"] < 0.8


@pytest.mark.parametrize("method, probe", [("cats", "gate_act"), ("countdown", "up_out")])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_gated_mlp_methods_threshold_every_expert_on_its_own_tokens(kind, method, probe):
    """CATS / M-COUNTDOWN on MoE: one rule per gated expert (and shared expert), each at the quantile of the
    activations routed to that expert, and each expert's measured zeros equal the share of its routed
    activations at or below its threshold (hooked independently on the expert's own module)."""
    from actsparse.models.sites import find_blocks

    model, stats = calibrated(kind)
    plan = asp.fit(method, stats, sparsity=SPARSITY)
    (block,) = find_blocks(model)
    mlps = [m for m in block.mlps if m.gated]
    want = {f"layers.0.{m.prefix}{probe}" for m in mlps}
    assert set(plan.rules) == want and len(want) >= 4
    for point in want:
        assert float(plan.rules[point].tensors["thresh"]) == pytest.approx(stats[point].abs_quantile(SPARSITY))
    seen: dict[str, list] = {p: [] for p in want}
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y_dense = model_output(model, ids)
        with asp.sparsify(model, plan, backend="torch") as h:
            # observe each expert's activations where the rule sees them
            hooks = [(m.act if probe == "gate_act" else m.sites["up"].module).register_forward_hook(
                lambda mod_, a, out, p=f"layers.0.{m.prefix}{probe}": seen[p].append(out.detach().flatten()),
                prepend=True) for m in mlps]
            try:
                y = model_output(model, ids)
            finally:
                for hk in hooks:
                    hk.remove()
    assert not torch.allclose(y, y_dense)
    per_point = h.measured_sparsity()["per_point"]
    routed = [p for p in want if seen[p]]
    assert routed, "no expert saw a token"
    for p in routed:
        t = float(plan.rules[p].tensors["thresh"])
        v = torch.cat(seen[p])
        assert per_point[p] == pytest.approx(float((v.abs() <= t).double().mean()), abs=1e-9), p
