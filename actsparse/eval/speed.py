"""Decode speed of a plan: the same model decoded dense (cuBLAS) and sparse (Triton kernels), side by side.

This is the `triton` backend of DESIGN.md: a plan fitted on a transformers model is translated to
the decode engine's per-site thresholds (actsparse.engine). Rules the kernels implement: `threshold`
rules on site inputs q k v o gate up down (TEAL; with a per-channel shift and folded bias, SCAP), and
on `layers.{i}.gate_act` (CATS) and `layers.{i}.up_out` (M-COUNTDOWN); a per-channel threshold [C] runs as is (WINA's t / ||W_{:,i}||);
a mixture of experts' per-expert sites `expert{e}.gate/up/down` as a row set per expert, its shared expert's as
`shared_gate/up/down`;
`nm` rules as the kernels' N:M selection (no mitigation, or a static shift); `rsparse` rules as a
per-channel threshold τ/|c| plus the low-rank path U·S·Vᵀ on the dropped inputs (two small GEMVs).
Other rule kinds raise, naming what is supported (Top-K rules, LaRoSA's included: no kernel selects
per token).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..errors import ActsparseError
from ..models.sites import find_blocks
from ..sparsifiers.plan import SparsityPlan
from ..sparsifiers.rotation import ROTATED, group_of

if TYPE_CHECKING:
    from ..engine.plan import EnginePlan



def speed_unavailable_reason(model) -> str | None:
    """Why decode speed cannot be measured for this model here (None when it can)."""
    if not torch.cuda.is_available():
        return "decode speed needs a CUDA GPU (the Triton kernels do not time meaningfully on CPU)"
    from ..engine.config import unsupported_reason

    if not type(model).__name__.endswith("ForCausalLM"):
        return f"the decode engine decodes causal LMs; this model is {type(model).__name__}"
    from ..models.split import is_split

    if is_split(model):
        return (f"the decode engine runs on one GPU, and this model is split over "
                f"{len(set(model.actsparse_split.values()))} devices; the sweep does not run the tensor-parallel "
                "engine yet: measure it with actsparse.engine.tensor_parallel.TPEngine or benchmarks/bench_tp.py")
    return unsupported_reason(model.config)


SHARED_SITES = {f"shared_expert.{r}": f"shared_{r}" for r in ("gate", "up", "down")}  # site role -> engine role


def plan_to_engine(plan: SparsityPlan, n_layers: int | None = None) -> "EnginePlan":
    """Return the engine's typed plan (thresholds, shifts, expected skips per layer and role) for a fitted plan.

    n_layers defaults to one past the highest layer the plan names.
    """
    from ..engine.plan import EXPERT_ROLE, ROLES, EnginePlan

    where = {}  # point -> (layer, the engine roles it sets): a fused q|k|v input (Phi-3's qkv_proj) sets all three
    for point in [*plan.rules, *(s for r in plan.rules.values() for s in r.skips)]:
        layer, _, role = point.removeprefix("layers.").partition(".")
        # a mixture of experts: each routed expert's sites as they are, Qwen2-MoE's shared expert's as shared_*
        role = SHARED_SITES.get(role, role)
        if not layer.isdigit() or (role not in ROLES and role != "qkv" and not EXPERT_ROLE.match(role)):
            rule = plan.rules.get(point)
            kind = rule.kind if rule is not None else "threshold"
            raise ActsparseError(f"the triton backend runs threshold rules on {', '.join(ROLES)}, qkv and a mixture "
                                 f"of experts' expert{{e}}.gate/up/down and shared_expert.gate/up/down; plan "
                                 f"{plan.method!r} has a {kind!r} rule at {point}")
        where[point] = (int(layer), ("q", "k", "v") if role == "qkv" else (role,))
    out = EnginePlan.empty(n_layers if n_layers is not None else 1 + max((i for i, _ in where.values()), default=-1))
    for point, rule in plan.rules.items():
        nm = lowrank = topk = None
        if rule.kind in ("rotated_topk", "rotated_threshold"):
            # the stream is kept rotated (engine/rotation.py): the rule selects on the input the op reads
            layer, roles = where[point]
            if not set(roles) <= set(ROTATED):
                raise ActsparseError(f"plan {plan.method!r}: a {rule.kind!r} rule at {point}; the engine rotates the "
                                     f"inputs of {', '.join(ROTATED)} only")
            key, q = (layer, group_of(roles[0])), rule.tensors["Q"].float()
            seen = out.rotations.setdefault(key, (q, rule.tensors["g"].float()))
            if not torch.equal(seen[0], q):
                raise ActsparseError(f"plan {plan.method!r}: {point} rotates by another basis than the other "
                                     f"readers of layer {layer}'s {key[1]} input; the engine keeps one per input")
            if rule.kind == "rotated_topk":
                t, m, topk = torch.zeros(()), None, int(rule.attrs["n_zero"])
            else:
                t, m = rule.tensors["thresh"].float(), None
        elif rule.kind == "topk_token":   # each token's level found on the device before the op (batch 1)
            t, m, topk = torch.zeros(()), None, int(rule.attrs["n_zero"])
        elif rule.kind == "nm":
            nm, m = _nm_pattern(plan.method, point, rule)
            t = torch.zeros(())
        elif rule.kind == "rsparse":
            # keep |x·c| > τ  ⇔  |x| > τ / |c| per channel (a zero c keeps nothing); U·S·Vᵀ on the rest
            t, m = rule.tensors["thresh"].float(), None
            if "scale" in rule.tensors:
                c = rule.tensors["scale"].float().abs()
                t = torch.where(c > 0, t / c.clamp_min(1e-30), torch.full_like(c, math.inf))
            if "V" in rule.tensors:
                lowrank = (rule.tensors["V"].float(), rule.tensors["US"].float())
        elif rule.kind != "threshold":
            raise ActsparseError(f"the triton backend runs threshold, per-token Top-K, N:M and R-Sparse rules on "
                                 f"{', '.join(ROLES)}; "
                                 f"plan {plan.method!r} has a {rule.kind!r} rule at {point}")
        else:
            t = rule.tensors["thresh"].float()
            m = rule.tensors["shift"].float() if "shift" in rule.tensors else None
        layer, roles = where[point]
        if m is not None and m.dim() > 1:
            raise ActsparseError(f"{point}: the kernels take a scalar or per-channel shift; got shape {tuple(m.shape)}")
        for role in roles:
            site = out.site(layer, role)
            site.thresh = float(t) if t.dim() == 0 else t
            if m is not None:
                site.shift = float(m) if m.dim() == 0 else m  # the engine spreads a scalar (SCAP's mode) over K
            site.nm = nm
            if topk is not None:
                site.topk = topk
                w = rule.tensors.get("w")
                site.topk_w = None if w is None else w.float()
            if lowrank is not None:
                if len(roles) > 1:
                    raise ActsparseError(f"{point}: a low-rank path on a fused q|k|v input needs each of q, k, v's "
                                         "own factors; this plan has one for the fused projection")
                site.lowrank = lowrank
        for skipped in rule.skips or [point]:
            for role in where[skipped][1]:
                out.site(where[skipped][0], role).expected = rule.expected_sparsity
    # a rotated input is every reader's: a plain rule there would select on the rotated input as if it were x
    for point, rule in plan.rules.items():
        layer, roles = where[point]
        plain = rule.kind not in ("rotated_topk", "rotated_threshold")
        if plain and any(r in ROTATED and (layer, group_of(r)) in out.rotations for r in roles):
            raise ActsparseError(f"plan {plan.method!r}: {point} has a {rule.kind!r} rule on an input the plan rotates "
                                 f"(layer {layer}'s {group_of(roles[0])} input); the engine rotates every reader of it")
    return out


NM_MAX_M = 32   # the kernels rank each group of M channels inside one K tile


def _nm_pattern(method: str, point: str, rule) -> tuple[tuple[int, int], "torch.Tensor | None"]:
    """((N, M), shift or None) of an N:M rule the kernels run as published; refuse the variants they cannot."""
    n, m = rule.attrs["n"], rule.attrs["m"]
    mit = rule.attrs.get("mitigation", "none")
    where = f"plan {method!r}, {point}"
    if m > NM_MAX_M or m & (m - 1):
        raise ActsparseError(f"{where}: the kernels select N:M within groups of at most {NM_MAX_M} channels (M a "
                             f"power of two), and this rule keeps {n} of {m} (an unstructured per-token Top-K "
                             "needs a sort of the whole input per token, which the kernels do not do)")
    if "col_score" in rule.tensors:
        raise ActsparseError(f"{where}: the kernels rank channels by |x|; score={rule.attrs.get('score')!r} "
                             "weights the ranks by the weight columns, so use score='magnitude'")
    if mit == "none":
        return (n, m), None
    if mit == "shift" and "eta" in rule.tensors:      # x − η ranked and kept, W·η folded into a bias
        return (n, m), rule.tensors["eta"].float()
    raise ActsparseError(f"{where}: the kernels run N:M with mitigation 'none' or a static shift "
                         f"(shift_eta='static'); {mit!r}"
                         f"{' with a per-token median' if mit == 'shift' else ''} rescales each token or output, "
                         "which they do not")


@torch.no_grad()
def decode_speed(model, plan: SparsityPlan, n_tokens: int = 128, batch: int = 1, prompt_len: int = 16,
                 repeats: int = 3) -> dict[str, float]:
    """Return decode/tok_s, decode/tok_s_dense, decode/speedup and kernel/us_per_layer for `plan` on `model`."""
    n_layers = len(find_blocks(model))
    eplan = plan_to_engine(plan, n_layers)   # what the plan asks of the engine, refused before anything loads
    if batch > 1 and any(sr.topk is not None for L in eplan.layers for sr in L.values()):
        raise ActsparseError(f"plan {plan.method!r} keeps each token's Top-K: its decode speed is measured at batch "
                             f"1 (the kernels share one threshold per site across a batch), not {batch}")
    why = speed_unavailable_reason(model)
    if why:
        raise ActsparseError(why)
    from ..engine import Engine

    eng = Engine.from_hf(model, device="cuda", dtype=torch.bfloat16, max_batch=max(batch, 1),
                         max_seq_len=prompt_len + n_tokens + 1)

    def best(sparse: bool) -> tuple[float, float]:
        runs = [(eng.decode(None, n_tokens, sparse=sparse, batch=batch, prompt_len=prompt_len, seed=r),
                 eng.last_step_ms) for r in range(repeats)]
        return max(runs)

    dense_tok_s, _ = best(False)
    if not plan.rules:  # the dense plan: sparse path = dense path
        return {"decode/tok_s": dense_tok_s, "decode/tok_s_dense": dense_tok_s, "decode/speedup": 1.0}
    eng.set_plan(eplan)
    tok_s, step_ms = best(True)
    return {"decode/tok_s": tok_s, "decode/tok_s_dense": dense_tok_s, "decode/speedup": tok_s / dense_tok_s,
            "kernel/us_per_layer": step_ms * 1e3 / n_layers}
