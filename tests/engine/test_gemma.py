"""Gemma 2 and Gemma 3 (text) in the decode engine: dense logits and greedy tokens equal transformers', the sparse
kernels equal the torch backend on the same plan, and what the engine does not model is refused with the reason."""

from dataclasses import replace

import pytest
import torch

from actsparse.engine import PRESETS, TINY, Engine
from actsparse.engine.config import unsupported_reason
from benchmarks.engine_thresholds import calibrate_thresholds

from .test_engine import DEVICE, _engine_logits

FAMILIES = ("gemma2", "gemma3")
WINDOW = 4  # the local layers' window: prompts run past it


def _config(family: str, **over):
    import transformers as tr

    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
                 bos_token_id=2, initializer_range=0.15, sliding_window=WINDOW, query_pre_attn_scalar=24)
    if family == "gemma2":  # layers local, global, local; caps low enough to bend scores and logits
        return tr.Gemma2Config(**{**shape, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0, **over})
    rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}}
    return tr.Gemma3TextConfig(**{**shape, "rope_parameters": rope,
                                  "layer_types": ["sliding_attention", "sliding_attention", "full_attention"], **over})


def _hf_gemma(family: str, seed: int = 0, **over):
    """A tiny random Gemma2ForCausalLM / Gemma3ForCausalLM, fp32, its norms' w away from 0 (1 + w away from 1)."""
    import transformers as tr

    torch.manual_seed(seed)
    cls = tr.Gemma2ForCausalLM if family == "gemma2" else tr.Gemma3ForCausalLM
    # Eager attention, transformers' reference: up to 5.20 Gemma 2 defaults to SDPA, which silently drops
    # attn_logit_softcapping (5.21 on refuses SDPA for it), so the default there is not the configured model.
    model = cls(_config(family, attn_implementation="eager", **over)).eval()
    model.generation_config.eos_token_id = None  # greedy decoding runs its full length
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return model


# What each family's test model relies on: the engine without it decodes other logits.
WITHOUT = {"gemma2": {"sliding_window": dict(sliding_window=0), "attn_softcap": dict(attn_softcap=0.0),
                      "final_softcap": dict(final_softcap=0.0)},
           "gemma3": {"sliding_window": dict(sliding_window=0), "local rope": dict(rope_local_theta=0.0)}}


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_logits_and_greedy_tokens_equal_transformers_past_the_window(family):
    """(1 + w) sandwich norms, GeGLU, embedding and score scales, soft-caps, local/global layers (Gemma 3: q/k
    norms, its local RoPE base, linear scaling of the global one): step-by-step logits equal transformers'; 14 greedy
    tokens after a 9-token prompt (window 4) equal `generate`'s; and each feature matters to these logits."""
    model = _hf_gemma(family)
    seq = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        want = model(seq).logits.float()
    eng = Engine.from_hf(model, kernels="torch", max_batch=2, max_seq_len=32)
    assert torch.allclose(_engine_logits(eng, seq, sparse=False), want, atol=2e-5, rtol=1e-4)
    prompt = seq[:1, :9]
    eng.decode(prompt, 14)
    with torch.no_grad():
        assert torch.equal(eng.last_tokens.cpu(), model.generate(prompt, max_new_tokens=14, do_sample=False))
    for feature, off in WITHOUT[family].items():
        w = replace(eng.w, inv_freq_local=None) if feature == "local rope" else eng.w
        other = Engine(replace(eng.cfg, **off), w, kernels="torch", max_batch=2, max_seq_len=32)
        assert (_engine_logits(other, seq, sparse=False) - want).abs().max() > 1e-3, feature


def _plan(th: dict[str, float], method: str):
    """A fitted-plan stand-in: one threshold rule per engine site (gate_act: CATS, skipping up and down)."""
    from actsparse.sparsifiers import SparsityPlan
    from actsparse.sparsifiers.plan import Rule

    rules = {}
    for name, t in th.items():
        i = name.split(".")[1]
        skips = [f"layers.{i}.up", f"layers.{i}.down"] if name.endswith("gate_act") else [name]
        rules[name] = Rule(name, "threshold", {"thresh": torch.tensor(t, dtype=torch.float32)}, skips=skips,
                           expected_sparsity=0.5)
    return SparsityPlan(method, {}, 0.5, rules, {p: 1 for p in rules})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["teal", "cats"])
