"""WINA's transform: exact at sparsity 0 on every supported family, column-orthogonal k/gate, rotated scores,
Top-K and thresholds in the rotated basis, zero-norm columns as skipped reads, refusals; MoE expert scoring."""
import numpy as np
import pytest
import torch

import actsparse as asp
from actsparse.eval.speed import plan_to_engine
from actsparse.models.sites import find_blocks, find_sites
from actsparse.sparsifiers._calib import calib_windows
from actsparse.sparsifiers.wina import WinaParams, site_scores
from tests.families.models import VOCAB, make_family
from tests.methods.conftest import random_norms


def _calibrated(model, tok, tokens=256):
    return asp.calibrate(model, tok, tokens=tokens, seq_len=32, batch_size=8, sample_size=2048, progress=False)


def _mha_llama():
    import transformers as tr

    torch.manual_seed(7)
    return tr.LlamaForCausalLM(tr.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                              max_position_embeddings=128)).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def gqa(tok):
    model = random_norms(make_family("llama", seed=11), seed=12)     # 2 of 4 KV heads: k_proj is [32, 64]
    return model, _calibrated(model, tok, tokens=512)


def _rms(h, eps):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


# llama/mistral/qwen2/qwen3 from tests/families are GQA (2 of 4 KV heads); "llama-mha" has every head's K
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "llama-mha"])
def test_wina_transform_leaves_dense_logits_unchanged(family, tok):
    model = random_norms(_mha_llama() if family == "llama-mha" else make_family(family, seed=3), seed=4)
    stats = _calibrated(model, tok, tokens=64)
    plan = asp.fit("wina", stats, 0.0, model=model, transform=True, selection="topk")
    ids = torch.randint(1, VOCAB, (2, 24))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        with asp.sparsify(model, plan) as h:
            got = model(ids, use_cache=False).logits
            measured = h.measured_sparsity()["per_point"]
    assert float((got - want).norm() / want.norm()) <= 1e-4
    # the rotated k_proj's zero columns (hidden - kv width) are dropped even at sparsity 0
    dead = 0.0 if family == "llama-mha" else 0.5
    assert measured["layers.0.k"] == pytest.approx(dead) and measured["layers.1.gate"] == 0.0


def test_wina_transform_basis_makes_k_and_gate_column_orthogonal(gqa):
    model, stats = gqa
    plan = asp.fit("wina", stats, 0.5, model=model, transform=True, selection="topk")
    block = find_blocks(model)[1]
    for role, norm in (("k", block.module.input_layernorm), ("gate", block.module.post_attention_layernorm)):
        rule = plan.rules[f"layers.1.{role}"]
        q = rule.tensors["Q"].double()
        w_rot = block.sites[role].module.weight.double() * norm.weight.double() @ q    # W diag(g) Q
        gram = w_rot.T @ w_rot
        off = gram - torch.diag(torch.diagonal(gram))
        assert float(off.abs().max()) <= 1e-4 * float(gram.diagonal().max())
        norms = w_rot.norm(dim=0)
        torch.testing.assert_close(rule.tensors["w"].double(), norms, rtol=1e-4, atol=1e-4)
        s = np.linalg.svd(w_rot.numpy(), compute_uv=False)
        np.testing.assert_allclose(np.sort(norms.numpy())[::-1][: len(s)], s, rtol=1e-4, atol=1e-5)
        assert int((rule.tensors["w"] == 0).sum()) == (64 - block.sites[role].out_features if role == "k" else 0)
    assert plan.rules["layers.1.q"].tensors["Q"] is plan.rules["layers.1.k"].tensors["Q"]
    assert "w" not in plan.rules["layers.1.q"].tensors and "w" not in plan.rules["layers.1.up"].tensors


