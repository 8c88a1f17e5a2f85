"""CATS and COUNTDOWN: thresholds against numpy, sparsified MLP outputs against hand-written formulas."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import actsparse as asp
from tests.methods.conftest import fresh_x, np_quantile_abs


def test_cats_threshold_is_numpy_quantile_and_skips_up_and_down(llama):
    model, stats = llama
    plan = asp.fit("cats", stats, 0.6)
    for i in range(2):
        r = plan.rules[f"layers.{i}.gate_act"]
        assert r.tensors["thresh"].item() == pytest.approx(np_quantile_abs(stats[f"layers.{i}.gate_act"].sample, 0.6), rel=1e-5)
        assert r.skips == [f"layers.{i}.up", f"layers.{i}.down"]
    # effective sparsity: 60% of up+down reads (2/3 of the MLP), gate dense, attention dense
    sp = plan.site_params
    mlp = sum(v for k, v in sp.items() if k.split(".")[-1] in ("up", "down"))
    assert plan.effective_sparsity == pytest.approx(0.6 * mlp / sum(sp.values()))


def test_cats_mlp_output_matches_formula(llama):
    model, stats = llama
    plan = asp.fit("cats", stats, 0.5)
    mlp = model.model.layers[1].mlp
    x = fresh_x(model)
    t = plan.rules["layers.1.gate_act"].tensors["thresh"]
    a = F.silu(x @ mlp.gate_proj.weight.T)
    want = ((a * (a.abs() > t)) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    with asp.sparsify(model, plan):
        got = mlp(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cats_and_countdown_m_need_a_gated_mlp(gelu):
    _, stats = gelu
    with pytest.raises(asp.ActsparseError, match="needs a gated MLP"):
        asp.fit("cats", stats, 0.5)
    with pytest.raises(asp.ActsparseError, match="needs a gated MLP"):
        asp.fit("countdown", stats, 0.5, mode="m")


def test_m_countdown_thresholds_up_output_and_skips_gate_and_down(llama):
    model, stats = llama
    plan = asp.fit("countdown", stats, 0.7, mode="m")
    r = plan.rules["layers.0.up_out"]
    assert r.tensors["thresh"].item() == pytest.approx(np_quantile_abs(stats["layers.0.up_out"].sample, 0.7), rel=1e-5)
    assert r.skips == ["layers.0.gate", "layers.0.down"]
    mlp = model.model.layers[0].mlp
    x = fresh_x(model, seed=3)
    u = x @ mlp.up_proj.weight.T
    want = (F.silu(x @ mlp.gate_proj.weight.T) * u * (u.abs() > r.tensors["thresh"])) @ mlp.down_proj.weight.T
    with asp.sparsify(model, plan) as h:
        got = mlp(x)
        assert h.measured_sparsity()["per_point"]["layers.0.up_out"] == pytest.approx(
            float((u.abs() <= r.tensors["thresh"]).float().mean()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture", ["llama", "gelu"])
def test_oracle_keeps_each_tokens_top_coefficients(fixture, request):
    model, stats = request.getfixturevalue(fixture)
    plan = asp.fit("countdown", stats, 0.5, mode="oracle")
    z = torch.randn(4, 7, stats.meta["sites"]["layers.0.down"][0])
    from actsparse.sparsifiers.kinds import rule_fn
    r = plan.rules["layers.0.down"]
    y, nz = rule_fn(r.kind)(r, z, lambda t: t, None)
    k = int(z.shape[-1] * 0.5)
    a = np.abs(z.numpy())
    cut = np.sort(a, axis=-1)[..., k - 1:k]        # k-th smallest per token
    np.testing.assert_array_equal(y.numpy(), np.where(a > cut, z.numpy(), 0.0))
    assert int(nz) == z.shape[0] * z.shape[1] * k


def test_d_countdown_predictor_masks_all_three_projections(llama):
    model, stats = llama
    plan = asp.fit("countdown", stats, 0.5, model=model, mode="d", train_steps=150, calib_tokens=1024)
    r = plan.rules["layers.0.mlp"]
    h, f = model.config.hidden_size, model.config.intermediate_size
    rank = h // 8
    assert r.tensors["U"].shape == (f, rank) and r.tensors["V"].shape == (h, rank)
    assert r.extra_params == rank * (h + f)
    assert r.skips == ["layers.0.gate", "layers.0.up", "layers.0.down"]
    # a trained predictor finds the true top half better than chance (recall 0.5)
    assert r.attrs["calib_recall"] > 0.6
    mlp = model.model.layers[0].mlp
    x = fresh_x(model, seed=5)
    keep = (x @ r.tensors["V"]) @ r.tensors["U"].T > r.tensors["tau"]
    inter = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    want = (inter * keep) @ mlp.down_proj.weight.T
    with asp.sparsify(model, plan) as hd:
        got = mlp(x)
        assert hd.measured_sparsity()["per_point"]["layers.0.mlp"] == pytest.approx(float((~keep).float().mean()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # effective sparsity: the MLP's reads skipped at the predicted rate, minus the predictor's reads
    sp = plan.site_params
    skipped = sum(plan.rules[f"layers.{i}.mlp"].expected_sparsity * sum(sp[f"layers.{i}.{p}"] for p in ("gate", "up", "down"))
                  for i in range(2))
    assert plan.effective_sparsity == pytest.approx((skipped - 2 * rank * (h + f)) / sum(sp.values()))


def test_d_countdown_works_on_a_two_layer_mlp(gelu):
    model, stats = gelu
    plan = asp.fit("countdown", stats, 0.5, model=model, mode="d", train_steps=20, calib_tokens=512)
    assert plan.rules["layers.1.mlp"].skips == ["layers.1.up", "layers.1.down"]
    mlp = model.gpt_neox.layers[1].mlp
    r = plan.rules["layers.1.mlp"]
    x = fresh_x(model, seed=6)
    keep = (x @ r.tensors["V"]) @ r.tensors["U"].T > r.tensors["tau"]
    want = (F.gelu(mlp.dense_h_to_4h(x)) * keep) @ mlp.dense_4h_to_h.weight.T + mlp.dense_4h_to_h.bias
    with asp.sparsify(model, plan):
        torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)


def test_countdown_bad_inputs(llama):
    model, stats = llama
    with pytest.raises(asp.ActsparseError, match="pass model="):
        asp.fit("countdown", stats, 0.5, mode="d")
    with pytest.raises(asp.ActsparseError, match="rank must be >= 0"):
        asp.fit("countdown", stats, 0.5, mode="d", rank=-1, model=model)
    with pytest.raises(asp.ActsparseError, match="mode must be one of"):
        asp.fit("countdown", stats, 0.5, mode="x")
    with pytest.raises(asp.ActsparseError, match="train_steps"):
        asp.fit("countdown", stats, 0.5, mode="d", train_steps=0, model=model)
    assert asp.fit("countdown", stats, 0.0, mode="d", model=model).rules == {}
