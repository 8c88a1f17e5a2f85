"""The decode engine reproduces transformers' Llama, and its sparse path is the dense one at threshold 0."""

import dataclasses

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from actsparse.engine import TINY, Engine
from benchmarks.engine_thresholds import calibrate_thresholds, measure_sparsity

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _hf_tiny(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = HFLlamaConfig(vocab_size=TINY.vocab_size, hidden_size=TINY.hidden_size,
                        intermediate_size=TINY.intermediate_size, num_hidden_layers=TINY.n_layers,
                        num_attention_heads=TINY.n_heads, num_key_value_heads=TINY.n_kv_heads,
                        max_position_embeddings=128, rms_norm_eps=TINY.rms_eps, rope_theta=TINY.rope_theta)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a wrong norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _engine_logits(eng: Engine, seq: torch.Tensor, sparse: bool) -> torch.Tensor:
    """Feed seq [B, T] one token at a time; return logits [B, T, V]."""
    b, t = seq.shape
    pos = torch.zeros(b, dtype=torch.int32, device=eng.device)
    out = []
    for i in range(t):
        out.append(eng.forward_step(seq[:, i].to(eng.device), pos, sparse).float().cpu())
        pos += 1
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("batch", [1, 2])
def test_dense_step_by_step_logits_equal_transformers(batch):
    model = _hf_tiny(seed=batch)
    seq = torch.randint(0, TINY.vocab_size, (batch, 7))
    with torch.no_grad():
        want = model(seq).logits.float()
    eng = Engine.from_hf(model, kernels="torch", max_batch=batch, max_seq_len=16)
    got = _engine_logits(eng, seq, sparse=False)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (got - want).abs().max()


def test_sparse_kernels_at_threshold_zero_equal_dense():
    model = _hf_tiny(seed=3)
    eng = Engine.from_hf(model, device=DEVICE, kernels="triton", max_batch=2, max_seq_len=16,
                         fallback_below=0.0)
    seq = torch.randint(0, TINY.vocab_size, (2, 5))
    dense = _engine_logits(eng, seq, sparse=False)
    eng.set_thresholds({f"layers.{i}.{r}": 0.0 for i in range(TINY.n_layers) for r in ("q", "k", "v", "o", "gate",
                                                                                       "up", "down")})
    sparse = _engine_logits(eng, seq, sparse=True)
    rel = (sparse - dense).norm() / dense.norm()
    assert rel < 1e-5, rel


def test_sparse_kernels_match_torch_reference_path_at_50_percent():
    model = _hf_tiny(seed=4)
    tri = Engine.from_hf(model, device=DEVICE, kernels="triton", max_batch=1, max_seq_len=16,
                         fallback_below=0.0)
    th = calibrate_thresholds(tri, 0.5, n_tokens=4)
    ref = Engine.from_hf(model, kernels="torch", max_batch=1, max_seq_len=16)
    ref.set_thresholds(th)
    seq = torch.randint(0, TINY.vocab_size, (1, 5))
    got, want = _engine_logits(tri, seq, True), _engine_logits(ref, seq, True)
    dense = _engine_logits(ref, seq, False)
    assert (got - want).norm() / want.norm() < 1e-4
    assert (dense - want).norm() / want.norm() > 1e-3  # the thresholds really removed something


def test_cats_path_matches_torch_reference():
    model = _hf_tiny(seed=5)
    tri = Engine.from_hf(model, device=DEVICE, kernels="triton", max_batch=1, max_seq_len=16,
                         fallback_below=0.0)
    th = calibrate_thresholds(tri, 0.5, n_tokens=4, method="cats")
    assert set(k.split(".")[-1] for k in th) == {"gate_act"}
    ref = Engine.from_hf(model, kernels="torch", max_batch=1, max_seq_len=16)
    ref.set_thresholds(th)
    seq = torch.randint(0, TINY.vocab_size, (1, 4))
    got, want = _engine_logits(tri, seq, True), _engine_logits(ref, seq, True)
    assert (got - want).norm() / want.norm() < 1e-4


def test_shift_is_folded_into_a_bias():
    model = _hf_tiny(seed=6)
    d = TINY.hidden_size
    shifts = {f"layers.0.{r}": torch.randn(d) * 0.1 for r in ("q", "k", "v", "gate", "up")}
    th = {f"layers.0.{r}": 0.0 for r in ("q", "k", "v", "gate", "up")}
    eng = Engine.from_hf(model, device=DEVICE, kernels="triton", max_batch=1, max_seq_len=16,
                         fallback_below=0.0)
    seq = torch.randint(0, TINY.vocab_size, (1, 3))
    dense = _engine_logits(eng, seq, False)
    eng.set_thresholds(th, shifts=shifts)  # threshold 0: x_s = x - m everywhere, + W·m gives back W·x
    got = _engine_logits(eng, seq, True)
    assert (got - dense).norm() / dense.norm() < 1e-5


def test_ops_under_the_crossover_fall_back_to_dense_per_batch():
    model = _hf_tiny(seed=9)
    # Batch 1: kernels everywhere; batch 2: every op is expected to lose, so all run dense.
    eng = Engine.from_hf(model, kernels="torch", max_batch=2, max_seq_len=16,
                         fallback_below={1: 0.0, 2: {"qkv": 1.0, "o": 1.0, "gu": 1.0, "down": 1.0}})
    calibrate_thresholds(eng, 0.5, n_tokens=4)
    seq = torch.randint(0, TINY.vocab_size, (2, 3))
    dense2, sparse2 = _engine_logits(eng, seq, False), _engine_logits(eng, seq, True)
    assert torch.equal(dense2, sparse2)
    dense1, sparse1 = _engine_logits(eng, seq[:1], False), _engine_logits(eng, seq[:1], True)
    assert (dense1 - sparse1).norm() / dense1.norm() > 1e-3
    assert measure_sparsity(eng, n_tokens=4, batch=2)["union"] == 0.0  # nothing skipped where dense


def test_cats_under_the_gate_up_crossover_runs_dense():
    model = _hf_tiny(seed=10)
    eng = Engine.from_hf(model, kernels="torch", max_batch=1, max_seq_len=16,
                         fallback_below={"qkv": 0.5, "o": 0.5, "gu": 0.9, "down": 0.0})
    calibrate_thresholds(eng, 0.5, n_tokens=4, method="cats")  # skips ~half the up rows: under 0.9
    seq = torch.randint(0, TINY.vocab_size, (1, 3))
    assert torch.equal(_engine_logits(eng, seq, False), _engine_logits(eng, seq, True))
    assert measure_sparsity(eng, n_tokens=4)["union"] == 0.0
    eng.fallback_below = {"qkv": 0.5, "o": 0.5, "gu": 0.1, "down": 0.0}  # now above it: CATS runs
    dense, sparse = _engine_logits(eng, seq, False), _engine_logits(eng, seq, True)
    assert (dense - sparse).norm() / dense.norm() > 1e-3
    assert measure_sparsity(eng, n_tokens=4)["union"] > 0.1


def test_decode_generates_tokens_and_reports_speed():
    model = _hf_tiny(seed=8)
    eng = Engine.from_hf(model, kernels="torch", max_batch=1, max_seq_len=32)
    prompt = torch.randint(0, TINY.vocab_size, (1, 4))
    tok_s = eng.decode(prompt, 5)
    assert tok_s > 0 and eng.last_tokens.shape == (1, 9)
    assert torch.equal(eng.last_tokens[:, :4].cpu(), prompt)
    # Greedy decoding reproduces transformers' argmax continuation.
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(eng.last_tokens.cpu(), want)


def test_bad_inputs_are_rejected_with_a_useful_message():
    eng = Engine.random(TINY, device="cpu", dtype=torch.float32, kernels="torch", max_batch=1, max_seq_len=8)
    with pytest.raises(ValueError, match="unknown site"):
        eng.set_thresholds({"layers.9.q": 0.1})
    with pytest.raises(ValueError, match="unknown site"):
        eng.set_thresholds({"layers.0.attn": 0.1})
    with pytest.raises(ValueError, match="per-channel"):
        eng.set_thresholds({"layers.0.q": torch.ones(3)})
    with pytest.raises(ValueError, match="drop the 'up' threshold"):
        eng.set_thresholds({"layers.0.gate_act": 0.1, "layers.0.up": 0.2})
    with pytest.raises(RuntimeError, match="set_thresholds"):
        eng.decode(None, 2, sparse=True)
    with pytest.raises(ValueError, match="max_seq_len"):
        eng.decode(None, 8, prompt_len=4)
    with pytest.raises(ValueError, match="kernels"):
        Engine.random(TINY, device="cpu", dtype=torch.float32, kernels="cuda")


def test_a_scap_plan_with_scalar_modes_runs_in_the_engine_as_in_the_torch_backend():
    """SCAP shifts each site's input by a scalar mode m (folded into a bias): the engine spreads it over the
    channels, and its sparse logits equal the transformers model under the same plan (torch backend)."""
    import actsparse as asp
    from actsparse.eval.speed import plan_to_engine
    from actsparse.sparsifiers import SparsityPlan
    from actsparse.sparsifiers.scap import _rule

    model = _hf_tiny(seed=8)
    g = torch.Generator().manual_seed(8)
    rules = {}
    for i in range(TINY.n_layers):
        for role, mod in (("gate", model.model.layers[i].mlp.gate_proj), ("up", model.model.layers[i].mlp.up_proj),
                          ("down", model.model.layers[i].mlp.down_proj)):
            m, t = float(torch.randn((), generator=g) * 0.05), float(torch.rand((), generator=g) * 0.2)
            r = _rule(f"layers.{i}.{role}", "median", m, t, mod.weight.detach().float(), 0.5)
            rules[r.point] = r
    plan = SparsityPlan("scap", {}, 0.5, rules, {p: 1 for p in rules})
    ep = plan_to_engine(plan, TINY.n_layers)
    shifts = {f"layers.{i}.{r}": s.shift for i, L in enumerate(ep.layers) for r, s in L.items() if s.shift is not None}
    assert set(shifts) == set(rules) and all(isinstance(v, float) for v in shifts.values())
    eng = Engine.from_hf(model, device=DEVICE, kernels="triton", max_batch=1, max_seq_len=16, fallback_below=0.0)
    eng.set_plan(ep)
    seq = torch.randint(0, TINY.vocab_size, (1, 5), generator=g)
    got = _engine_logits(eng, seq, True)
    with torch.no_grad(), asp.sparsify(model, plan, backend="torch"):
        want = model(seq, use_cache=False).logits.float()
    dense = _engine_logits(eng, seq, False)
    assert (got - want).norm() / want.norm() < 1e-4
    assert (dense - want).norm() / want.norm() > 1e-3


@pytest.mark.parametrize("family,why", [("gemma", "gemma needs Gemma 1's block"),
                                        ("gpt2", "gpt2 needs LayerNorms, learned positions"),
                                        ("neox", "gpt_neox needs parallel attention")])
def test_a_model_the_engine_would_decode_wrong_is_refused_before_copying(family, why, tmp_path):
    """Another family's weights in a Llama block decode wrong tokens silently: refused with the reason, from a
    loaded model and from a saved folder (before the folder's weights load)."""
    from tests.families.models import make_family

    model = make_family(family, layers=1)
    with pytest.raises(ValueError, match=f"runs llama, mistral, qwen2, qwen3, phi3, granite, gemma2, gemma3_text, "
                                         f"mixtral, qwen2_moe, qwen3_moe models exactly; {why}"):
        Engine.from_hf(model, kernels="torch")
    model.config.save_pretrained(tmp_path)  # a config and no weights: refused before any load is tried
    with pytest.raises(ValueError, match=why):
        Engine.from_hf(tmp_path, kernels="torch")


def test_features_outside_the_llama_block_are_refused():
    from tests.families.models import make_family

    llama = _hf_tiny(0)
    llama.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="SwiGLU \\(silu\\); this llama model uses 'gelu'"):
        Engine.from_hf(llama, kernels="torch")
    llama.config.hidden_act, llama.config.mlp_bias = "silu", True
    with pytest.raises(ValueError, match="no biases; this llama model sets mlp_bias"):
        Engine.from_hf(llama, kernels="torch")
    llama.config.mlp_bias = False
    llama.config.rope_parameters = {"rope_type": "longrope", "rope_theta": 1e4}
    with pytest.raises(ValueError, match="rope_type 'longrope' changes them with the sequence length"):
        Engine.from_hf(llama, kernels="torch")
    llama.config.rope_parameters = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    with pytest.raises(ValueError, match="rotates part of each"):
        Engine.from_hf(llama, kernels="torch")


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3", "granite"])
def test_other_families_decode_as_transformers_dense_and_through_the_kernels(family):
    """Qwen2's q/k/v biases, Qwen3's per-head q/k norms, Phi-3's fused q|k|v and gate|up, Granite's multipliers:
    step-by-step logits and greedy tokens equal transformers'; the sparse kernels at threshold 0 (biases fused,
    norms between the ops) equal the dense path."""
    import transformers as tr

    from tests.families.models import make_family

    torch.manual_seed(0)
    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    if family == "phi3":
        model = tr.Phi3ForCausalLM(tr.Phi3Config(**shape)).eval()
    elif family == "granite":  # multipliers far from 1, as Granite 3's are
        model = tr.GraniteForCausalLM(tr.GraniteConfig(**shape, embedding_multiplier=12.0, residual_multiplier=0.22,
                                                       attention_multiplier=0.015625, logits_scaling=8.0)).eval()
    else:
        model = make_family(family, layers=2).eval()
    with torch.no_grad():  # norms and biases away from their defaults so that a missing one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    seq = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        want = model(seq).logits.float()
    eng = Engine.from_hf(model, kernels="torch", max_batch=2, max_seq_len=16)
    assert torch.allclose(_engine_logits(eng, seq, sparse=False), want, atol=2e-5, rtol=1e-4)
    eng.decode(seq[:1, :3], 4)
    with torch.no_grad():
        assert torch.equal(eng.last_tokens.cpu(), model.generate(seq[:1, :3], max_new_tokens=4, do_sample=False))
    tri = Engine.from_hf(model, device=DEVICE, kernels="triton", max_batch=1, max_seq_len=16, fallback_below=0.0)
    tri.set_thresholds({f"layers.{i}.{r}": 0.0 for i in range(2) for r in ("q", "k", "v", "o", "gate", "up", "down")})
    got = _engine_logits(tri, seq[:1], sparse=True)
    assert torch.allclose(got, want[:1], atol=1e-4, rtol=1e-3), (got - want[:1]).abs().max()


