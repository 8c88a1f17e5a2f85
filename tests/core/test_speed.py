"""eval=speed: plan → engine translation, and clear reasons when speed cannot be measured."""
import pytest
import torch

import actsparse as asp
from actsparse.eval.speed import decode_speed, plan_to_engine, speed_unavailable_reason
from actsparse.sparsifiers import Rule, SparsityPlan


def test_teal_plan_maps_to_engine_thresholds(tiny, text_file):
    model, tok = tiny
    stats = asp.calibrate(model, tok, str(text_file), tokens=512, seq_len=128, progress=False)
    plan = asp.fit("teal", stats, sparsity=0.4)
    th, sh, expected = plan_to_engine(plan)
    assert set(th) == set(plan.rules) and not sh
    for site, t in th.items():
        assert t == pytest.approx(float(plan.rules[site].tensors["thresh"]))
        assert expected[site] == pytest.approx(0.4)


def test_cats_rule_maps_skips_to_up_and_down():
    rule = Rule("layers.0.gate_act", "threshold", {"thresh": torch.tensor(0.1)},
                skips=["layers.0.up", "layers.0.down"], expected_sparsity=0.5)
    plan = SparsityPlan("cats", {}, 0.5, {rule.point: rule}, {"layers.0.up": 4, "layers.0.down": 4})
    th, _, expected = plan_to_engine(plan)
    assert th == {"layers.0.gate_act": pytest.approx(0.1)}
    assert expected == {"layers.0.up": 0.5, "layers.0.down": 0.5}


def test_unsupported_rule_kind_is_named():
    rule = Rule("layers.0.mlp", "lowrank", {}, skips=[], expected_sparsity=0.5)
    plan = SparsityPlan("rsparse", {}, 0.5, {rule.point: rule}, {})
    with pytest.raises(asp.ActsparseError, match="'lowrank' rule at layers.0.mlp"):
        plan_to_engine(plan)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_speed_on_cpu_says_why_it_is_skipped(tiny, text_file):
    model, tok = tiny
    assert "CUDA GPU" in speed_unavailable_reason(model)
    stats = asp.calibrate(model, tok, str(text_file), tokens=256, seq_len=128, progress=False)
    with pytest.raises(asp.ActsparseError, match="needs a CUDA GPU"):
        decode_speed(model, asp.fit("teal", stats, sparsity=0.5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_speed_of_tiny_llama_on_gpu():
    model, tok = asp.load_model("tiny-llama", device="cuda")
    stats = asp.calibrate(model, tok, "bundled:calib", tokens=2048, progress=False)
    out = decode_speed(model, asp.fit("teal", stats, sparsity=0.5), n_tokens=32)
    assert out["decode/tok_s"] > 0 and out["decode/tok_s_dense"] > 0
    assert out["decode/speedup"] == pytest.approx(out["decode/tok_s"] / out["decode/tok_s_dense"])