@pytest.mark.parametrize("role, column_norms", [("k", "reference"), ("up", "reference"), ("v", "own")])
def test_wina_transform_topk_keeps_the_largest_rotated_scores_on_fresh_inputs(gqa, role, column_norms):
    model, stats = gqa
    sparsity = 0.6
    plan = asp.fit("wina", stats, sparsity, model=model, transform=True, selection="topk", column_norms=column_norms)
    block = find_blocks(model)[0]
    norm = block.module.input_layernorm if role in ("k", "v") else block.module.post_attention_layernorm
    lin = block.sites[role].module
    h = torch.randn(3, 7, 64) * 2.0                                           # fresh residual-stream states
    z = _rms(h.double(), norm.variance_epsilon)
    w_fold = lin.weight.double() * norm.weight.double()
    _, _, vh = np.linalg.svd((block.sites["k" if role in ("k", "v") else "gate"].module.weight.double()
                              * norm.weight.double()).numpy())
    q = plan.rules[f"layers.0.{role}"].tensors["Q"].double()
    rank = min(vh.shape[0], block.sites["k" if role in ("k", "v") else "gate"].out_features)
    # Q = V up to signs on the row space (any orthonormal basis spans the null space)
    np.testing.assert_allclose(np.abs((vh.T * q.numpy()).sum(0))[:rank], 1.0, atol=1e-4)
    z = z @ q
    w_rot = w_fold @ q
    score = z.abs() * w_rot.norm(dim=0) if role != "up" else z.abs()
    keep = torch.zeros_like(z, dtype=torch.bool).scatter(-1, score.topk(int(64 * (1 - sparsity)), dim=-1).indices, True)
    if role == "k":
        keep &= w_rot.norm(dim=0) > 1e-6          # the reference's Top-K may keep a zero column; it adds nothing
    want = (z * keep) @ w_rot.T
    with asp.sparsify(model, plan) as hd, torch.no_grad():
        got = lin(norm(h))
        measured = hd.measured_sparsity()["per_point"][f"layers.0.{role}"]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert measured == pytest.approx(1 - float(keep.double().mean()))


def test_wina_transform_thresholds_are_quantiles_of_rotated_scores(gqa):
    model, stats = gqa
    plan = asp.fit("wina", stats, 0.3, model=model, transform=True, calib_tokens=256)
    block = find_blocks(model)[0]
    norm = block.module.input_layernorm
    got = []
    hook = norm.register_forward_hook(lambda m, a, out: got.append(out.reshape(-1, 64).double()))
    try:
        with torch.no_grad():
            model(calib_windows(stats, 256))
    finally:
        hook.remove()
    rule = plan.rules["layers.0.k"]
    q = rule.tensors["Q"].double()
    n = torch.cat(got) / norm.weight.double()
    w = (block.sites["k"].module.weight.double() * norm.weight.double() @ q).norm(dim=0)
    w[w < 1e-6] = 0.0
    t = np.quantile(((n @ q).abs() * w).numpy(), 0.3)
    assert rule.kind == "rotated_threshold"
    want = torch.where(w > 0, t / w.clamp_min(1e-30), torch.inf)
    torch.testing.assert_close(rule.tensors["thresh"].double(), want, rtol=2e-4, atol=1e-9)
    # the quantile at 0.3 falls inside the zero scores (half the columns): only the zero columns drop
    assert t == 0.0 and rule.expected_sparsity == 0.5
    assert plan.rules["layers.0.q"].tensors["thresh"].dim() == 0   # q: plain |z| in the rotated basis


def test_wina_zero_norm_columns_count_as_skipped_reads(gqa, tok):
    model, stats = gqa
    plan = asp.fit("wina", stats, 0.25, model=model, transform=True, selection="topk")
    sites = find_sites(model)
    expected = {n: 0.5 if n.endswith(".k") else (s.in_features - int(s.in_features * 0.75)) / s.in_features
                for n, s in sites.items()}
    assert {n: r.expected_sparsity for n, r in plan.rules.items()} == pytest.approx(expected)
    want = sum(s.n_params * expected[n] for n, s in sites.items()) / sum(s.n_params for s in sites.values())
    assert plan.effective_sparsity == pytest.approx(want)
    with asp.sparsify(model, plan) as h:
        asp.perplexity(model, tok, data="bundled:eval", seq_len=32, max_tokens=128)
        m = h.measured_sparsity()
    assert m["per_point"]["layers.1.k"] == pytest.approx(0.5) and m["effective"] == pytest.approx(want)


def test_wina_transform_greedy_with_topk_selection_reads_levels_off_the_greedy_search(gqa):
    model, stats = gqa
    plan = asp.fit("wina", stats, 0.4, model=model, transform=True, selection="topk", allocation="greedy",
                   calib_tokens=128, base_step=0.2)
    for b in find_blocks(model):
        rules = [plan.rules[s.name] for s in b.sites.values()]
        assert {r.kind for r in rules} == {"rotated_topk", "topk_token"}
        assert rules[0].attrs["allocation"] == "greedy"
        total = sum(s.n_params for s in b.sites.values())
        f = sum(s.n_params * plan.rules[s.name].expected_sparsity for s in b.sites.values()) / total
        assert f >= rules[0].attrs["block_effective"] - 1e-9        # zero columns only add skipped reads
        assert plan.rules[f"layers.{b.layer}.k"].expected_sparsity >= 0.5