def test_random_weights_follow_the_family_flags():
    """Presets of other families draw their extra parameters, and decode; shapes as published."""
    from dataclasses import replace

    from actsparse.engine import PRESETS

    assert PRESETS["qwen3-8b"].qk_norm and PRESETS["qwen2.5-7b"].qkv_bias and PRESETS["qwen3-8b"].q_size == 4096
    cfg = replace(TINY, qkv_bias=True, qk_norm=True)
    eng = Engine.random(cfg, device="cpu", dtype=torch.float32, kernels="torch", max_batch=1, max_seq_len=8)
    lw = eng.w.layers[0]
    assert lw.bqkv.shape == (cfg.q_size + 2 * cfg.kv_size,) and lw.q_norm.shape == (cfg.head_dim,)
    assert eng.decode(None, 2, prompt_len=2) > 0


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_layers_decode_like_transformers_past_the_window(family):
    """Mistral slides its window on every layer, Qwen2 (use_sliding_window) from max_window_layers on: greedy
    tokens past the window equal transformers' generate, and the window is what makes them so."""
    from dataclasses import replace

    from tests.families.models import make_family

    model = make_family(family, layers=2)
    model.config.sliding_window = 4
    if family == "qwen2":
        model.config.use_sliding_window, model.config.max_window_layers = True, 1
        model.config.layer_types = ["full_attention", "sliding_attention"]
    model = type(model)(model.config).eval()   # rebuilt so the attention modules read the new window
    torch.manual_seed(int(torch.randint(0, 1000, (1,))))
    with torch.no_grad():
        for p_ in model.parameters():
            p_.normal_(0, 0.3)
    prompt = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    eng = Engine.from_hf(model, kernels="torch", max_batch=1, max_seq_len=32)
    assert eng.cfg.sliding_window == 4
    assert eng.cfg.local_layers == ((True, True) if family == "mistral" else (False, True))
    eng.decode(prompt, 8)
    assert torch.equal(eng.last_tokens.cpu(), want)
    wide = Engine(replace(eng.cfg, sliding_window=0), eng.w, kernels="torch", max_batch=1, max_seq_len=32)
    seq = torch.randint(0, model.config.vocab_size, (1, 9))
    assert not torch.allclose(_engine_logits(eng, seq, False)[:, -1], _engine_logits(wide, seq, False)[:, -1])


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_an_fp32_residual_stream_adds_o_and_down_into_itself(kernels):
    """residual_fp32: a sparse step keeps the stream in fp32, o / down add into it in place (the one-shot tiles'
    `accumulate=`), q|k|v hands its raw fp32 sums to attention and gate|up its two to down (`out=`, `gated=`);
    logits match the fp32 torch reference path (fp16 model)."""
    model = _hf_tiny(seed=8)
    th = {f"layers.{i}.{r}": 0.3 for i in range(TINY.n_layers) for r in ("q", "k", "v", "o", "gate", "up", "down")}
    eng = Engine.from_hf(model, device=DEVICE, dtype=torch.float16, kernels=kernels, max_batch=2, max_seq_len=16,
                         fallback_below=0.0, residual_fp32=True)
    eng.set_thresholds(th)
    calls, raw = [], []
    inner = eng.ops.sparse_gemv

    def spy(*args, **kw):
        calls.append(kw.get("accumulate") is not None)
        raw.append(kw.get("out") is not None)
        return inner(*args, **kw)
    eng.ops.sparse_gemv = spy
    pairs = []
    inner_pair = eng.ops.sparse_gated_mlp

    def spy_pair(*args, **kw):
        pairs.append(kw.get("out") is not None)
        return inner_pair(*args, **kw)
    eng.ops.sparse_gated_mlp = spy_pair
    ref = Engine.from_hf(model, kernels="torch", max_batch=2, max_seq_len=16)
    ref.set_thresholds(th)
    seq = torch.randint(0, TINY.vocab_size, (2, 4))
    got, want = _engine_logits(eng, seq, True), _engine_logits(ref, seq, True)
    assert (got - want).norm() / want.norm() < 3e-3
    assert sum(calls) == 2 * TINY.n_layers * 4  # o and down of every layer, every step, added in place
    assert sum(raw) == TINY.n_layers * 4  # q|k|v's raw fp32 sums, read by the attention kernel
    assert sum(pairs) == len(pairs) == TINY.n_layers * 4  # gate|up's raw sums, act(gate)·up formed by down
    off = Engine.from_hf(model, device=DEVICE, dtype=torch.float16, kernels=kernels, max_batch=2, max_seq_len=16,
                         fallback_below=0.0, residual_fp32=False)
    off.set_thresholds(th)
    assert not off.residual_fp32 and (_engine_logits(off, seq, True) - want).norm() / want.norm() < 3e-3


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_the_fused_mlp_runs_where_it_is_chosen(monkeypatch, kernels):
    """Where the measurement picks the whole MLP in two launches (`sparse_mlp`), every layer's MLP runs on it,
    adding into the fp32 stream, and the logits match those of the same engine on the raw pair + gated down
    (itself checked against the torch reference above: the same selections, so no threshold flip between them);
    with shifts (SCAP) too."""
    from actsparse.engine.engine import FUSED_MLP

    model = _hf_tiny(seed=10)
    roles = ("q", "k", "v", "o", "gate", "up", "down")
    th = {f"layers.{i}.{r}": 0.3 for i in range(TINY.n_layers) for r in roles}
    shifts = {f"layers.{i}.{r}": torch.randn(n) * 0.05 for i in range(TINY.n_layers)
              for r, n in (("gate", TINY.hidden_size), ("up", TINY.hidden_size), ("down", TINY.intermediate_size))}
    inner_raw = Engine._mlp_raw
    for sh in (None, shifts):
        seq = torch.randint(0, TINY.vocab_size, (2, 4))
        logits, calls = [], []
        for fused in (False, True):
            monkeypatch.setattr(Engine, "_mlp_raw", lambda self, *a, f=fused: inner_raw(self, *a) and (
                FUSED_MLP if f else ("oneshot", "oneshot")))
            eng = Engine.from_hf(model, device=DEVICE, dtype=torch.float16, kernels=kernels, max_batch=2,
                                 max_seq_len=16, fallback_below=0.0, residual_fp32=True)
            eng.set_thresholds(th, shifts=sh)
            inner = eng.ops.sparse_mlp

            def spy(*args, _inner=inner, **kw):
                calls.append(kw["accumulate"].dtype)
                return _inner(*args, **kw)
            eng.ops.sparse_mlp = spy
            logits.append(_engine_logits(eng, seq, True))
        assert (logits[1] - logits[0]).norm() / logits[0].norm() < 1e-3
        assert calls == [torch.float32] * (TINY.n_layers * 4)  # every layer, every step, into the fp32 stream


