"""R-Sparse: budget split, the sparse + low-rank output against a numpy SVD, and the alpha searches."""
import numpy as np
import pytest
import torch

import actsparse as asp
from actsparse.models.sites import find_sites
from actsparse.sparsifiers._calib import calib_windows, collect


def test_rsparse_output_is_sparse_plus_low_rank(llama):
    model, stats = llama
    s, alpha = 0.5, 0.6
    plan = asp.fit("rsparse", stats, s, model=model, alpha=alpha, calib_tokens=512)
    site = find_sites(model)["layers.1.up"]
    w = site.weight.detach().double().numpy()
    out_f, in_f = w.shape
    keep = int(in_f * (1 - s) * alpha)
    rank = int((in_f * out_f * (1 - s) - keep * out_f) // (in_f + out_f))
    r = plan.rules["layers.1.up"]
    assert r.attrs["rank"] == rank and r.extra_params == rank * (in_f + out_f)
    assert r.expected_sparsity == pytest.approx(1 - keep / in_f)
    # threshold: numpy quantile of |x_k| ||W[:, k]|| over the calibration inputs
    X = collect(model, calib_windows(stats, 512), {"x": (site.module, "input")})["x"].double().numpy()
    c = np.linalg.norm(w, axis=0)
    tau = np.quantile(np.abs(X * c), 1 - keep / in_f)
    assert r.tensors["thresh"].item() == pytest.approx(tau, rel=1e-5)
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    x = np.random.default_rng(0).standard_normal((4, in_f))
    m = np.abs(x * c) > r.tensors["thresh"].item()
    want = (x * m) @ w.T + ((x * ~m) @ vt[:rank].T * sv[:rank]) @ u[:, :rank].T
    with asp.sparsify(model, plan) as h:
        got = site.module(torch.tensor(x, dtype=torch.float32)).double().numpy()
        assert h.measured_sparsity()["per_point"]["layers.1.up"] == pytest.approx(float((~m).mean()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # weight reads: skipped minus low-rank factors is the target, up to integer rounding of keep and rank
    assert plan.effective_sparsity == pytest.approx(s, abs=0.02)


def test_rsparse_alpha_one_is_plain_thresholding(gelu):
    model, stats = gelu
    plan = asp.fit("rsparse", stats, 0.4, model=model, alpha=1.0, calib_tokens=256)
    site = find_sites(model)["layers.0.o"]
    r = plan.rules["layers.0.o"]
    assert "V" not in r.tensors and "scale" not in r.tensors and r.extra_params == 0
    X = collect(model, calib_windows(stats, 256), {"x": (site.module, "input")})["x"].double().numpy()
    keep = int(site.in_features * 0.6)
    assert r.tensors["thresh"].item() == pytest.approx(np.quantile(np.abs(X), 1 - keep / site.in_features), rel=1e-5)


def test_rsparse_greedy_picks_the_block_error_minimiser(gelu):
    model, stats = gelu
    grid = (0.5, 1.0)
    plan = asp.fit("rsparse", stats, 0.5, model=model, search="greedy", alpha_grid=grid, calib_tokens=256)
    from actsparse.sparsifiers._calib import capture_blocks
    calls = capture_blocks(model, calib_windows(stats, 256), batch_size=16)
    uniform = {a: asp.fit("rsparse", stats, 0.5, model=model, alpha=a, calib_tokens=256) for a in grid}
    for c in calls:
        errs = {}
        for a, p in uniform.items():
            layer = asp.SparsityPlan("rsparse", {}, 0.5, {k: v for k, v in p.rules.items()
                                                          if k.startswith(f"layers.{c.block.layer}.")}, p.site_params)
            with asp.sparsify(model, layer), torch.no_grad():
                errs[a] = sum(float((c.run(h, i) - c.outputs[i]).norm(dim=-1).mean()) for i, h in enumerate(c.inputs))
        chosen = {r.attrs["alpha"] for k, r in plan.rules.items() if k.startswith(f"layers.{c.block.layer}.")}
        assert chosen == {min(errs, key=errs.get)}


def test_rsparse_evolutionary_returns_a_grid_allocation(gelu):
    model, stats = gelu
    plan = asp.fit("rsparse", stats, 0.5, model=model, search="evolutionary", alpha_grid=(0.6, 0.8, 1.0),
                   population=3, generations=1, calib_tokens=128)
    assert {r.attrs["alpha"] for r in plan.rules.values()} <= {0.6, 0.8, 1.0}
    assert plan.effective_sparsity == pytest.approx(0.5, abs=0.03)


def test_rsparse_bad_inputs(llama):
    model, stats = llama
    with pytest.raises(asp.ActsparseError, match="pass model="):
        asp.fit("rsparse", stats, 0.5)
    with pytest.raises(asp.ActsparseError, match="alpha"):
        asp.fit("rsparse", stats, 0.5, alpha=1.5, model=model)
    with pytest.raises(asp.ActsparseError, match="alpha_grid"):
        asp.fit("rsparse", stats, 0.5, alpha_grid=(0.5, 2.0), model=model)
    with pytest.raises(asp.ActsparseError, match="search must be one of"):
        asp.fit("rsparse", stats, 0.5, search="random", model=model)
    with pytest.raises(asp.ActsparseError, match="population"):
        asp.fit("rsparse", stats, 0.5, population=1, model=model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method, params", [("rsparse", {"alpha": 0.6}), ("countdown", {"mode": "d"})])
def test_gpu_fit_runs_on_the_model_device_and_matches_the_cpu_fit(llama, method, params):
    """R-Sparse's SVDs and sorts and D-COUNTDOWN's predictor training run on the model's device; the plan holds
    CPU tensors either way and agrees with the CPU fit up to summation order (the predictor is trained)."""
    import copy

    model, stats = llama
    cpu = asp.fit(method, stats, 0.5, model=model, calib_tokens=512, **params)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = asp.fit(method, stats, 0.5, model=gpu_model, calib_tokens=512, **params)
    assert set(cpu.rules) == set(gpu.rules)
    tol = 1e-4 if method == "rsparse" else 5e-2
    for k, r in gpu.rules.items():
        for name, t in r.tensors.items():
            assert t.device.type == "cpu", f"{k}.{name} left on {t.device}"
            want = cpu.rules[k].tensors[name].double()
            if name in ("US", "V") and method == "rsparse":  # singular vectors: sign is arbitrary per column
                t, want = t.double().abs(), want.abs()
            err = float((t.double() - want).abs().max() / want.abs().max().clamp(min=1e-12))
            assert err < tol, f"{k}.{name}: max rel diff {err:.1e}"
