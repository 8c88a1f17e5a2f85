"""Mixture-of-experts decode (Mixtral, Qwen3-MoE, Qwen2-MoE's shared expert): the torch backend's greedy tokens equal
transformers' generate,
the expert-indexed kernels equal the torch backend dense and sparse, and what the engine does not model is refused."""

import pytest
import torch

from actsparse.engine import Engine, EnginePlan, SiteRule
from actsparse.engine.config import QWEN3_30B_A3B, LlamaConfig, unsupported_reason
from actsparse.engine.sharding import split_reason
from benchmarks.engine_thresholds import calibrate_thresholds, measure_sparsity
from tests.engine.test_engine import _engine_logits
from tests.families.models import make_family

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def _moe_model(family: str, layers: int = 2, seed: int = 0):
    """A tiny random MoE model (4 experts, top-2), norms, biases and routers away from their defaults so that a
    missing one shows and tokens route apart."""
    model = make_family(family, layers=layers, seed=seed).eval()
    model.generation_config.eos_token_id = None  # generate runs its full length, as the engine does
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):  # small: a large v bias is a constant direction that routes every token
                p.normal_(0.0, 0.1)
            elif name.endswith("mlp.gate.weight"):  # Qwen's routers start at zero: every token would tie
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_moe_decodes_as_transformers_step_by_step_and_greedy(family):
    """Router (softmax, top-k, renormalised or not), the routed experts summed in transformers' order, and the
    family's attention: logits equal transformers' at batch 2 (tokens routed apart), greedy tokens equal generate."""
    model = _moe_model(family)
    seq = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        want = model(seq).logits.float()
    eng = Engine.from_hf(model, kernels="torch", max_batch=2, max_seq_len=32)
    assert eng.cfg.n_experts == 4 and eng.cfg.top_k == 2
    assert torch.allclose(_engine_logits(eng, seq, sparse=False), want, atol=2e-5, rtol=1e-4)
    eng.decode(seq[:1, :3], 10)
    with torch.no_grad():
        assert torch.equal(eng.last_tokens.cpu(), model.generate(seq[:1, :3], max_new_tokens=10, do_sample=False))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_expert_kernels_equal_the_torch_path_dense_and_sparse(family):
    """The Triton engine runs the routed experts through the expert-indexed one-shot tiles: at threshold 0 they
    equal transformers; with thresholds they equal the torch backend's same plan (and differ from dense), with the
    fp32 stream taking down's sums in place and without it."""
    model = _moe_model(family, seed=1)
    seq = torch.randint(0, model.config.vocab_size, (2, 3))  # the interpreter takes seconds a step
    with torch.no_grad():
        want = model(seq).logits.float()
    tri = Engine.from_hf(model, device=DEVICE, kernels="triton", max_batch=2, max_seq_len=16, fallback_below=0.0)
    assert torch.allclose(_engine_logits(tri, seq, sparse=False), want, atol=1e-4, rtol=1e-3)
    ref = Engine.from_hf(model, kernels="torch", max_batch=2, max_seq_len=16)
    shared = ("shared_down",) if family == "qwen2_moe" else ()  # its gate and up read gate|up's input
    th = {f"layers.{i}.{r}": 0.4 for i in range(2) for r in ROLES + shared}
    ref.set_thresholds(th)
    sparse_ref = _engine_logits(ref, seq, sparse=True)
    assert (sparse_ref - want).norm() / want.norm() > 1e-2
    for fp32 in (False, True):
        tri = Engine.from_hf(model, device=DEVICE, kernels="triton", max_batch=2, max_seq_len=16, fallback_below=0.0,
                             residual_fp32=fp32)
        tri.set_thresholds(th)
        got = _engine_logits(tri, seq, sparse=True)
        assert (got - sparse_ref).norm() / sparse_ref.norm() < 1e-4


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_calibrated_thresholds_skip_the_target_in_every_expert_site(family):
    """calibrate_thresholds records the experts' inputs (gate|up: the normed state; down: every routed expert's
    act(gate)·up; Qwen2-MoE's shared expert's down on its own) and the measured skip follows the target."""
    eng = Engine.from_hf(_moe_model(family), kernels="torch", max_batch=1, max_seq_len=48)
    th = calibrate_thresholds(eng, 0.5, n_tokens=24)
    shared = ("shared_down",) if family == "qwen2_moe" else ()
    assert set(th) == {f"layers.{i}.{r}" for i in range(2) for r in ROLES + shared}
    got = measure_sparsity(eng, n_tokens=16)
    for role in ("gate", "up", "down", "q", "o") + shared:
        assert 0.35 < got[role] < 0.65, (role, got[role])
    assert 0.35 < got["union"] < 0.65
    eng.decode(None, 4, prompt_len=4)  # sparse decode through the step the graph would capture


