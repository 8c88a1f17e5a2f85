"""LaRoSA: PCA rotation per layer, exact at sparsity 0, equal to folded rotated weights, Top-K sparsity, errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import actsparse as asp
from actsparse.eval.speed import plan_to_engine
from actsparse.models.sites import find_blocks
from actsparse.sparsifiers._calib import calib_windows
from actsparse.sparsifiers.plan import Rule
from tests.methods.conftest import random_norms, tiny_llama, tiny_qwen2

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def rotated(request, tok):
    model = random_norms(tiny_llama(seed=3) if request.param == "llama" else tiny_qwen2(seed=4), seed=5)
    stats = asp.calibrate(model, tok, tokens=1024, seq_len=64, batch_size=8, sample_size=4096, progress=False)
    return model, stats


def _rms(h, eps):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def test_larosa_rotation_at_sparsity_zero_leaves_logits_unchanged(rotated):
    model, stats = rotated
    plan = asp.fit("larosa", stats, 0.0, model=model, calib_tokens=512)
    ids = torch.randint(1, 260, (2, 48))
    with torch.no_grad():
        want = model(ids).logits
        with asp.sparsify(model, plan):
            got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def _norm_io(model, stats, layer):
    """The layer's two RMSNorms and, per norm, its inputs and outputs [N, C] (float64) on 512 calibration tokens."""
    block = find_blocks(model)[layer]
    norms = (block.module.input_layernorm, block.module.post_attention_layernorm)
    hs = {0: [], 1: []}
    hooks = [n.register_forward_hook(lambda m, a, out, i=i: hs[i].append((a[0], out))) for i, n in enumerate(norms)]
    try:
        with torch.no_grad():
            model(calib_windows(stats, 512))
    finally:
        for h in hooks:
            h.remove()
    flat = {i: tuple(torch.cat([t[j].reshape(-1, t[j].shape[-1]) for t in hs[i]]).double() for j in (0, 1))
            for i in hs}
    return norms, flat


def test_larosa_basis_is_the_pca_of_normalised_block_inputs(rotated):
    model, stats = rotated
    plan = asp.fit("larosa", stats, 0.5, model=model, calib_tokens=512)
    norms, hs = _norm_io(model, stats, layer=1)
    eps = norms[0].variance_epsilon
    n = np.concatenate([_rms(hs[i][0], eps).numpy() for i in (0, 1)])
    vals, vecs = np.linalg.eigh(n.T @ n)
    ref = vecs[:, ::-1]                                               # descending eigenvalue
    q = plan.rules["layers.1.q"].tensors["Q"].double().numpy()
    # columns agree up to sign
    np.testing.assert_allclose(np.abs(np.sum(ref * q, axis=0)), 1.0, atol=1e-4)


def test_larosa_block_input_bases_of_the_unfolded_norm_outputs_are_each_groups_pca(rotated):
    model, stats = rotated
    plan = asp.fit("larosa", stats, 0.5, model=model, calib_tokens=512, bases="block_input", fold_norm=False)
    _, hs = _norm_io(model, stats, layer=1)
    for i, role in ((0, "q"), (1, "gate")):
        x = hs[i][1].numpy()
        ref = np.linalg.eigh(x.T @ x)[1][:, ::-1]                        # descending eigenvalue
        rule = plan.rules[f"layers.1.{role}"]
        np.testing.assert_allclose(np.abs(np.sum(ref * rule.tensors["Q"].double().numpy(), axis=0)), 1.0, atol=1e-4)
        assert bool((rule.tensors["g"] == 1).all())
    assert plan.rules["layers.1.k"].tensors["Q"] is plan.rules["layers.1.q"].tensors["Q"]
    ids = torch.randint(1, 260, (2, 32))
    exact = asp.fit("larosa", stats, 0.0, model=model, calib_tokens=256, bases="block_input", fold_norm=False)
    with torch.no_grad():
        want = model(ids).logits
        with asp.sparsify(model, exact):
            got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sparsity", [0.25, 0.6])
