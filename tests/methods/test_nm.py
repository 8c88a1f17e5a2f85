"""N:M activation pruning: masks, scores and each mitigation against independent numpy formulas."""
import numpy as np
import pytest
import torch

import actsparse as asp
from actsparse.models.sites import find_sites
from actsparse.sparsifiers.nm import nm_mask, parse_pattern


def np_nm_keep(score, n, m):
    """Independent reference: per group of m, keep the n largest (argsort)."""
    g = score.reshape(*score.shape[:-1], -1, m)
    order = np.argsort(-g, axis=-1, kind="stable")
    keep = np.zeros_like(g, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return keep.reshape(score.shape)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (8, 16), (16, 32), (3, 8)])
def test_nm_mask_keeps_the_top_n_of_every_m(n, m):
    s = torch.rand(3, 5, 64)
    np.testing.assert_array_equal(nm_mask(s, n, m).numpy(), np_nm_keep(s.numpy(), n, m))


def _site_case(model, stats, site_name, seed=0, **params):
    plan = asp.fit("nm", stats, 0.0, model=model, **params)
    site = find_sites(model)[site_name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, site.in_features, generator=g) * stats[site_name].sample.std() + 0.3
    with asp.sparsify(model, plan) as h:
        y = site.module(x)
        ms = h.measured_sparsity()["per_point"][site_name]
    w = site.weight.detach().double().numpy()
    b = site.bias.detach().double().numpy() if site.bias is not None else 0.0
    return plan, plan.rules[site_name], x.double().numpy(), y.double().numpy(), w, b, ms


@pytest.mark.parametrize("score", ["magnitude", "variance_weighted", "amber"])
def test_nm_scores(gelu, score):
    model, stats = gelu
    plan, r, x, y, w, b, ms = _site_case(model, stats, "layers.0.down", pattern="8:16", score=score)
    if score == "magnitude":
        sc = np.abs(x)
    elif score == "variance_weighted":
        sc = np.abs(x * w.var(0))
    else:
        lo, hi = np.quantile(w, [0.005, 0.995])
        inner = w[(w >= lo) & (w <= hi)]
        sc = np.abs(x) * np.linalg.norm((w - inner.mean()) / inner.std(), axis=0)
    keep = np_nm_keep(sc, 8, 16)
    np.testing.assert_allclose(y, (x * keep) @ w.T + b, rtol=1e-4, atol=1e-5)
    assert ms == pytest.approx(0.5)
    assert plan.effective_sparsity == pytest.approx(0.5)
    assert plan.target == 0.0  # the pattern sets the sparsity, not the target