def test_random_moe_weights_keep_the_experts_stacked_in_the_sparse_layout():
    """The benchmark's random weights: experts stacked [E, K, N] whatever the layouts, a shared expert as a stack
    of one; the Triton engine's dense and sparse steps on them equal the torch backend's."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=0, n_layers=2, n_heads=2, n_kv_heads=1,
                      head_dim=16, qk_norm=True, n_experts=6, top_k=3, moe_intermediate_size=24, norm_topk_prob=True,
                      router="qwen", shared_expert_intermediate_size=40)
    # Drawn on the device the Triton engine runs on: a device's generator draws other numbers than the CPU's.
    eng = Engine.random(cfg, device=DEVICE, dtype=torch.float32, kernels="torch", layouts="dense", max_seq_len=16)
    lw = eng.w.layers[0]
    assert lw.weg_t.shape == lw.weu_t.shape == (6, 32, 24) and lw.wed_t.shape == (6, 24, 32)
    assert lw.wsg_t.shape == (1, 32, 40) and lw.wsd_t.shape == (1, 40, 32) and lw.shared_gate.shape == (1, 32)
    assert lw.router.shape == (6, 32) and lw.w13 is None and lw.wg_t is None
    tri = Engine.random(cfg, device=DEVICE, dtype=torch.float32, kernels="triton", layouts="sparse", max_seq_len=16,
                        fallback_below=0.0)
    seq = torch.randint(0, 64, (1, 4))
    assert torch.allclose(_engine_logits(tri, seq, False), _engine_logits(eng, seq, False), atol=1e-4, rtol=1e-3)
    eng = Engine.random(cfg, device=DEVICE, dtype=torch.float32, kernels="torch", max_seq_len=16)  # + attention's
    # sparse layout, the same draws
    th = {f"layers.{i}.{r}": 0.3 for i in range(2) for r in ROLES + ("shared_down",)}
    eng.set_thresholds(th)
    tri.set_thresholds(th)
    assert torch.allclose(_engine_logits(tri, seq, True), _engine_logits(eng, seq, True), atol=1e-4, rtol=1e-3)
    eng.decode(None, 3, prompt_len=2)
    assert eng.last_tokens.shape == (1, 5)


def test_what_the_moe_engine_does_not_model_is_refused():
    q3 = _moe_model("qwen3_moe")
    q3.config.mlp_only_layers = [1]
    assert "has dense MLP layers (mlp_only_layers=[1]" in unsupported_reason(q3.config)
    q3.config.mlp_only_layers, q3.config.decoder_sparse_step = [], 2
    with pytest.raises(ValueError, match="experts in every layer; this qwen3_moe model has dense MLP layers"):
        Engine.from_hf(q3, kernels="torch")
    q2 = make_family("qwen2_moe", layers=1)
    q2.config.decoder_sparse_step = 2
    assert "this qwen2_moe model has dense MLP layers" in unsupported_reason(q2.config)
    eng = Engine.from_hf(_moe_model("mixtral"), kernels="torch", max_seq_len=16)
    with pytest.raises(ValueError, match=r"layers.0: the engine's experts select by a threshold \(or a per-layer N:M "
                                         r"pattern\); down asks for a shift"):
        eng.set_thresholds({"layers.0.down": 0.1}, shifts={"layers.0.down": torch.zeros(32)})
    with pytest.raises(ValueError, match="gate_act asks for"):
        eng.set_thresholds({"layers.1.gate_act": 0.1})
    with pytest.raises(ValueError, match=r"layers.0: shared_gate/shared_up/shared_down are a shared expert's sites "
                                         r"\(Qwen2-MoE\); this layer has none"):
        eng.set_thresholds({"layers.0.shared_down": 0.1})
    with pytest.raises(ValueError, match="layers.1: expert4.up names an expert past the layer's 4"):
        eng.set_thresholds({"layers.1.expert4.up": 0.1})
    with pytest.raises(ValueError, match="a per-expert N:M pattern"):
        eng.set_plan(EnginePlan([{"expert0.gate": SiteRule(nm=(2, 4))}, {}]))
    dense = Engine.from_hf(make_family("llama", layers=1), kernels="torch", max_seq_len=16)
    with pytest.raises(ValueError, match="layers.0: expert1.down are sites of a mixture-of-experts layer; this "
                                         "layer's MLP is dense"):
        dense.set_thresholds({"layers.0.expert1.down": 0.1})
    with pytest.raises(ValueError, match="CATS's gathered up rows are not built for mixture-of-experts layers"):
        calibrate_thresholds(eng, 0.5, method="cats")
    assert "decode a mixture-of-experts model with Engine on one GPU" in split_reason(QWEN3_30B_A3B, 2)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_a_fitted_teal_plan_with_per_expert_sites_decodes_as_the_torch_backend_masks(family):
    """TEAL fitted on the transformers model has a threshold per expert site (layers.i.expert{e}.gate/up/down,
    Qwen2-MoE's shared_expert.*): plan_to_engine keeps them per expert, and the engine's sparse logits equal the
    model's under the same plan in the torch backend; the expert kernels equal the torch engine."""
    import actsparse as asp
    from actsparse.eval.speed import plan_to_engine
    from tests.families.test_methods import _IdTok

    model = _moe_model(family)
    ids = torch.randint(1, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    data = asp.TextData(f"ids-moe-{family}", tuple(" ".join(map(str, r.tolist())) for r in ids))
    stats = asp.calibrate(model, _IdTok(), data=data, tokens=256, seq_len=64, sample_size=4096, progress=False)
    plan = asp.fit("teal", stats, sparsity=0.5, model=model)
    ep = plan_to_engine(plan, n_layers=2)
    assert "expert3.down" in ep.layers[1] and ("shared_down" in ep.layers[0]) == (family == "qwen2_moe")
    seq = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad(), asp.sparsify(model, plan, backend="torch"):
        want = model(seq, use_cache=False).logits.float()
    ref = Engine.from_hf(model, kernels="torch", max_batch=1, max_seq_len=16)
    ref.set_plan(ep)
    got = _engine_logits(ref, seq, sparse=True)
    assert (got - want).norm() / want.norm() < 1e-4
    tri = Engine.from_hf(model, device=DEVICE, kernels="triton", max_batch=1, max_seq_len=16, fallback_below=0.0)
    tri.set_plan(ep)
    assert (_engine_logits(tri, seq, sparse=True) - got).norm() / got.norm() < 1e-4


def test_routed_experts_on_the_gather_walk_equal_the_torch_path(monkeypatch):
    """Where the measurement picks the gather walk for the routed experts (batch 1), gate|up and down run on it
    (dense: at threshold 0; sparse: the layer's rule), and the logits equal the torch backend's; the measurement
    itself times both kernels for both ops (clock stubbed: CUDA graphs need a GPU)."""
    from actsparse.engine import crossover

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=0, n_layers=2, n_heads=2, n_kv_heads=1,
                      head_dim=16, n_experts=6, top_k=3, moe_intermediate_size=32, norm_topk_prob=True,
                      router="qwen")
    ref_eng = Engine.random(cfg, device=DEVICE, dtype=torch.float32, kernels="torch", max_seq_len=16)
    tri = Engine.random(cfg, device=DEVICE, dtype=torch.float32, kernels="triton", layouts="sparse", max_seq_len=16,
                        fallback_below=0.0, residual_fp32=True)
    monkeypatch.setattr(Engine, "_experts_kernel", lambda self, op, rule, b: "gather")
    impls = []
    for name in ("sparse_gemv", "sparse_gated_mlp"):
        inner = getattr(tri.ops, name)

        def spy(*args, _inner=inner, **kw):
            if kw.get("experts") is not None:
                impls.append(kw.get("impl"))
            return _inner(*args, **kw)
        setattr(tri.ops, name, spy)
    seq = torch.randint(0, 64, (1, 4))
    assert torch.allclose(_engine_logits(tri, seq, False), _engine_logits(ref_eng, seq, False), atol=1e-4, rtol=1e-3)
    th = {f"layers.{i}.{r}": 0.3 for i in range(2) for r in ROLES}
    ref_eng.set_thresholds(th)
    tri.set_thresholds(th)
    assert torch.allclose(_engine_logits(tri, seq, True), _engine_logits(ref_eng, seq, True), atol=1e-4, rtol=1e-3)
    assert impls and set(impls) == {"gather"} and len(impls) == 2 * 2 * 4 * 2  # 2 ops, 2 layers, 4 steps, 2 runs
    monkeypatch.setattr(crossover, "graph_ms", lambda fn, reps=5, warmup=1: (fn(), 1.0)[-1])
    monkeypatch.setattr(crossover, "LEVELS", (0.0, 0.5))  # every launch, at two levels (the interpreter is slow)
    out = crossover.measure(tri, 1)
    assert set(out["experts_gu"].kernel_ms) == set(out["experts_down"].kernel_ms) == {"oneshot", "gather"}
    assert out["experts_gu"].choice(0.5) in {"oneshot", "gather"}  # never "dense": there is no dense rival
