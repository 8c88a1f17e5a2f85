"""WINA: scores |x_i| ||W_{:,i}||, per-channel thresholds, reference vs own norms, greedy, sequential, errors."""
import numpy as np
import pytest
import torch

import actsparse as asp
from actsparse.eval.speed import plan_to_engine
from actsparse.models.sites import find_blocks, find_sites
from actsparse.sparsifiers._calib import calib_windows


def _inputs(model, windows, names, rules=None, stats=None):
    """Independent capture: every token's input at the named sites, [N, C] float64, via plain hooks."""
    sites = find_sites(model)
    got = {n: [] for n in names}
    hooks = [sites[n].module.register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0].reshape(-1, a[0].shape[-1]).double()))
             for n in names]
    try:
        with torch.no_grad():
            if rules is None:
                model(windows)
            else:
                from actsparse.sparsifiers._calib import installed
                with installed(model, rules, stats):
                    model(windows)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


@pytest.mark.parametrize("sparsity", [0.3, 0.6])
def test_wina_thresholds_are_quantiles_of_weight_scaled_scores(llama, sparsity):
    model, stats = llama
    plan = asp.fit("wina", stats, sparsity, model=model, column_norms="own", calib_tokens=512)
    sites = find_sites(model)
    X = _inputs(model, calib_windows(stats, 512), list(sites))
    for name, site in sites.items():
        n = site.module.weight.detach().double().norm(dim=0)                # ||W_{:,i}||_2, [in]
        t = np.quantile((X[name].abs() * n).numpy(), sparsity)
        got = plan.rules[name].tensors["thresh"]
        assert got.shape == (site.in_features,)
        torch.testing.assert_close(got.double(), t / n, rtol=2e-5, atol=1e-9)


def test_wina_reference_norms_score_k_and_gate_only(llama):
    model, stats = llama
    plan = asp.fit("wina", stats, 0.5, model=model, calib_tokens=512)
    X = _inputs(model, calib_windows(stats, 512), ["layers.1.q", "layers.1.k", "layers.1.up", "layers.1.gate"])
    sites = find_sites(model)
    for name in ("layers.1.q", "layers.1.up"):        # plain |x| quantile, a scalar threshold (TEAL's)
        r = plan.rules[name].tensors["thresh"]
        assert r.dim() == 0
        assert float(r) == pytest.approx(np.quantile(X[name].abs().numpy(), 0.5), rel=1e-5)
    for name in ("layers.1.k", "layers.1.gate"):
        n = sites[name].module.weight.detach().double().norm(dim=0)
        t = np.quantile((X[name].abs() * n).numpy(), 0.5)
        torch.testing.assert_close(plan.rules[name].tensors["thresh"].double(), t / n, rtol=2e-5, atol=1e-9)


def test_wina_rule_keeps_channels_by_score_on_fresh_inputs(llama):
    model, stats = llama
    plan = asp.fit("wina", stats, 0.5, model=model, column_norms="own", calib_tokens=512)
    site = find_sites(model)["layers.0.down"]
    w = site.module.weight.detach()
    n = w.norm(dim=0)
    x = torch.randn(3, 7, site.in_features) * 0.1
    score = x.abs() * n
    t_score = float((plan.rules[site.name].tensors["thresh"] * n).median())   # t/n*n: one scalar t
    keep = score > t_score
    want = (x * keep) @ w.T
    with asp.sparsify(model, plan) as h:
        got = site.module(x)
        measured = h.measured_sparsity()["per_point"][site.name]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert measured == pytest.approx(float((~keep).float().mean()))


def test_wina_greedy_levels_reach_target_and_take_wina_thresholds(llama):
    model, stats = llama
    plan = asp.fit("wina", stats, 0.4, model=model, allocation="greedy", column_norms="own",
                   calib_tokens=256, base_step=0.2)
    X = _inputs(model, calib_windows(stats, 256), list(find_sites(model)))
    for b in find_blocks(model):
        sites = list(b.sites.values())
        f = sum(s.n_params * plan.rules[s.name].expected_sparsity for s in sites) / sum(s.n_params for s in sites)
        assert abs(f - 0.4) <= 0.5 * 0.2 * b.sites["o"].n_params / sum(s.n_params for s in sites) + 1e-9
        for s in sites:
            lv = plan.rules[s.name].expected_sparsity
            if lv == 0:
                assert float(plan.rules[s.name].tensors["thresh"].abs().max()) == 0.0
                continue
            n = s.module.weight.detach().double().norm(dim=0)
            t = np.quantile((X[s.name].abs() * n).numpy(), lv)
            torch.testing.assert_close(plan.rules[s.name].tensors["thresh"].double(), t / n, rtol=2e-5, atol=1e-9)