def test_the_fp32_stream_paths_run_on_the_gather_walk_where_it_is_chosen(monkeypatch):
    """Where the engine's measurement picks the gather walk for adding into the stream ("gather-accumulate") and
    for gate|up's raw sums and down's gated input, those launches run on it (impl="gather") and the logits
    match the fp32 torch reference path (fp16 model, the Triton kernels)."""
    model = _hf_tiny(seed=9)
    th = {f"layers.{i}.{r}": 0.3 for i in range(TINY.n_layers) for r in ("q", "k", "v", "o", "gate", "up", "down")}
    eng = Engine.from_hf(model, device=DEVICE, dtype=torch.float16, kernels="triton", max_batch=2, max_seq_len=16,
                         fallback_below=0.0, residual_fp32=True)
    eng.set_thresholds(th)
    monkeypatch.setattr(Engine, "_choose", lambda self, rule, op, b: "gather" if op == "gu" else "gather-accumulate")
    inner_raw = Engine._mlp_raw
    monkeypatch.setattr(Engine, "_mlp_raw", lambda self, *a: inner_raw(self, *a) and ("gather", "gather"))
    impls = []
    for name in ("sparse_gemv", "sparse_gated_mlp"):
        inner = getattr(eng.ops, name)

        def spy(*args, _inner=inner, **kw):
            impls.append((kw.get("impl"), kw.get("accumulate") is not None or kw.get("out") is not None))
            return _inner(*args, **kw)
        setattr(eng.ops, name, spy)
    ref = Engine.from_hf(model, kernels="torch", max_batch=2, max_seq_len=16)
    ref.set_thresholds(th)
    seq = torch.randint(0, TINY.vocab_size, (2, 4))
    got, want = _engine_logits(eng, seq, True), _engine_logits(ref, seq, True)
    assert (got - want).norm() / want.norm() < 3e-3
    assert impls and set(impls) == {("gather", True)}  # q|k|v, o, gate|up, down: all four, every layer and step
    assert len(impls) == 4 * TINY.n_layers * 4


