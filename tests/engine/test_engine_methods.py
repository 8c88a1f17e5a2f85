"""Methods beyond thresholds in the decode engine: the engine's sparse logits equal the transformers model under
the same plan (torch backend), and a rule the kernels cannot run is refused with the reason."""
import dataclasses

import pytest
import torch

import actsparse as asp
from actsparse.engine import TINY, Engine
from actsparse.errors import ActsparseError
from actsparse.eval.speed import plan_to_engine
from actsparse.sparsifiers import SparsityPlan
from actsparse.sparsifiers.plan import Rule

from .test_engine import DEVICE, _engine_logits, _hf_tiny

SITES = ("q", "k", "v", "o", "gate", "up", "down")


def _nm_plan(model, n: int, m: int, mitigation: str = "none", roles=SITES, g=None) -> SparsityPlan:
    rules = {}
    for i in range(TINY.n_layers):
        for role in roles:
            point = f"layers.{i}.{role}"
            tensors, attrs = {}, {"n": n, "m": m, "mitigation": mitigation, "score": "magnitude"}
            if mitigation == "shift":   # a static η and the weight row sums its rank-1 term reads
                mod = dict(model.model.layers[i].named_modules())[
                    {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                     "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                     "down": "mlp.down_proj"}[role]]
                tensors = {"eta": torch.randn((), generator=g) * 0.05, "rowsum": mod.weight.detach().float().sum(1)}
            rules[point] = Rule(point, "nm", tensors, attrs=attrs, skips=[point], expected_sparsity=1 - n / m)
    return SparsityPlan("nm", {}, 1 - n / m, rules, {p: 1 for p in rules})


def _matches_torch_backend(model, plan: SparsityPlan, g: torch.Generator, batch: int = 2, steps: int = 4,
                           kernels: str = "triton", **engine_kw):
    """The engine (Triton kernels or the torch backend's, every op sparse) on `plan` against transformers under the
    same plan (torch backend): equal logits, which differ from the dense model's (the plan did something). Returns
    (eng, ep, seq, want)."""
    ep = plan_to_engine(plan, TINY.n_layers)
    eng = Engine.from_hf(model, device=DEVICE if kernels == "triton" else "cpu", kernels=kernels, max_batch=2,
                         max_seq_len=16, fallback_below=0.0, **engine_kw)
    eng.set_plan(ep)
    seq = torch.randint(0, TINY.vocab_size, (batch, steps), generator=g)
    got = _engine_logits(eng, seq, True)
    with torch.no_grad(), asp.sparsify(model, plan, backend="torch"):
        want = model(seq, use_cache=False).logits.float()
    with torch.no_grad():
        dense = model(seq, use_cache=False).logits.float()
    assert (got - want).norm() / want.norm() < 1e-4
    assert (dense - want).norm() / want.norm() > 1e-3
    return eng, ep, seq, want


@pytest.mark.parametrize("n,m,mitigation", [(2, 4, "none"), (4, 8, "shift")])
def test_an_nm_plan_runs_in_the_engine_as_in_the_torch_backend(n, m, mitigation):
    seed = int(torch.randint(0, 10_000, (1,)))
    g = torch.Generator().manual_seed(seed)
    model = _hf_tiny(seed=seed)
    _, ep, _, _ = _matches_torch_backend(model, _nm_plan(model, n, m, mitigation, g=g), g)
    assert all(s.nm == (n, m) for L in ep.layers for s in L.values())


def _one_rule(**attrs_and_tensors) -> SparsityPlan:
    tensors = attrs_and_tensors.pop("tensors", {})
    attrs = {"n": 2, "m": 4, "mitigation": "none", "score": "magnitude", **attrs_and_tensors}
    r = Rule("layers.0.down", "nm", tensors, attrs=attrs, skips=["layers.0.down"], expected_sparsity=0.5)
    return SparsityPlan("nm", {}, 0.5, {r.point: r}, {r.point: 1})


@pytest.mark.parametrize("plan, why", [
    (_one_rule(n=2048, m=4096), "groups of at most 32 channels"),
    (_one_rule(n=3, m=6), "groups of at most 32 channels"),
    (_one_rule(score="amber", tensors={"col_score": torch.ones(8)}), "use score='magnitude'"),
    (_one_rule(mitigation="variance"), "'variance' rescales each token"),
    (_one_rule(mitigation="shift", tensors={"rowsum": torch.ones(8)}), "with a per-token median"),
    (_one_rule(mitigation="learnable", tensors={"out_scale": torch.ones(8), "out_shift": torch.ones(8)}),
     "'learnable' rescales"),
])
def test_nm_rules_the_kernels_cannot_run_are_refused_with_the_reason(plan, why):
    with pytest.raises(ActsparseError, match=why):
        plan_to_engine(plan, TINY.n_layers)


def test_an_op_whose_sites_disagree_on_the_pattern_is_refused():
    model = _hf_tiny(seed=1)
    plan = _nm_plan(model, 2, 4, roles=("q", "v", "o"))      # k keeps every input: q|k|v is one launch
    eng = Engine.from_hf(model, device=DEVICE, kernels="torch", max_batch=1, max_seq_len=8)
    with pytest.raises(ValueError, match="N:M needs the same pattern on all of them"):
        eng.set_plan(plan_to_engine(plan, TINY.n_layers))


_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _rsparse_plan(model, g, roles=SITES) -> SparsityPlan:
    """R-Sparse rules with drawn factors: a scaled threshold (some channels' scale 0: always dropped), rank 3 on
    most sites, none on some."""
    rules = {}
    for i in range(TINY.n_layers):
        mods = dict(model.model.layers[i].named_modules())
        for j, role in enumerate(roles):
            w = mods[_MODULES[role]].weight
            n, k = w.shape
            scale = torch.rand(k, generator=g) + 0.5
            scale[torch.randperm(k, generator=g)[:2]] = 0.0
            t = {"thresh": torch.tensor(float(torch.rand((), generator=g)) * 0.5), "scale": scale}
            if (i + j) % 3:
                t["V"] = torch.randn(k, 3, generator=g) * 0.2
                t["US"] = torch.randn(n, 3, generator=g) * 0.2
            point = f"layers.{i}.{role}"
            rules[point] = Rule(point, "rsparse", t, attrs={"alpha": 0.5, "rank": 3, "search": "none"},
                                skips=[point], expected_sparsity=0.5, extra_params=0)
    return SparsityPlan("rsparse", {}, 0.5, rules, {p: 1 for p in rules})


@pytest.mark.parametrize("stream", ["model dtype", "fp32 raw sums"])
def test_an_rsparse_plan_runs_in_the_engine_as_in_the_torch_backend(stream, monkeypatch):
    """The engine's output stream in the model's dtype (each op's output, gate and up apart) or in fp32 (what a
    GPU runs: each op's raw sums or the stream, down's path from the pair's act(gate)·up): either way the low-rank
    path is added into them by `lowrank_add`."""
    from actsparse import kernels as k

    seed = int(torch.randint(0, 10_000, (1,)))
    g = torch.Generator().manual_seed(seed)
    model = _hf_tiny(seed=seed)
    plan = _rsparse_plan(model, g)
    calls, lowrank_add = [], k.lowrank_add
    monkeypatch.setattr(k, "lowrank_add", lambda *a, **kw: calls.append(kw.get("gated")) or lowrank_add(*a, **kw))
    _, ep, seq, want = _matches_torch_backend(model, plan, g, residual_fp32=stream == "fp32 raw sums")
    # fp32: every op with factors on a site adds its path in one call (down's from the pair's act(gate)·up)
    ops_with = sum(any(f"layers.{i}.{r}" in plan.rules and "V" in plan.rules[f"layers.{i}.{r}"].tensors
                       for r in roles) for i in range(TINY.n_layers)
                   for roles in (("q", "k", "v"), ("o",), ("gate", "up"), ("down",)))
    assert calls and len(calls) % ops_with == 0  # every op with factors, every step
    assert ("silu" in calls) == (stream == "fp32 raw sums")  # down's from the pair's sums on the fp32 stream
    assert sum(s.lowrank is not None for L in ep.layers for s in L.values()) == sum(
        "V" in r.tensors for r in plan.rules.values())
    # the low-rank path carries real signal: without it the engine leaves the torch backend's logits
    for L in ep.layers:
        for s in L.values():
            s.lowrank = None
    bare = Engine.from_hf(model, kernels="torch", max_batch=2, max_seq_len=16)
    bare.set_plan(ep)
    assert (_engine_logits(bare, seq, True) - want).norm() / want.norm() > 1e-3


def test_an_m_countdown_plan_runs_in_the_engine_as_in_the_torch_backend():
    """M-COUNTDOWN thresholds |up·x| and skips the gate rows and down columns it drops: the engine computes up,
    gathers the kept gate rows (activated) and skips the same rows of down."""
    seed = int(torch.randint(0, 10_000, (1,)))
    g = torch.Generator().manual_seed(seed)
    model = _hf_tiny(seed=seed)
    rules = {}
    for i in range(TINY.n_layers):
        point = f"layers.{i}.up_out"
        rules[point] = Rule(point, "threshold", {"thresh": torch.tensor(float(torch.rand((), generator=g)) * 0.3)},
                            skips=[f"layers.{i}.gate", f"layers.{i}.down"], expected_sparsity=0.5)
    plan = SparsityPlan("countdown", {}, 0.5, rules, {p: 1 for p in rules})
    # layouts="sparse": the gate rows' natural layout is made for the plan
    eng, ep, _, _ = _matches_torch_backend(model, plan, g, layouts="sparse")
    assert all(L["up_out"].thresh is not None and L["gate"].expected == 0.5 for L in ep.layers)
    both = plan_to_engine(plan, TINY.n_layers)
    both.site(0, "gate_act").thresh = 0.1
    with pytest.raises(ValueError, match="give one of them"):
        eng.set_plan(both)


def _topk_plan(model, frac: float, weighted=("k", "gate")) -> SparsityPlan:
    """Per-token Top-K on every site (WINA's selection=topk): n_zero = frac·C; the `weighted` sites score
    |x_i|·‖W_{:,i}‖₂ (WINA's column norms), the others |x|."""
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    rules = {}
    for i in range(TINY.n_layers):
        mods = dict(model.model.layers[i].named_modules())
        for role in SITES:
            point, w = f"layers.{i}.{role}", mods[names[role]].weight.detach().float()
            tensors = {"w": w.norm(dim=0)} if role in weighted else {}
            n_zero = int(round(frac * w.shape[1]))
            rules[point] = Rule(point, "topk_token", tensors, attrs={"n_zero": n_zero}, skips=[point],
                                expected_sparsity=n_zero / w.shape[1])
    return SparsityPlan("wina", {}, frac, rules, {p: 1 for p in rules})


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_a_per_token_topk_plan_runs_in_the_engine_as_in_the_torch_backend(kernels):
    """WINA's selection=topk (and LaRoSA's o and down rules): each token's level is found on the device before
    the op; the engine's logits equal transformers' under the same plan, step by step, at batch 1."""
    seed = int(torch.randint(0, 10_000, (1,)))
    g = torch.Generator().manual_seed(seed)
    model = _hf_tiny(seed=seed)
    eng, ep, _, _ = _matches_torch_backend(model, _topk_plan(model, 0.5), g, batch=1, steps=5, kernels=kernels)
    assert ep.layers[0]["k"].topk_w is not None and ep.layers[0]["q"].topk_w is None
    assert all(s.topk == int(round(0.5 * (TINY.intermediate_size if r == "down" else s_in)))
               for L in ep.layers for r, s in L.items()
               for s_in in [TINY.hidden_size if r != "o" else TINY.n_heads * TINY.head_dim])
    with pytest.raises(ValueError, match="a per-token Top-K plan decodes at batch 1"):
        _engine_logits(eng, torch.zeros(2, 1, dtype=torch.long), True)


def test_topk_rules_the_engine_cannot_run_are_refused_with_the_reason():
    from actsparse.engine.plan import EnginePlan, SiteRule
    from actsparse.engine.tensor_parallel import shard_plan
    from actsparse.eval.speed import decode_speed

    model = _hf_tiny(seed=5)
    eng = Engine.from_hf(model, kernels="torch", max_batch=1, max_seq_len=8)

    def plan(**roles):
        p = EnginePlan.empty(TINY.n_layers)
        p.layers[0].update(roles)
        return p
    d = TINY.hidden_size
    with pytest.raises(ValueError, match="needs a Top-K rule on each of them; k, v has none"):
        eng.set_plan(plan(q=SiteRule(topk=3)))
    with pytest.raises(ValueError, match="a per-token Top-K takes no shift"):
        eng.set_plan(plan(o=SiteRule(topk=3, shift=0.1)))
    with pytest.raises(ValueError, match=f"topk zeroes between 0 and {d} entries a token, got {d + 1}"):
        eng.set_plan(plan(gate=SiteRule(topk=d + 1), up=SiteRule(topk=1)))
    with pytest.raises(ValueError, match=rf"topk_w must be \[{d}\]"):
        eng.set_plan(plan(gate=SiteRule(topk=1, topk_w=torch.ones(3)), up=SiteRule(topk=1)))
    with pytest.raises(ValueError, match="CATS / COUNTDOWN choose the MLP's channels by a threshold"):
        eng.set_plan(plan(gate_act=SiteRule(thresh=0.1), down=SiteRule(topk=4)))
    with pytest.raises(ValueError, match="would rank each rank's channels alone"):
        shard_plan(plan(o=SiteRule(topk=3)), TINY, 0, 2)
    kept = shard_plan(plan(q=SiteRule(topk=3), k=SiteRule(topk=3), v=SiteRule(topk=3)), TINY, 1, 2)
    assert kept.layers[0]["q"].topk == 3
    with pytest.raises(ActsparseError, match="its decode speed is measured at batch 1"):
        decode_speed(model, _topk_plan(model, 0.5), batch=2)
    wide = Engine.random(dataclasses.replace(TINY, intermediate_size=16400, n_layers=1), device="cpu",
                         dtype=torch.float32, kernels="torch", max_batch=1, max_seq_len=4)
    one = EnginePlan.empty(1)
    one.layers[0]["down"] = SiteRule(topk=3)
    with pytest.raises(ValueError, match="at most 16384 channels; this input has 16400"):
        wide.set_plan(one)
