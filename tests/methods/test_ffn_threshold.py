"""FFN thresholding: percentiles of gate/up/FFN outputs against numpy, the MLP output formula, accounting."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import actsparse as asp
from actsparse.sparsifiers._calib import calib_windows, collect
from tests.methods.conftest import fresh_x


def test_ffn_threshold_gated_mlp(llama):
    model, stats = llama
    s = 0.4
    plan = asp.fit("ffn_threshold", stats, s, model=model, calib_tokens=512)
    mlp = model.model.layers[1].mlp
    outs = collect(model, calib_windows(stats, 512), {o: (getattr(mlp, f"{o}_proj"), "output") for o in ("gate", "up", "down")})
    t = {o: float(np.quantile(np.abs(outs[o].double().numpy()), s)) for o in outs}
    assert plan.rules["layers.1.gate"].tensors["thresh"].item() == pytest.approx(t["gate"], rel=1e-5)
    assert plan.rules["layers.1.up_out"].tensors["thresh"].item() == pytest.approx(t["up"], rel=1e-5)
    assert plan.rules["layers.1.down"].tensors["out_thresh"].item() == pytest.approx(t["down"], rel=1e-5)
    x = fresh_x(model, seed=2)
    g = x @ mlp.gate_proj.weight.T
    u = x @ mlp.up_proj.weight.T
    g, u = g * (g.abs() >= t["gate"]), u * (u.abs() > t["up"])
    inter = F.silu(g) * u
    y = inter @ mlp.down_proj.weight.T
    want = y * (y.abs() >= t["down"])
    with asp.sparsify(model, plan) as h:
        got = mlp(x)
        per = h.measured_sparsity()["per_point"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert per["layers.1.gate"] == pytest.approx(float((g == 0).float().mean()))
    assert per["layers.1.down"] == pytest.approx(float((inter == 0).float().mean()))
    # accounting: gate zeros skip up rows, intermediate zeros skip down columns; gate itself is read
    r_g, r_d = plan.rules["layers.1.gate"], plan.rules["layers.1.down"]
    assert r_g.skips == ["layers.1.up"] and r_d.skips == ["layers.1.down"] and plan.rules["layers.1.up_out"].skips == []
    assert s <= r_d.expected_sparsity <= 1 - (1 - s) ** 2 + 0.05


def test_ffn_threshold_two_layer_mlp_and_no_output_threshold(gelu):
    model, stats = gelu
    plan = asp.fit("ffn_threshold", stats, 0.5, model=model, outputs=("up",), calib_tokens=256)
    assert set(plan.rules) == {f"layers.{i}.{p}" for i in range(2) for p in ("up_out", "down")}
    mlp = model.gpt_neox.layers[0].mlp
    t = plan.rules["layers.0.up_out"].tensors["thresh"]
    x = fresh_x(model, seed=4)
    h = mlp.dense_h_to_4h(x)
    want = F.gelu(h * (h.abs() > t)) @ mlp.dense_4h_to_h.weight.T + mlp.dense_4h_to_h.bias
    with asp.sparsify(model, plan):
        torch.testing.assert_close(mlp(x), want, rtol=1e-4, atol=1e-5)
    # the intermediate's sparsity, measured on the calibration tokens, is about the target
    assert plan.rules["layers.0.down"].expected_sparsity == pytest.approx(0.5, abs=0.02)


def test_ffn_threshold_bad_inputs(llama, gelu):
    model, stats = llama
    with pytest.raises(asp.ActsparseError, match="outputs must be a non-empty subset"):
        asp.fit("ffn_threshold", stats, 0.5, model=model, outputs=("act",))
    with pytest.raises(asp.ActsparseError, match="pass model="):
        asp.fit("ffn_threshold", stats, 0.5)
    gm, gs = gelu
    with pytest.raises(asp.ActsparseError, match="needs a gated MLP"):
        asp.fit("ffn_threshold", gs, 0.5, model=gm, outputs=("gate",))