def test_larosa_site_output_equals_the_folded_rotated_weights(rotated, sparsity):
    model, stats = rotated
    plan = asp.fit("larosa", stats, sparsity, model=model, calib_tokens=512)
    block = find_blocks(model)[0]
    norm = block.module.post_attention_layernorm
    h = torch.randn(3, 9, model.config.hidden_size) * 2.0                # fresh residual-stream states
    q = plan.rules["layers.0.up"].tensors["Q"].double()
    up = block.sites["up"].module
    # the paper's model: g folded into W, residual rotated by Q: W' = W diag(g) Q, input z = RMSNorm_unit(h) Q
    w_rot = up.weight.double() * norm.weight.double() @ q
    z = _rms(h.double(), norm.variance_epsilon) @ q
    k = int(round(sparsity * z.shape[-1]))
    keep = z.abs() > z.abs().kthvalue(k, dim=-1, keepdim=True).values
    want = (z * keep) @ w_rot.T
    with asp.sparsify(model, plan) as hd, torch.no_grad():
        got = up(norm(h))
        measured = hd.measured_sparsity()["per_point"]["layers.0.up"]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert measured == pytest.approx(k / z.shape[-1])


def test_larosa_measured_sparsity_is_the_target_on_unseen_text(rotated, tok):
    model, stats = rotated
    plan = asp.fit("larosa", stats, 0.5, model=model, calib_tokens=256)
    with asp.sparsify(model, plan) as h:
        asp.perplexity(model, tok, data="bundled:eval", seq_len=64, max_tokens=512)
        m = h.measured_sparsity()
    assert set(m["per_point"].values()) == {0.5}
    assert m["effective"] == pytest.approx(0.5) and plan.effective_sparsity == pytest.approx(0.5)


def test_larosa_plan_stores_each_rotation_once_and_applies_in_a_fresh_interpreter(rotated, tmp_path):
    model, stats = rotated
    plan = asp.fit("larosa", stats, 0.4, model=model, calib_tokens=256)
    plan.save(tmp_path / "plan")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "plan" / "tensors.safetensors"), "pt") as f:
        q_keys = [k for k in f.keys() if k.endswith("/Q")]
    assert len(q_keys) == len(find_blocks(model))
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(1, 260, (1, 32))
    with asp.sparsify(model, plan), torch.no_grad():
        want = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import torch, transformers
from actsparse.sparsifiers.plan import SparsityPlan
from actsparse.sparsifiers.apply import sparsify
m = transformers.AutoModelForCausalLM.from_pretrained(r"{tmp_path / 'model'}").eval()
plan = SparsityPlan.load(r"{tmp_path / 'plan'}")
ids = torch.load(r"{tmp_path / 'ids.pt'}")
with sparsify(m, plan), torch.no_grad():
    torch.save(m(ids).logits, r"{tmp_path / 'got.pt'}")
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "got.pt"), want, rtol=1e-5, atol=1e-5)
    meta = json.loads((tmp_path / "plan" / "meta.json").read_text())
    assert meta["rules"]["layers.0.k"]["kind"] == "rotated_topk"


@pytest.mark.parametrize("bases", ["layer", "block_input"])
def test_larosa_runs_in_the_engine_on_a_rotated_stream_as_in_the_torch_backend(rotated, bases):
    """The engine folds each layer's rotation into its weights (a rotated residual stream, adapters where the basis
    changes: between layers, and between the attention and MLP reads with bases='block_input') and finds each
    token's Top-K on the device: its logits equal transformers' under the same plan, on the Triton kernels
    (interpreter here) and the torch backend; its dense logits on the folded weights equal the model's, and
    clearing the plan restores the model's weights."""
    from actsparse.engine import Engine
    from tests.engine.test_engine import _engine_logits

    model, stats = rotated
    plan = asp.fit("larosa", stats, 0.5, model=model, calib_tokens=256, bases=bases)
    ep = plan_to_engine(plan, len(find_blocks(model)))
    assert len(ep.rotations) == 2 * len(find_blocks(model))
    assert all(s.topk is not None for L in ep.layers for s in L.values())
    seq = torch.randint(1, 260, (1, 6))
    with torch.no_grad(), asp.sparsify(model, plan, backend="torch"):
        want = model(seq, use_cache=False).logits.float()
    with torch.no_grad():
        dense = model(seq, use_cache=False).logits.float()
    assert (dense - want).norm() / want.norm() > 1e-2   # the plan does something
    for kernels in ("triton", "torch"):
        dev = "cuda" if kernels == "triton" and torch.cuda.is_available() else "cpu"
        eng = Engine.from_hf(model, device=dev, kernels=kernels, max_batch=1, max_seq_len=16, fallback_below=0.0)
        plain = eng.w
        eng.set_plan(ep)
        got = _engine_logits(eng, seq, True)
        assert (got - want).norm() / want.norm() < 1e-4, kernels
        folded_dense = _engine_logits(eng, seq, False)
        assert (folded_dense - dense).norm() / dense.norm() < 1e-5
        eng.clear_thresholds()
        assert eng.w is plain


