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
    ep = plan_to_engine(plan)
    sites = {f"layers.{i}.{r}": s for i, L in enumerate(ep.layers) for r, s in L.items()}
    assert set(sites) == set(plan.rules) and all(s.shift is None for s in sites.values())
    for site, s in sites.items():
        assert s.thresh == pytest.approx(float(plan.rules[site].tensors["thresh"]))
        assert s.expected == pytest.approx(0.4)


def test_cats_rule_maps_skips_to_up_and_down():
    rule = Rule("layers.0.gate_act", "threshold", {"thresh": torch.tensor(0.1)},
                skips=["layers.0.up", "layers.0.down"], expected_sparsity=0.5)
    plan = SparsityPlan("cats", {}, 0.5, {rule.point: rule}, {"layers.0.up": 4, "layers.0.down": 4})
    ep = plan_to_engine(plan)
    assert len(ep.layers) == 1 and ep.layers[0]["gate_act"].thresh == pytest.approx(0.1)
    assert ep.expected_sparsity == {"layers.0.up": 0.5, "layers.0.down": 0.5}
    assert ep.layers[0]["up"].thresh == 0.0 and ep.layers[0]["down"].thresh == 0.0   # rows chosen by gate_act


def test_a_fused_qkv_input_sets_q_k_and_v():
    """Phi-3's qkv_proj is one site: its threshold and shift go to each of the engine's q, k and v."""
    rule = Rule("layers.1.qkv", "threshold", {"thresh": torch.tensor(0.3), "shift": torch.tensor(0.05)},
                skips=["layers.1.qkv"], expected_sparsity=0.4)
    ep = plan_to_engine(SparsityPlan("scap", {}, 0.4, {rule.point: rule}, {"layers.1.qkv": 8}))
    assert len(ep.layers) == 2 and set(ep.layers[1]) == {"q", "k", "v"}
    assert all(s.thresh == pytest.approx(0.3) and s.shift == pytest.approx(0.05) for s in ep.layers[1].values())
    assert ep.expected_sparsity == {f"layers.1.{r}": 0.4 for r in "qkv"}


def test_unsupported_rule_kind_is_named():
    rule = Rule("layers.0.mlp", "lowrank", {}, skips=[], expected_sparsity=0.5)
    plan = SparsityPlan("rsparse", {}, 0.5, {rule.point: rule}, {})
    with pytest.raises(asp.ActsparseError, match="'lowrank' rule at layers.0.mlp"):
        plan_to_engine(plan)
    rule = Rule("layers.0.down", "ffn_down", {}, skips=["layers.0.down"], expected_sparsity=0.5)
    with pytest.raises(asp.ActsparseError, match="'ffn_down' rule at layers.0.down"):
        plan_to_engine(SparsityPlan("ffn_threshold", {}, 0.5, {rule.point: rule}, {}))


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
