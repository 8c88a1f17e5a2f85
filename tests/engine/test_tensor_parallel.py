"""The tensor-parallel engine decodes what the single-GPU engine decodes: at world size 2 (two gloo processes on
the CPU; on a machine with two GPUs, two NCCL ranks, one per GPU) its greedy tokens equal world size 1's and the
`Engine`'s on the same random weights, and its logits (the ranks' vocabulary slices side by side) equal theirs,
dense and sparse (TEAL-like per-channel thresholds, a SCAP shift on every site, a CATS plan), for a Llama-shaped
and a Gemma-2-shaped model; what cannot be split is refused with the reason."""

from dataclasses import replace
from typing import Optional

import pytest
import torch

from actsparse.engine import TINY, Engine, EnginePlan
from actsparse.engine.launch import run_ranks
from actsparse.engine.tensor_parallel import TPEngine, shard_config, shard_plan, shard_weights, split_reason
from actsparse.engine.weights import random_weights
from actsparse.kernels import interpreted

# Odd vocabularies: the ranks' slices differ in size (66 and 65).
LLAMA = replace(TINY, vocab_size=131)
GEMMA2 = replace(TINY, vocab_size=131, act="gelu_tanh", norm_f32=True, sandwich_norms=True, embed_scale=8.0,
                 attn_scale=24**-0.5, attn_softcap=2.0, final_softcap=3.0, sliding_window=3,
                 local_layers=(True, False), tie_embeddings=True)
CONFIGS = {"llama": LLAMA, "gemma2": GEMMA2}
PLANS = ("dense", "teal", "scap", "cats")
PROMPT, NEW = 5, 6  # the prompt runs past Gemma's window of 3
# (config, plan, kernels): the torch references for every case, and the Triton kernels (interpreter: slow, so
# once, checked against the torch references' single-GPU engine)
CASES = [(c, p, "torch") for c in CONFIGS for p in PLANS] + [("llama", "scap", "triton")]
# The gloo ranks' cases: the Triton ones only where Triton's interpreter runs them on CPU tensors (actsparse.kernels
# turns it on without CUDA); with CUDA present they are compiled, take CUDA tensors only, and the NCCL test runs
# them on the GPUs.
GLOO_CASES = [c for c in CASES if c[2] == "torch" or interpreted()]
NO_CPU_TRITON = ("Triton's interpreter is off (CUDA present): its compiled kernels take no CPU tensors; the NCCL "
                 "test runs them on the GPUs")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: NCCL runs each rank on a "
                                                                    "GPU of its own and refuses two on one GPU")


def _plan(cfg, kind: str):
    """A whole-model plan: per-channel thresholds (and SCAP shifts) on every site, or CATS's gate_act; None: dense."""
    if kind == "dense":
        return None
    g = torch.Generator().manual_seed(len(kind))
    d, q, inter = cfg.hidden_size, cfg.q_size, cfg.intermediate_size
    width = {"q": d, "k": d, "v": d, "o": q, "gate": d, "up": d, "down": inter}
    plan = EnginePlan.empty(cfg.n_layers)
    for i in range(cfg.n_layers):
        if kind == "cats":
            plan.site(i, "gate_act").thresh = torch.rand(inter, generator=g) * 0.3
            for r in ("up", "down"):
                plan.site(i, r).expected = 0.5
            continue
        for r, k in width.items():
            scale = 0.3 if r == "down" else 1.0  # h = act(gate)·up is smaller than the normed stream
            site = plan.site(i, r)
            site.thresh = torch.rand(k, generator=g) * scale * (0.4 if kind == "scap" else 1.0)
            if kind == "scap":
                site.shift = torch.randn(k, generator=g) * 0.1 * scale
    return plan


def _short(case, device) -> bool:
    """Whether a case runs the Triton interpreter (seconds a step): then batch 1, 2 prompt and 2 new tokens."""
    return case[2] == "triton" and torch.device(device).type == "cpu"