def test_nm_variance_mitigation_rescales_each_token(gelu):
    model, stats = gelu
    _, r, x, y, w, b, _ = _site_case(model, stats, "layers.1.up", pattern="2:4", mitigation="variance")
    xs = x * np_nm_keep(np.abs(x), 2, 4)
    v = np.sqrt(x.var(-1, ddof=1, keepdims=True) / xs.var(-1, ddof=1, keepdims=True))
    np.testing.assert_allclose(y, (v * xs) @ w.T + b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("eta_kind", ["token", "static"])
def test_nm_shift_is_a_sparse_product_plus_rank_one(gelu, eta_kind):
    model, stats = gelu
    plan, r, x, y, w, b, _ = _site_case(model, stats, "layers.1.down", pattern="2:4", mitigation="shift",
                                        shift_eta=eta_kind, calib_tokens=256)
    if eta_kind == "token":
        # per-token median; torch's median takes the lower middle value for even widths
        eta = np.sort(x, axis=-1)[..., (x.shape[-1] - 1) // 2:(x.shape[-1] - 1) // 2 + 1]
    else:
        eta = r.tensors["eta"].item()
    xc = x - eta
    want = (xc * np_nm_keep(np.abs(xc), 2, 4) + eta) @ w.T + b
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    assert r.extra_params == w.shape[0]
    np.testing.assert_allclose(r.tensors["rowsum"].numpy(), w.sum(1), rtol=1e-5, atol=1e-6)


def test_nm_scaling_prunes_x_over_s_with_w_times_s(gelu):
    model, stats = gelu
    from actsparse.sparsifiers._calib import calib_windows, collect
    site = find_sites(model)["layers.0.qkv"]
    X = collect(model, calib_windows(stats, 256), {"x": (site.module, "input")})["x"].double().numpy()
    _, r, x, y, w, b, _ = _site_case(model, stats, "layers.0.qkv", pattern="4:8", mitigation="scaling", calib_tokens=256)
    s = np.sqrt(np.abs(X).max(0) / np.abs(w).max(0))
    np.testing.assert_allclose(r.tensors["smooth"].numpy(), s, rtol=1e-5)
    z = x / s
    want = (z * np_nm_keep(np.abs(z), 4, 8)) @ (w * s).T + b
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_nm_learnable_affine_lowers_the_block_error(gelu):
    model, stats = gelu
    from actsparse.sparsifiers._calib import calib_windows, capture_blocks
    plan0 = asp.fit("nm", stats, 0.0, model=model, pattern="2:4", mitigation="learnable", learn_steps=0, calib_tokens=128)
    plan = asp.fit("nm", stats, 0.0, model=model, pattern="2:4", mitigation="learnable", learn_steps=15,
                   learn_lr=0.003, calib_tokens=128)
    calls = capture_blocks(model, calib_windows(stats, 128), batch_size=16)[0]

    def block_err(p):
        layer0 = asp.SparsityPlan("nm", {}, 0.0, {k: v for k, v in p.rules.items() if k.startswith("layers.0.")}, p.site_params)
        with asp.sparsify(model, layer0), torch.no_grad():
            return sum(float(((calls.run(h, i) - calls.outputs[i]) ** 2).mean()) for i, h in enumerate(calls.inputs))

    assert block_err(plan) < 0.999 * block_err(plan0)
    r = plan.rules["layers.0.o"]
    assert r.extra_params == 2 * r.tensors["out_scale"].numel()
    # the rule computes a ⊙ (W x_s + b) + c
    site = find_sites(model)["layers.0.o"]
    x = torch.randn(3, site.in_features)
    xs = x.numpy() * np_nm_keep(np.abs(x.numpy()), 2, 4)
    want = (xs @ site.weight.detach().numpy().T + site.bias.detach().numpy()) * r.tensors["out_scale"].numpy() \
        + r.tensors["out_shift"].numpy()
    with asp.sparsify(model, plan):
        np.testing.assert_allclose(site.module(x).numpy(), want, rtol=1e-4, atol=1e-5)


def test_nm_unstructured_keeps_each_tokens_top_fraction(llama):
    model, stats = llama
    plan = asp.fit("nm", stats, 0.0, pattern="unstructured", unstructured_sparsity=0.25)
    r = plan.rules["layers.0.down"]
    assert (r.attrs["n"], r.attrs["m"]) == (96, 128)
    assert plan.effective_sparsity == pytest.approx(0.25)


def test_nm_bad_inputs(gelu, llama):
    model, stats = gelu
    for bad, msg in [("4:4", "needs 1 <= N < M"), ("5:4", "needs 1 <= N < M"), ("0:4", "needs 1 <= N < M"),
                     ("2-4", "must be 'N:M'"), ("half", "must be 'N:M'")]:
        with pytest.raises(asp.ActsparseError, match=msg):
            asp.fit("nm", stats, 0.0, pattern=bad)
    with pytest.raises(asp.ActsparseError, match=r"M=3 must divide .* 64 input channels"):
        asp.fit("nm", stats, 0.0, pattern="2:3")
    with pytest.raises(asp.ActsparseError, match="score must be one of"):
        asp.fit("nm", stats, 0.0, score="random")
    with pytest.raises(asp.ActsparseError, match="mitigation must be one of"):
        asp.fit("nm", stats, 0.0, mitigation="magic")
    with pytest.raises(asp.ActsparseError, match="pass model="):
        asp.fit("nm", stats, 0.0, score="amber")
    with pytest.raises(asp.ActsparseError, match="unstructured_sparsity"):
        asp.fit("nm", stats, 0.0, pattern="unstructured", unstructured_sparsity=1.0)
    assert parse_pattern(" 16 : 32 ") == (16, 32)
