"""fit / sparsify / perplexity: TEAL thresholds, token policies, accounting, bad input."""
import math

import numpy as np
import pytest
import torch

import actsparse as asp
from actsparse.sparsifiers import Rule, SparsityPlan, effective_sparsity

from .test_calibration import _capture


@pytest.fixture(scope="module")
def calib(tiny, text_file):
    model, tok = tiny
    return asp.calibrate(model, tok, str(text_file), tokens=1024, seq_len=128, progress=False)


def test_teal_thresholds_equal_numpy_quantile_of_abs_input(tiny, calib):
    s = float(np.random.default_rng().uniform(0.2, 0.8))
    plan = asp.fit("teal", calib, sparsity=s)
    for site in calib.meta["sites"]:
        sample = calib[site].sample.double().numpy()
        assert float(plan.rules[site].tensors["thresh"]) == pytest.approx(np.quantile(np.abs(sample), s), rel=1e-5)
    assert plan.effective_sparsity == pytest.approx(s)


@pytest.mark.parametrize("s", [0.25, 0.5, 0.65])
def test_measured_sparsity_on_calibration_data_matches_target(tiny, text_file, calib, s):
    model, tok = tiny
    plan = asp.fit("teal", calib, sparsity=s)
    from actsparse.data.text import token_stream, token_windows

    windows = token_windows(token_stream(tok, asp.text_data(str(text_file)), 1024), 128)
    with asp.sparsify(model, plan) as h, torch.no_grad():
        model(windows, use_cache=False)
        m = h.measured_sparsity()
    # calibration saw dense inputs at every site; sparsified upstream sites shift the inputs downstream,
    # so layer 0 (whose inputs are unaffected by sparsity at the first site) must match tightly
    exact = [v for k, v in m["per_point"].items() if k.startswith("layers.0.") and k[-1] in "qkv"]
    assert len(exact) == 3 and all(abs(v - s) < 0.01 for v in exact)
    assert abs(m["mean"] - s) < 0.03  # a random-weight model shifts downstream inputs the most
    assert set(m["per_role"]) == {"q", "k", "v", "o", "gate", "up", "down"}


def test_sparsified_layer_output_equals_hand_formula(tiny, calib):
    model, tok = tiny
    plan = asp.fit("teal", calib, sparsity=0.5)
    lin = model.model.layers[1].mlp.down_proj
    x = torch.randn(3, 5, lin.in_features)
    t = float(plan.rules["layers.1.down"].tensors["thresh"])
    ref = torch.nn.functional.linear(torch.where(x.abs() > t, x, torch.zeros(())), lin.weight)
    with asp.sparsify(model, plan):
        y = lin(x)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight))  # removed on exit


def test_last_fraction_policy_leaves_earlier_positions_dense(tiny, calib):
    model, tok = tiny
    plan = asp.fit("teal", calib, sparsity=0.6)
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        dense = model(ids).logits
        with asp.sparsify(model, plan, token_policy="last_fraction=0.25") as h:
            sp = model(ids).logits
            m = h.measured_sparsity()
    torch.testing.assert_close(sp[:, :30], dense[:, :30])  # causal: the dense prefix is untouched
    assert (sp[:, 30:] - dense[:, 30:]).abs().max() > 1e-3
    assert 0.4 < m["mean"] < 0.8


def test_decode_policy_sparsifies_only_given_positions_and_single_token_steps(tiny, calib):
    model, tok = tiny
    plan = asp.fit("teal", calib, sparsity=0.6)
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        dense = model(ids).logits
        with asp.sparsify(model, plan, token_policy="decode") as h:
            prefill = model(ids).logits  # no explicit positions, T > 1: the prompt stays dense
            torch.testing.assert_close(prefill, dense)
            assert h.measured_sparsity()["per_point"] == {}
            mask = torch.zeros(1, 24, dtype=torch.bool)
            mask[:, 16:] = True
            with h.positions(mask):
                part = model(ids).logits
            torch.testing.assert_close(part[:, :16], dense[:, :16])
            assert (part[:, 16:] - dense[:, 16:]).abs().max() > 1e-3
            h.reset_counters()
            out = model.generate(ids[:, :8], max_new_tokens=3, do_sample=False)  # cached 1-token steps
            assert out.shape[1] == 11
            assert h.measured_sparsity()["mean"] > 0.3