def _case(name: str, plan_kind: str, kernels: str, rank: int, world: int, device="cpu", short: bool = False,
          dtype=torch.float32, graphs: bool = True):
    """(engine, prompt) of one case: the whole model's random weights (seeded), sharded to rank; world 0: the
    single-GPU Engine; graphs=False: decode steps run eagerly (gloo's collectives cannot be captured)."""
    cfg = CONFIGS[name]
    whole = random_weights(cfg, torch.device("cpu"), dtype, seed=7)
    kw = dict(kernels=kernels, max_batch=2, max_seq_len=PROMPT + NEW, fallback_below=0.0, use_graphs=graphs)
    eng = (Engine(cfg, shard_weights(whole, cfg, 0, 1, device), **kw) if world == 0 else
           TPEngine.from_weights(cfg, whole, rank, world, device=device, **kw))
    plan = _plan(cfg, plan_kind)
    if plan is not None:
        eng.set_plan(plan)
    prompt = torch.randint(0, cfg.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    return eng, (prompt[:1, :2] if short else prompt)


@torch.no_grad()
def _run(eng, prompt, short: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(greedy tokens [B, T + n], step-by-step logits [T, B, V_rank] of the prompt [B, T]), on the CPU; short:
    only the tokens, 2 of them."""
    eng.decode(prompt, 2 if short else NEW)
    if short:
        return eng.last_tokens.cpu(), None
    pos = torch.zeros(prompt.shape[0], dtype=torch.int32, device=eng.device)
    logits = []
    for t in range(prompt.shape[1]):
        logits.append(eng.forward_step(prompt[:, t].to(eng.device), pos).float().cpu())
        pos += 1
    return eng.last_tokens.cpu(), torch.stack(logits)


def _rank_cases(rank: int, world: int, cases, device=None, graphs: bool = True) -> dict:
    """On each rank: every case's tokens and logit slice (run by `run_ranks`), and "device": where its engines ran."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    for case in cases:
        short = _short(case, device)
        eng, prompt = _case(*case, rank, world, device, short, graphs=graphs)
        out[case] = _run(eng, prompt, short)
        out["device"] = str(eng.device)
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """Every case of GLOO_CASES at world size 2: two gloo processes (spawned once for the module)."""
    return run_ranks(_rank_cases, 2, GLOO_CASES, "cpu", backend="gloo")


def _check(case, got: list, atol: float = 1e-4, device="cpu") -> None:
    """Ranks agree on the tokens, equal to world size 1's and the Engine's; the ranks' logit slices side by side
    equal the Engine's whole logits. On the CPU the Engine runs the torch references."""
    short = _short(case, device)
    ref = case if device != "cpu" else (*case[:2], "torch")
    want_tok, want_logits = _run(*_case(*ref, 0, 0, device, short), short)  # weights drawn on the CPU
    if ref == case:
        one_tok, one_logits = _run(*_case(*case, 0, 1, device, short), short)
        assert torch.equal(one_tok, want_tok)
        if device == "cpu":
            assert torch.equal(one_logits, want_logits)
        elif one_logits is not None:  # the GPU's split-K tiles add with atomics: their order varies run to run
            assert torch.allclose(one_logits, want_logits, atol=atol, rtol=1e-4)
    for tok, _ in got:
        assert torch.equal(tok, want_tok), (case, tok, want_tok)
    if want_logits is None:
        return
    logits = torch.cat([lg for _, lg in got], dim=-1)
    assert logits.shape == want_logits.shape
    assert torch.allclose(logits, want_logits, atol=atol, rtol=1e-4), (case, (logits - want_logits).abs().max())


@pytest.mark.parametrize("case", [pytest.param(c, id="-".join(c), marks=pytest.mark.skipif(
    c not in GLOO_CASES, reason=NO_CPU_TRITON)) for c in CASES])
def test_world_size_2_decodes_the_single_gpu_engines_tokens(case, two_ranks):
    _check(case, [r[case] for r in two_ranks])


def test_the_plans_remove_something_and_the_shift_is_counted_once():
    """The sparse plans change the logits (they are not the dense path in disguise); SCAP's shift at threshold 0
    gives back the dense logits at world size 1 (W·m folded into a bias, on o and down from the shard's rows)."""
    dense = _run(*_case("llama", "dense", "torch", 0, 1))[1]
    for kind in ("teal", "scap", "cats"):
        assert (_run(*_case("llama", kind, "torch", 0, 1))[1] - dense).abs().max() > 1e-2, kind
    eng, prompt = _case("llama", "scap", "torch", 0, 1)
    plan = _plan(LLAMA, "scap")
    for L in plan.layers:
        for s in L.values():
            s.thresh = 0.0
    eng.set_plan(plan)
    assert torch.allclose(_run(eng, prompt)[1], dense, atol=1e-5)


def test_shard_plan_slices_the_row_split_sites_by_rank():
    plan = _plan(LLAMA, "scap")
    s = shard_config(LLAMA, 2)
    for rank in (0, 1):
        part = shard_plan(plan, LLAMA, rank, 2).layers[1]
        whole = plan.layers[1]
        assert torch.equal(part["q"].thresh, whole["q"].thresh)  # q|k|v, gate/up read the replicated x
        assert torch.equal(part["o"].shift, whole["o"].shift[rank * s.q_size:(rank + 1) * s.q_size])
        n = s.intermediate_size
        assert torch.equal(part["down"].thresh, whole["down"].thresh[rank * n:(rank + 1) * n])
    bad = EnginePlan.empty(LLAMA.n_layers)
    bad.site(0, "o").thresh = torch.ones(5)
    with pytest.raises(ValueError, match=r"layers.0.o: expected a scalar or a per-channel \[64\] tensor"):
        shard_plan(bad, LLAMA, 0, 2)


def test_shards_are_the_same_from_either_layout_and_tile_the_whole_model():
    """A shard cut from the transposed (sparse) layout equals one cut from nn.Linear's; rank 0's and rank 1's o and
    down rows, and their LM-head slices, put back together are the whole model's."""
    both = random_weights(GEMMA2, torch.device("cpu"), torch.float32, seed=3, layouts="both")
    only_t = random_weights(GEMMA2, torch.device("cpu"), torch.float32, seed=3, layouts="sparse")
    shards = [shard_weights(both, GEMMA2, r, 2, layouts="both") for r in (0, 1)]
    from_t = shard_weights(only_t, GEMMA2, 1, 2, layouts="both")
    for name in ("wqkv", "wo", "w13", "wd", "wqkv_t", "wu"):
        assert torch.equal(getattr(from_t.layers[0], name), getattr(shards[1].layers[0], name)), name
    assert torch.equal(torch.cat([s.layers[1].wo_t for s in shards]), both.layers[1].wo_t)
    assert torch.equal(torch.cat([s.layers[1].wd_t for s in shards]), both.layers[1].wd_t)
    assert torch.equal(torch.cat([s.lm_head for s in shards]), both.lm_head)
    assert shards[0].lm_head.data_ptr() == shards[0].embed.data_ptr()  # tied: a view of the embedding, no copy


def test_splits_it_cannot_make_are_refused_with_the_reason():
    assert split_reason(LLAMA, 2) is None and shard_config(LLAMA, 2).n_kv_heads == 1
    with pytest.raises(ValueError, match="world_size 4 does not divide the model's 2 kv heads; use a divisor of 2"):
        shard_config(LLAMA, 4)
    with pytest.raises(ValueError, match="world_size 2 does not divide intermediate_size 161"):
        shard_config(replace(LLAMA, intermediate_size=161), 2)
    with pytest.raises(ValueError, match="at least 1"):
        shard_config(LLAMA, 0)
    whole = random_weights(LLAMA, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        TPEngine.from_weights(LLAMA, whole, 2, 2, kernels="torch")
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        TPEngine.from_weights(LLAMA, whole, 0, 2, kernels="torch")


def test_from_hf_shards_a_transformers_model_and_decodes_its_tokens():
    """World size 1 from a transformers Llama on the CPU: the shard goes to the current GPU where there is one (else
    stays on the CPU), and its greedy tokens equal `generate`'s."""
    from .test_engine import _hf_tiny

    model = _hf_tiny(seed=2)
    eng = TPEngine.from_hf(model, 0, 1, kernels="torch", max_seq_len=16)
    cuda = torch.cuda.is_available()
    assert eng.device == (torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    prompt = torch.randint(0, TINY.vocab_size, (1, 4))
    eng.decode(prompt, 5)
    with torch.no_grad():
        assert torch.equal(eng.last_tokens.cpu(), model.generate(prompt, max_new_tokens=5, do_sample=False))
    with pytest.raises(ValueError, match="does not divide the model's 2 kv heads"):
        TPEngine.from_hf(model, 0, 3, kernels="torch")


def test_a_rotated_plan_is_refused_with_the_reason():
    eng, _ = _case("llama", "teal", "torch", 0, 1)
    plan = EnginePlan.empty(TINY.n_layers)
    plan.rotations[(0, "attn")] = (torch.eye(TINY.hidden_size), torch.ones(TINY.hidden_size))
    with pytest.raises(ValueError, match="does not fold a rotated residual stream"):
        eng.set_plan(plan)


def test_comm_share_at_world_size_1_is_zero():
    eng, _ = _case("llama", "teal", "torch", 0, 1)
    got = eng.comm_share(4, prompt_len=2)
    assert got["comm_share"] == 0.0 and got["tok_s"] > 0 and got["step_ms"] > 0


def test_nccl_ranks_need_a_gpu_each():
    """run_ranks puts NCCL rank r on GPU r: more ranks than GPUs are refused before any process starts."""
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"world_size {n + 1} needs {n + 1} GPUs, {n} present; use .*backend='gloo'"):
        run_ranks(_comm_share_rank, n + 1, backend="nccl")


@pytest.mark.gpu
@two_gpus
def test_two_nccl_ranks_on_two_gpus_decode_the_single_gpu_engines_tokens():
    """On two GPUs: NCCL rank r on cuda:r, the Triton kernels, CUDA graphs (all-reduces captured), fp32; the
    single-GPU engine runs on cuda:0."""
    cases = [("llama", "dense", "triton"), ("llama", "teal", "triton"), ("gemma2", "scap", "triton"),
             ("llama", "cats", "triton")]
    got = run_ranks(_rank_cases, 2, cases, backend="nccl")
    assert [r["device"] for r in got] == ["cuda:0", "cuda:1"]
    for case in cases:
        _check(case, [r[case] for r in got], atol=1e-3, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_gloo_ranks_on_one_gpu_run_the_compiled_kernels_to_the_single_gpu_engines_tokens():
    """World size 2 on one GPU: two gloo processes both on cuda:0 (NCCL refuses two ranks on one GPU), the Triton
    kernels compiled, decode steps eager (gloo's all-reduce cannot be captured into a CUDA graph): the
    arithmetic of the split checked on the GPU machine whatever its GPU count."""
    cases = [("llama", "dense", "triton"), ("llama", "teal", "triton"), ("gemma2", "scap", "triton"),
             ("llama", "cats", "triton")]
    got = run_ranks(_rank_cases, 2, cases, "cuda:0", False, backend="gloo")
    assert [r["device"] for r in got] == ["cuda:0", "cuda:0"]
    for case in cases:
        _check(case, [r[case] for r in got], atol=1e-3, device="cuda")


def _comm_share_rank(rank: int, world: int) -> dict:
    eng = TPEngine.random(LLAMA, rank, world, device="cuda", dtype=torch.bfloat16, kernels="triton",
                          fallback_below=0.0)
    return {**eng.comm_share(8), "device": str(eng.device)}


@pytest.mark.gpu
@two_gpus
def test_comm_share_is_measured_over_nccl():
    got = run_ranks(_comm_share_rank, 2, backend="nccl")
    assert [r["device"] for r in got] == ["cuda:0", "cuda:1"]
    for r in got:
        assert 0.0 <= r["comm_share"] < 1.0 and r["step_ms"] >= r["step_ms_no_comm"] * 0.5