@pytest.mark.parametrize("family", ["gemma", "mixtral"])
def test_wina_transform_refuses_other_families_naming_the_supported_ones(family, llama):
    model = make_family(family, layers=1)
    _, stats = llama                           # refused before the stats are read
    with pytest.raises(asp.ActsparseError, match="wina with transform=True supports llama, mistral, qwen2, qwen3 "
                                                 f"models.*'{family}'"):
        asp.fit("wina", stats, 0.5, model=model, transform=True)


@pytest.mark.parametrize("params, match", [
    ({"selection": "topk", "sequential": True}, "selection='topk' has no thresholds to fit"),
    ({"selection": "quantile"}, "selection must be one of"),
])
def test_wina_rejects_bad_selection(llama, params, match):
    model, stats = llama
    with pytest.raises(asp.ActsparseError, match=match):
        asp.fit("wina", stats, 0.5, model=model, **params)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_wina_scores_moe_expert_up_by_x_like_a_gated_mlp(family):
    model = make_family(family, layers=1)
    score = site_scores(model, WinaParams())
    experts = [n for n in score if ".expert" in n or ".shared_expert" in n]
    assert experts
    for n in experts:
        if n.endswith((".up", ".down")):
            assert score[n].w is None, n
        else:
            w = find_sites(model)[n].weight.detach().double().norm(dim=0)
            torch.testing.assert_close(score[n].w.double(), w)


@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_wina_transform_runs_in_the_engine_on_a_rotated_stream(gqa, selection):
    """transform=True: the SVD bases folded into the engine's weights (one per attention and MLP input, adapters
    between them), thresholds or each token's Top-K on the rotated input: the engine's logits (Triton kernels,
    interpreter here) equal transformers' under the same plan."""
    from actsparse.engine import Engine
    from actsparse.models.sites import find_blocks
    from tests.engine.test_engine import _engine_logits

    model, stats = gqa
    plan = asp.fit("wina", stats, 0.5, model=model, transform=True, calib_tokens=128, selection=selection)
    ep = plan_to_engine(plan, len(find_blocks(model)))
    assert ep.rotations
    seq = torch.randint(1, 200, (1, 5))
    with torch.no_grad(), asp.sparsify(model, plan, backend="torch"):
        want = model(seq, use_cache=False).logits.float()
    eng = Engine.from_hf(model, device="cuda" if torch.cuda.is_available() else "cpu", kernels="triton", max_batch=1,
                         max_seq_len=16, fallback_below=0.0)
    eng.set_plan(ep)
    assert (_engine_logits(eng, seq, True) - want).norm() / want.norm() < 1e-4


def test_wina_topk_plans_map_to_the_engines_per_token_topk(gqa):
    """selection=topk: each site keeps its token's Top-K of |x_i|·w_i (k and gate weighted by column norms, the
    others by |x|); the engine finds the level every step (tests/engine/test_engine_methods.py runs it)."""
    model, stats = gqa
    plan = asp.fit("wina", stats, 0.5, model=model, selection="topk")
    ep = plan_to_engine(plan)
    for point, rule in plan.rules.items():
        layer, role = int(point.split(".")[1]), point.split(".")[2]
        site = ep.layers[layer][role]
        assert site.topk == rule.attrs["n_zero"]
        assert (site.topk_w is None) == ("w" not in rule.tensors)


def test_wina_transform_sequential_fits_rotated_thresholds_on_sparsified_inputs(gqa):
    from tests.methods.test_wina import _inputs

    model, stats = gqa
    plan = asp.fit("wina", stats, 0.6, model=model, transform=True, sequential=True, calib_tokens=256)
    layer0 = [r for p, r in plan.rules.items() if p.startswith("layers.0.")]
    assert {r.kind for r in layer0} == {"rotated_threshold", "threshold"}
    x = _inputs(model, calib_windows(stats, 256), ["layers.1.k"], rules=layer0, stats=stats)["layers.1.k"]
    rule = plan.rules["layers.1.k"]                   # the first stage of layer 1: behind layer 0's rules only
    q, g = rule.tensors["Q"].double(), rule.tensors["g"].double()
    w = (find_sites(model)["layers.1.k"].module.weight.double() * g @ q).norm(dim=0)
    w[w < 1e-6] = 0.0
    t = np.quantile((((x / g) @ q).abs() * w).numpy(), 0.6)
    want = torch.where(w > 0, t / w.clamp_min(1e-30), torch.inf)
    torch.testing.assert_close(rule.tensors["thresh"].double(), want, rtol=2e-4, atol=1e-9)