def test_sparse_kernels_equal_the_torch_backend_on_the_same_plan(family, method):
    """The kernels' GeGLU epilogue (gate/up pair, or CATS's gelu-tanh gate), o and down without their residual
    before the post-norms, fused (1 + w) input norms: the engine's logits under a plan equal the transformers model's
    under the same plan (torch backend); the dense Triton path equals transformers."""
    import actsparse as asp
    from actsparse.eval.speed import plan_to_engine

    model = _hf_gemma(family, seed=1)
    eng = Engine.from_hf(model, device=DEVICE, kernels="triton", max_batch=1, max_seq_len=16, fallback_below=0.0)
    plan = _plan(calibrate_thresholds(eng, 0.5, n_tokens=4, method=method), method)
    eng.set_plan(plan_to_engine(plan, model.config.num_hidden_layers))
    seq = torch.randint(0, model.config.vocab_size, (1, 7))
    got = _engine_logits(eng, seq, sparse=True)
    with torch.no_grad(), asp.sparsify(model, plan, backend="torch"):
        want = model(seq, use_cache=False).logits.float()
    with torch.no_grad():
        dense = model(seq, use_cache=False).logits.float()
    assert (got - want).norm() / want.norm() < 1e-4
    assert (dense - want).norm() / want.norm() > 1e-3  # the plan really removed something
    assert (_engine_logits(eng, seq, sparse=False) - dense).norm() / dense.norm() < 1e-5


@pytest.mark.parametrize("family,lists", [(f, None) for f in FAMILIES] + [(FAMILIES[-1], True)])
def test_the_fp32_stream_adds_o_and_down_through_their_post_norms_from_raw_sums(family, lists):
    """With the fp32 residual stream, o and down add their raw sums into a zeroed buffer that one launch
    normalises (Gemma's post-norms) and adds into the stream, and gate|up hands its raw pair to the gated down:
    the logits equal the torch backend's under the same plan, each post-norm is that one launch, and the buffer is
    zero between steps. With producer lists, o and down walk the lists the attention kernel and the pair write,
    into the same buffer."""
    from actsparse.eval.speed import plan_to_engine

    model = _hf_gemma(family, seed=2)
    eng = Engine.from_hf(model, device=DEVICE, kernels="triton", max_batch=1, max_seq_len=16, fallback_below=0.0,
                         residual_fp32=True, producer_lists=lists)
    plan = plan_to_engine(_plan(calibrate_thresholds(eng, 0.5, n_tokens=4), "teal"), model.config.num_hidden_layers)
    eng.set_plan(plan)
    ref = Engine.from_hf(model, kernels="torch", max_batch=1, max_seq_len=16)
    ref.set_plan(plan)
    calls = {"add_normed": 0, "pair": 0, "lists": 0}
    inner_norm, inner_pair, inner_lists = eng.ops.add_normed, eng.ops.sparse_gated_mlp, eng.ops.gather_lists

    def walk_lists(lists_, wt, *, accumulate, bias=None):
        assert accumulate is eng._post_sums(1)
        calls["lists"] += 1
        return inner_lists(lists_, wt, accumulate=accumulate, bias=bias)
    eng.ops.gather_lists = walk_lists

    def add_normed(x, y, *a, **kw):
        assert y is eng._post_sums(1) and x.dtype == torch.float32
        calls["add_normed"] += 1
        return inner_norm(x, y, *a, **kw)

    def pair(*a, **kw):
        calls["pair"] += kw.get("out") is not None
        return inner_pair(*a, **kw)
    eng.ops.add_normed, eng.ops.sparse_gated_mlp = add_normed, pair
    seq = torch.randint(0, model.config.vocab_size, (1, 5))
    got, want = _engine_logits(eng, seq, sparse=True), _engine_logits(ref, seq, sparse=True)
    assert (got - want).norm() / want.norm() < 1e-4
    layers = model.config.num_hidden_layers
    assert calls == {"add_normed": 2 * layers * 5, "pair": layers * 5, "lists": 2 * layers * 5 if lists else 0}
    assert torch.equal(eng._post_sums(1), torch.zeros_like(eng._post_sums(1)))
    eng._post_sums(1).fill_(7.0)  # as a step cut short between an op and its post-norm would leave it
    assert torch.allclose(_engine_logits(eng, seq, sparse=True), got)