@pytest.mark.parametrize("how", ["on", "measured", "off"])
def test_o_and_down_read_the_lists_their_producers_write(monkeypatch, how):
    """producer_lists: at batch 1, the attention kernel selects its output as o does and writes o's active-row
    lists, and gate|up's raw pair writes down's; their gather walks read them (`gather_lists`, no compaction
    launch). On (True) both run so in every layer; where the measurement picks o's ("gather-listed") o does; the
    logits match the same engine's compaction path (the same selections: o's and down's shifts too); off, a
    "gather-listed" choice runs the gather walk with its own compaction pass."""
    from actsparse.engine.crossover import LISTED

    model = _hf_tiny(seed=11)
    roles = ("q", "k", "v", "o", "gate", "up", "down")
    th = {f"layers.{i}.{r}": 0.3 for i in range(TINY.n_layers) for r in roles}
    shifts = {f"layers.{i}.{r}": torch.randn(n) * 0.05 for i in range(TINY.n_layers)
              for r, n in (("o", TINY.n_heads * TINY.head_dim), ("down", TINY.intermediate_size))}
    seq = torch.randint(0, TINY.vocab_size, (1, 5))
    if how == "measured":
        inner_choose = Engine._choose
        monkeypatch.setattr(Engine, "_choose", lambda self, rule, op, b: LISTED if op == "o" else
                            inner_choose(self, rule, op, b))
    logits, calls = [], []
    for lists in ({"on": True, "measured": None, "off": False}[how], False):
        eng = Engine.from_hf(model, device=DEVICE, dtype=torch.float16, kernels="triton", max_batch=1,
                             max_seq_len=16, fallback_below=0.0, residual_fp32=True, producer_lists=lists)
        eng.set_thresholds(th, shifts=shifts)
        inner = eng.ops.gather_lists

        def spy(*args, _inner=inner, **kw):
            calls.append(lists)
            return _inner(*args, **kw)
        eng.ops.gather_lists = spy
        logits.append(_engine_logits(eng, seq, True))
    assert (logits[1] - logits[0]).norm() / logits[0].norm() < 1e-3
    n = TINY.n_layers * seq.shape[1]
    assert calls == {"on": [True] * 2 * n, "measured": [None] * n, "off": []}[how]
    ref = Engine.from_hf(model, kernels="torch", max_batch=1, max_seq_len=16)  # and both equal the torch path
    ref.set_thresholds(th, shifts=shifts)
    want = _engine_logits(ref, seq, True)
    assert (logits[0] - want).norm() / want.norm() < 3e-3