def test_a_rotation_of_the_norms_output_is_refused_by_the_engine(rotated):
    """fold_norm=False rotates x̂ = g ⊙ n, which does not commute with the norm: not a rotated stream. A refused
    plan leaves the engine as it was: dense, or decoding the previous (rotated) plan on its folded weights."""
    from actsparse.engine import Engine
    from tests.engine.test_engine import _engine_logits

    model, stats = rotated
    n = len(find_blocks(model))
    bad = plan_to_engine(asp.fit("larosa", stats, 0.5, model=model, calib_tokens=128, fold_norm=False), n)
    eng = Engine.from_hf(model, kernels="torch", max_batch=1, max_seq_len=8)
    with pytest.raises(ValueError, match="rotates the norm's output .*fit with fold_norm=True"):
        eng.set_plan(bad)
    assert eng.rules is None and eng._plain is None
    eng.set_plan(plan_to_engine(asp.fit("larosa", stats, 0.5, model=model, calib_tokens=128), n))
    seq = torch.randint(1, 260, (1, 3))
    want = _engine_logits(eng, seq, True)
    with pytest.raises(ValueError, match="rotates the norm's output"):
        eng.set_plan(bad)
    assert torch.equal(_engine_logits(eng, seq, True), want)


def test_larosa_refuses_other_families_naming_the_supported_ones(gelu):
    model, stats = gelu
    with pytest.raises(asp.ActsparseError, match="larosa supports llama, mistral, qwen2, qwen3 models.*'gpt_neox'"):
        asp.fit("larosa", stats, 0.5, model=model)


@pytest.mark.parametrize("params, match", [
    ({"roles": ("qkv",)}, "larosa roles must be a subset of"),
    ({"roles": ()}, "larosa roles must be a non-empty subset"),
    ({"calib_tokens": 1}, "larosa calib_tokens must be >= 2"),
    ({"bases": "head"}, "bases must be one of"),
])
def test_larosa_rejects_bad_params(llama, params, match):
    model, stats = llama
    with pytest.raises(asp.ActsparseError, match=match):
        asp.fit("larosa", stats, 0.5, model=model, **params)


def test_larosa_needs_the_model(llama):
    _, stats = llama
    with pytest.raises(asp.ActsparseError, match="pass model="):
        asp.fit("larosa", stats, 0.5)


def test_a_plain_rule_on_a_rotated_input_is_refused(rotated):
    """Every reader of a rotated input reads it rotated: a threshold on q beside LaRoSA's k and v would select on
    the rotated input as if it were x."""
    model, stats = rotated
    plan = asp.fit("larosa", stats, 0.5, model=model, calib_tokens=128)
    plan.rules["layers.0.q"] = Rule("layers.0.q", "threshold", {"thresh": torch.tensor(0.1)}, skips=["layers.0.q"],
                                    expected_sparsity=0.5)
    with pytest.raises(asp.ActsparseError, match="'threshold' rule on an input the plan rotates .*layer 0's attn"):
        plan_to_engine(plan, len(find_blocks(model)))


def test_a_plan_fitted_in_float32_folds_into_a_bfloat16_engine(rotated):
    """The rules' norm weights are the float32 model's; a bf16 engine holds them rounded: still the model's, so the
    rotation folds (its copy holds one layout per matrix) and the folded dense logits stay the bf16 model's."""
    from actsparse.engine import Engine
    from tests.engine.test_engine import _engine_logits

    model, stats = rotated
    ep = plan_to_engine(asp.fit("larosa", stats, 0.5, model=model, calib_tokens=128), len(find_blocks(model)))
    eng = Engine.from_hf(model, kernels="torch", dtype=torch.bfloat16, max_batch=1, max_seq_len=8)
    seq = torch.randint(1, 260, (1, 3))
    dense = _engine_logits(eng, seq, False)
    eng.set_plan(ep)
    lw = eng.w.layers[0]
    assert lw.wqkv is None and lw.wqkv_t is not None and lw.wqkv_t.dtype == torch.bfloat16
    assert (_engine_logits(eng, seq, False) - dense).norm() / dense.norm() < 5e-2
