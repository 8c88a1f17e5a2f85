"""SCAP: modes (zero/median/kde), the folded bias, the KDE candidate choice, sequential calibration."""
import numpy as np
import pytest
import torch

import actsparse as asp
from actsparse.models.sites import find_sites
from actsparse.sparsifiers.scap import kde_peaks
from tests.methods.conftest import np_quantile_abs


def test_scap_mode_shift_is_folded_into_bias(gelu):
    model, stats = gelu
    plan = asp.fit("scap", stats, 0.6, model=model, roles=("down",), mode="median")
    site = find_sites(model)["layers.1.down"]
    sample = stats["layers.1.down"].sample
    m = float(np.median(sample.double().numpy()))
    r = plan.rules["layers.1.down"]
    assert r.tensors["shift"].item() == pytest.approx(m, rel=1e-5)
    assert r.tensors["thresh"].item() == pytest.approx(np_quantile_abs(sample, 0.6, shift=m), rel=1e-5)
    w, b = site.weight.detach(), site.bias.detach()
    torch.testing.assert_close(r.tensors["bias_fold"], m * w.sum(1), rtol=1e-5, atol=1e-6)
    # y = W (x - m) 1[|x - m| > t] + b + W (m 1), against the dense W x + b where nothing is pruned
    x = torch.randn(2, 6, site.in_features) * sample.std() + m
    t = r.tensors["thresh"]
    want = ((x - m) * ((x - m).abs() > t)) @ w.T + b + m * w.sum(1)
    with asp.sparsify(model, plan) as h:
        got = site.module(x)
        assert h.measured_sparsity()["per_point"]["layers.1.down"] == pytest.approx(float(((x - m).abs() <= t).float().mean()))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert plan.effective_sparsity == pytest.approx(0.6 * sum(v for k, v in plan.site_params.items() if k.endswith("down"))
                                                    / sum(plan.site_params.values()))


def test_zero_mode_needs_no_model_and_is_teal_on_the_roles(llama):
    _, stats = llama
    plan = asp.fit("scap", stats, 0.5, mode="zero")
    assert set(plan.rules) == {f"layers.{i}.{r}" for i in range(2) for r in ("gate", "up", "down")}
    r = plan.rules["layers.0.up"]
    assert "shift" not in r.tensors
    assert r.tensors["thresh"].item() == pytest.approx(np_quantile_abs(stats["layers.0.up"].sample, 0.5), rel=1e-5)


def test_kde_peaks_finds_the_modes_of_a_mixture():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(7000, generator=g) * 0.2 + 1.5, torch.randn(3000, generator=g) * 0.2 - 2.0])
    peaks = kde_peaks(v, 2)
    assert peaks[0] == pytest.approx(1.5, abs=0.05)
    assert peaks[1] == pytest.approx(-2.0, abs=0.05)
    assert len(kde_peaks(torch.randn(5000, generator=g), 3)) >= 1


def test_kde_picks_the_candidate_with_the_smallest_output_error(gelu, monkeypatch):
    model, stats = gelu
    from actsparse.sparsifiers import scap
    from actsparse.sparsifiers._calib import calib_windows, collect
    site = find_sites(model)["layers.0.down"]
    cands = [0.0, 0.3, -0.2]
    monkeypatch.setattr(scap, "kde_peaks", lambda v, k, bw=0.5: cands)
    plan = asp.fit("scap", stats, 0.5, model=model, roles=("down",), mode="kde", calib_tokens=512)
    X = collect(model, calib_windows(stats, 512), {"x": (site.module, "input")})["x"].double()
    w = site.weight.detach().double()

    def err(m):  # independent: numpy threshold on |X - m|, ||W(x_s + m) - W x||
        t = np.quantile(np.abs(X.numpy() - m), 0.5)
        xs = np.where(np.abs(X.numpy() - m) > t, X.numpy() - m, 0.0) + m
        return np.linalg.norm(xs @ w.numpy().T - X.numpy() @ w.numpy().T)

    best = min(cands, key=err)
    assert plan.rules["layers.0.down"].attrs["m"] == pytest.approx(best)


def test_sequential_calibrates_downstream_sites_on_sparsified_inputs(gelu):
    model, stats = gelu
    from actsparse.sparsifiers._calib import calib_windows, collect
    plan = asp.fit("scap", stats, 0.5, model=model, roles=("up", "down"), mode="median", sequential=True,
                   calib_tokens=512)
    site = find_sites(model)["layers.1.up"]
    upstream = asp.SparsityPlan("scap", {}, 0.5, {p: r for p, r in plan.rules.items() if p.startswith("layers.0")},
                                plan.site_params)
    with asp.sparsify(model, upstream):
        X = collect(model, calib_windows(stats, 512), {"x": (site.module, "input")})["x"]
    m = float(np.median(X.double().numpy()))
    r = plan.rules["layers.1.up"]
    assert r.tensors["shift"].item() == pytest.approx(m, rel=1e-4, abs=1e-6)
    assert r.tensors["thresh"].item() == pytest.approx(np_quantile_abs(X.flatten(), 0.5, shift=m), rel=1e-4)
    # and the sparsity measured on those calibration inputs is the target
    with asp.sparsify(model, plan) as h:
        from actsparse.sparsifiers._calib import run_windows
        run_windows(model, calib_windows(stats, 512))
        assert h.measured_sparsity()["per_point"]["layers.1.up"] == pytest.approx(0.5, abs=0.005)


def test_scap_bad_inputs(llama):
    model, stats = llama
    with pytest.raises(asp.ActsparseError, match="pass model="):
        asp.fit("scap", stats, 0.5, mode="kde")
    with pytest.raises(asp.ActsparseError, match="pass model="):
        asp.fit("scap", stats, 0.5, mode="zero", sequential=True)
    with pytest.raises(asp.ActsparseError, match="center_roles must be a subset"):
        asp.fit("scap", stats, 0.5, roles=("down",), center_roles=("up",))
    with pytest.raises(asp.ActsparseError, match="mode must be one of"):
        asp.fit("scap", stats, 0.5, mode="mean")
    with pytest.raises(asp.ActsparseError, match="kde_bw_adjust"):
        asp.fit("scap", stats, 0.5, kde_bw_adjust=0.0, model=model)