def test_lists_with_n_m_and_shift_rules_and_any_gqa_group():
    """o's and down's lists under N:M rules of |x − shift| (the selection subtracts the shift before it ranks),
    on a model whose kv head group is no power of two (6 heads over 2: lists of 3·16 = 48 channels), equal the
    torch path."""
    from actsparse.engine.plan import EnginePlan, SiteRule

    cfg = dataclasses.replace(TINY, n_heads=6, n_kv_heads=2, hidden_size=96, intermediate_size=128)
    tri = Engine.random(cfg, device=DEVICE, dtype=torch.float32, kernels="triton", max_batch=1, max_seq_len=16,
                        fallback_below=0.0, residual_fp32=True, producer_lists=True)
    ref = Engine.random(cfg, device=DEVICE, dtype=torch.float32, kernels="torch", max_batch=1, max_seq_len=16)
    calls = []
    inner = tri.ops.gather_lists
    tri.ops.gather_lists = lambda *a, **kw: (calls.append(1), inner(*a, **kw))[1]
    q = cfg.n_heads * cfg.head_dim
    names = {f"layers.{i}.{r}": 0.0 for i in range(cfg.n_layers) for r in ("q", "k", "v", "gate", "up")}
    shifts = {f"layers.{i}.{r}": torch.randn(n) * 0.05 for i in range(cfg.n_layers)
              for r, n in (("o", q), ("down", cfg.intermediate_size))}
    for eng in (tri, ref):
        plan = EnginePlan.from_names(cfg.n_layers, names)
        for i in range(cfg.n_layers):
            for r in ("o", "down"):
                plan.layers[i][r] = SiteRule(nm=(2, 4), shift=shifts[f"layers.{i}.{r}"])
        eng.set_plan(plan)
    seq = torch.randint(0, cfg.vocab_size, (1, 4))
    got, want = _engine_logits(tri, seq, True), _engine_logits(ref, seq, True)
    assert (got - want).norm() / want.norm() < 1e-3 and len(calls) == 2 * cfg.n_layers * 4