def _refused(model_or_config) -> str:
    return unsupported_reason(getattr(model_or_config, "config", model_or_config), max_seq_len=4096)


def test_what_the_engine_does_not_model_is_refused_with_the_reason(tmp_path):
    """Each Gemma feature the engine does not compute is refused before a weight is copied, with its sentence."""
    import transformers as tr

    cases = [
        (_config("gemma2", hidden_activation="gelu"), "Gemma MLP is GeGLU with gelu_pytorch_tanh; this gemma2 "
                                                      "model uses 'gelu'"),
        (_config("gemma3", use_bidirectional_attention=True), "attends causally; this gemma3_text model sets "
                                                             "use_bidirectional_attention"),
        (_config("gemma2", attention_bias=True), "no biases; this gemma2 model sets attention_bias"),
        (_config("gemma3", rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0},
                                            "sliding_attention": {"rope_type": "default"}}),
         "rope_type 'dynamic' changes them with the sequence length"),
    ]
    for cfg, why in cases:
        assert why in _refused(cfg)
    model = _hf_gemma("gemma2")
    model.config.layer_types = ["sliding_attention", "chunked_attention", "full_attention"]
    assert "layer_types are ['chunked_attention', 'full_attention', 'sliding_attention']" in _refused(model)
    with pytest.raises(ValueError, match="layer_types are"):
        Engine.from_hf(model, kernels="torch")
    model.config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    model.config.sliding_window = None
    assert _refused(model) == "this gemma2 model has sliding_attention layers but no sliding_window"
    # Gemma 3's multimodal model: refused from its config alone, before any weight is loaded.
    mm = tr.Gemma3Config(text_config=_config("gemma3").to_dict(),
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=32, patch_size=16))
    mm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="runs Gemma 3's text model .* not the multimodal "
                                         "Gemma3ForConditionalGeneration"):
        Engine.from_hf(tmp_path, kernels="torch")


def test_gemma_presets_have_the_published_shapes_and_decode_at_random():
    """gemma2-9b and gemma3-12b as published; a tiny model of each spec draws its extra parameters and decodes."""
    g2, g3 = PRESETS["gemma2-9b"], PRESETS["gemma3-12b"]
    assert (g2.hidden_size, g2.intermediate_size, g2.n_layers, g2.q_size, g2.vocab_size) == (3584, 14336, 42, 4096,
                                                                                             256000)
    assert (g2.sliding_window, g2.attn_softcap, g2.final_softcap, sum(g2.local_layers)) == (4096, 50.0, 30.0, 21)
    assert (g3.hidden_size, g3.intermediate_size, g3.n_layers, g3.vocab_size, g3.sliding_window) == (3840, 15360, 48,
                                                                                                     262208, 1024)
    assert g3.local_layers[:6] == (True,) * 5 + (False,) and sum(g3.local_layers) == 40 and g3.qk_norm
    assert g3.with_layers(7).local_layers == (True,) * 5 + (False, True)
    for preset in (g2, g3):
        cfg = replace(preset, vocab_size=TINY.vocab_size, hidden_size=64, intermediate_size=160, n_heads=4,
                      n_kv_heads=2, head_dim=16, embed_scale=8.0, sliding_window=3).with_layers(2)
        eng = Engine.random(cfg, device="cpu", dtype=torch.float32, kernels="torch", max_batch=1, max_seq_len=8)
        lw = eng.w.layers[0]
        assert lw.post_attn_norm.dtype == torch.float32 and lw.post_mlp_norm.shape == (64,)
        assert (eng.w.inv_freq_local is not None) == (preset is g3)
        assert eng.decode(None, 3, prompt_len=4) > 0