def test_wina_sequential_fits_each_layer_on_sparsified_inputs(llama):
    model, stats = llama
    plan = asp.fit("wina", stats, 0.5, model=model, sequential=True, column_norms="own", calib_tokens=512)
    windows = calib_windows(stats, 512)
    layer0 = [r for p, r in plan.rules.items() if p.startswith("layers.0.")]
    X = _inputs(model, windows, ["layers.1.q"], rules=layer0, stats=stats)["layers.1.q"]
    n = find_sites(model)["layers.1.q"].module.weight.detach().double().norm(dim=0)
    t = np.quantile((X.abs() * n).numpy(), 0.5)
    torch.testing.assert_close(plan.rules["layers.1.q"].tensors["thresh"].double(), t / n, rtol=2e-5, atol=1e-9)


def test_wina_plan_runs_on_the_triton_backend_as_per_channel_thresholds(llama):
    model, stats = llama
    plan = asp.fit("wina", stats, 0.5, model=model, calib_tokens=256)
    eng = plan_to_engine(plan)
    k, q, down = eng.site(0, "k"), eng.site(0, "q"), eng.site(1, "down")
    assert torch.is_tensor(k.thresh) and k.thresh.shape == (64,)
    torch.testing.assert_close(k.thresh, plan.rules["layers.0.k"].tensors["thresh"])
    assert isinstance(q.thresh, float)
    assert down.expected == 0.5


def test_wina_plan_roundtrips_through_safetensors(llama, tmp_path):
    model, stats = llama
    plan = asp.fit("wina", stats, 0.5, model=model, calib_tokens=256)
    plan.save(tmp_path / "p")
    back = asp.SparsityPlan.load(tmp_path / "p")
    for p, r in plan.rules.items():
        torch.testing.assert_close(back.rules[p].tensors["thresh"], r.tensors["thresh"])
    assert back.params["column_norms"] == "reference"


@pytest.mark.parametrize("params, match", [
    ({"allocation": "greedy", "sequential": True}, "sequential=True is offered with allocation='uniform'"),
    ({"column_norms": "rows"}, "column_norms must be one of"),
    ({"roles": ("mlp",)}, "wina roles must be a non-empty subset"),
    ({"base_step": 0.0}, "wina base_step must be in"),
    ({"norms": "own"}, "has no parameter"),
])
def test_wina_rejects_bad_params(llama, params, match):
    model, stats = llama
    with pytest.raises(asp.ActsparseError, match=match):
        asp.fit("wina", stats, 0.5, model=model, **params)


def test_wina_needs_the_model(llama):
    _, stats = llama
    with pytest.raises(asp.ActsparseError, match="pass model="):
        asp.fit("wina", stats, 0.5)


def test_methods_lists_wina_with_typed_params():
    m = asp.methods()["wina"]
    assert m["column_norms"] == {"type": "Literal", "default": "reference"}
    assert m["selection"] == {"type": "Literal", "default": "threshold"}
    assert m["transform"] == {"type": "bool", "default": False}
    assert m["sequential"]["type"] == "bool"
    import sys

    from actsparse.sparsifiers.registry import get_method
    cls = get_method("wina")
    assert cls.__doc__ and "arXiv 2505.19427" in sys.modules[cls.__module__].__doc__


def test_wina_paper_preset_holds_the_reference_protocol():
    from pathlib import Path

    import yaml

    from actsparse.sparsifiers.registry import get_method, make_params
    root = Path(__file__).resolve().parents[2]
    conf = yaml.safe_load((root / "conf/method/wina_paper.yaml").read_text())
    p = make_params(get_method(conf["name"]), conf["params"])
    assert (p.transform, p.selection, p.column_norms, p.allocation) == (True, "topk", "reference", "greedy")
    assert (p.base_step, p.last_fraction, p.greedy_mask_fraction) == (0.025, 0.25, 0.99)
    sweep = yaml.safe_load((root / "sweeps/wina_paper.yaml").read_text())
    assert sweep["eval"]["token_policy"] == "last_fraction=0.99"
    assert sweep["hydra"]["sweeper"]["params"]["sparsity"] == "0.25,0.4,0.5,0.65"