def test_perplexity_matches_manual_nll(tiny, text_file):
    model, tok = tiny
    from actsparse.data.text import token_stream

    ids = token_stream(tok, asp.text_data(str(text_file)))
    n = ids.numel() // 64
    x = ids[: n * 64].view(n, 64)
    with torch.no_grad():
        lp = torch.log_softmax(model(x).logits.double(), -1)
    nll = -lp[:, :-1].gather(-1, x[:, 1:, None]).mean()
    assert asp.perplexity(model, tok, str(text_file), seq_len=64) == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_perplexity_stride_scores_every_token_once(tiny, text_file):
    model, tok = tiny
    # with stride, windows overlap but each token after the first window is scored exactly once;
    # a dense model on overlapping windows can only do better or equal (more context)
    disjoint = asp.perplexity(model, tok, str(text_file), seq_len=64, max_tokens=640)
    strided = asp.perplexity(model, tok, str(text_file), seq_len=64, stride=16, max_tokens=640)
    assert strided <= disjoint * 1.02


def test_effective_sparsity_hand_computation():
    site_params = {"layers.0.gate": 100, "layers.0.up": 100, "layers.0.down": 100, "layers.0.q": 50}
    rules = {"layers.0.gate_act": Rule("layers.0.gate_act", "threshold", skips=["layers.0.up", "layers.0.down"],
                                       expected_sparsity=0.6),
             "layers.0.q": Rule("layers.0.q", "threshold", skips=["layers.0.q"], expected_sparsity=0.4,
                                extra_params=10)}
    plan = SparsityPlan("x", {}, 0.6, rules, site_params)
    assert plan.effective_sparsity == pytest.approx((0.6 * 200 + 0.4 * 50 - 10) / 350)
    assert effective_sparsity(plan, {"layers.0.gate_act": 0.3}) == pytest.approx((0.3 * 200 - 10) / 350)


def test_plan_save_load_gives_identical_outputs(tiny, calib, tmp_path):
    model, tok = tiny
    plan = asp.fit("teal", calib, sparsity=0.45)
    plan.save(tmp_path / "plan")
    back = asp.SparsityPlan.load(tmp_path / "plan")
    assert back.key == plan.key and back.effective_sparsity == pytest.approx(plan.effective_sparsity)
    ids = torch.randint(0, 300, (1, 32))
    with torch.no_grad():
        with asp.sparsify(model, plan):
            a = model(ids).logits
        with asp.sparsify(model, back):
            b = model(ids).logits
    torch.testing.assert_close(a, b)
    assert "teal" in back.summary() and "effective_sparsity=0.4500" in back.summary()


def test_dense_plan_ignores_target_and_changes_nothing(tiny, calib):
    model, tok = tiny
    a, b = asp.fit("dense", calib, sparsity=0.3), asp.fit("dense", calib, sparsity=0.6)
    assert a.key == b.key and a.target == 0.0 and a.effective_sparsity == 0.0


@pytest.mark.parametrize("bad, match", [
    (dict(method="tael"), r"unknown method 'tael' \(did you mean teal"),
    (dict(sparsity=1.2), r"sparsity must be in \[0, 1\), got 1.2"),
    (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity="half"), r"sparsity must be a number"),
    (dict(allocation="random"), r"allocation must be one of \['uniform', 'greedy'\]"),
    (dict(roles=("q", "zz")), r"teal roles must be a non-empty subset"),
    (dict(window=3), r"has no parameter\(s\) \['window'\]"),
])
def test_fit_rejects_bad_input(calib, bad, match):
    kw = dict(method="teal", sparsity=0.5)
    kw.update(bad)
    with pytest.raises(asp.ActsparseError, match=match):
        asp.fit(kw.pop("method"), calib, **kw)


def test_sparsify_rejects_bad_input(tiny, calib):
    model, tok = tiny
    plan = asp.fit("teal", calib, sparsity=0.5)
    for pol in ("some", "last_fraction=0", "last_fraction=1.5"):
        with pytest.raises(asp.ActsparseError, match="token_policy must be"):
            asp.sparsify(model, plan, token_policy=pol)
    with pytest.raises(asp.ActsparseError, match="backend must be one of"):
        asp.sparsify(model, plan, backend="cuda")
    with pytest.raises(asp.ActsparseError, match="must be a SparsityPlan"):
        asp.sparsify(model, {"rules": {}})
    with asp.sparsify(model, plan):
        with pytest.raises(asp.ActsparseError, match="already has a plan installed"):
            asp.sparsify(model, plan).__enter__()
    with pytest.raises(asp.ActsparseError, match="stride must be in"):
        asp.perplexity(model, tok, "bundled:eval" if False else calib.meta["data"], seq_len=64, stride=65)


def test_plan_from_another_model_is_rejected(calib):
    from tests.conftest import make_model

    other = make_model("llama", layers=1)
    plan = asp.fit("teal", calib, sparsity=0.5)
    with pytest.raises(asp.ActsparseError, match="points this model lacks"):
        asp.sparsify(other, plan)
