"""A small Llama-family decode engine (Llama, Mistral, Qwen2, Qwen3, Phi-3, Granite, Gemma 2, Gemma 3 text, and the
mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE: `config.FAMILIES`): static KV cache, one CUDA-graphed decode
step, dense or sparse.

The hot path is `Engine._block`: per decoder block, dense runs
    rmsnorm → cuBLAS q|k|v → attention (RoPE + cache write) → cuBLAS o (+res) → rmsnorm →
    cuBLAS gate|up → act·mul → cuBLAS down (+res)                                     (8 launches)
and sparse runs the kernels with thresholds, norms and residuals fused:
    sparse q|k|v (norm fused) → attention → sparse o (+res) → sparse gate/up (norm, act·mul fused)
    → sparse down (+res)      (5 launches with the one-shot tiles; the gather walk adds a compaction pass)
and each op runs whichever of cuBLAS, the one-shot tiles and the gather walk is fastest at its expected
skipped rows, as measured on the GPU at hand (`crossover.py`). With `residual_fp32` (the default on a GPU) a
sparse step keeps the residual stream in fp32, and o and down may add straight into it ("accumulate": the
one-shot tiles' partials land in the stream, no output, counter or epilogue) where that measures fastest;
q|k|v likewise writes its raw fp32 sums (zeroed by its norm pre-pass) for the attention kernel to cast. act is silu (SwiGLU) or gelu-tanh (Gemma's
GeGLU). Gemma's sandwich norms normalise the o and down outputs before the residual add, so those two ops
run without the residual and a norm + add follows each; its attention scales, soft-caps and slides its window
inside the attention kernel.
CATS layers replace the gate/up launch by gate (act fused) + up rows gathered by |act(gate)| > t. A per-token
Top-K rule (`SiteRule.topk`, WINA's selection=topk) adds one launch before its op, `topk_thresholds`, which
writes this token's level into the op's thresholds (batch 1).

Plans are data: `set_plan(EnginePlan)` (plan.py: per layer and role q k v o gate up down, plus `gate_act`
for CATS, a threshold, an optional SCAP shift and the expected skip), or `set_thresholds` with the same as
dicts keyed `layers.{i}.{role}`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from actsparse.kernels import ref as kref
from actsparse.kernels.gather_gemv import ActiveLists
from actsparse.kernels.lowrank import pack_lowrank as kpack_lowrank
from actsparse.kernels.topk import MAX_K as TOPK_MAX_K

from .config import LlamaConfig, unsupported_reason
from .crossover import LISTED, RUNS_ON, down_layout, listable, op_times
from .plan import EXPERT_ROLE, EnginePlan, Threshold
from .rotation import adapt, check_rotations, rotate_weights
from .weights import Weights, random_weights, weights_from_hf



def _any_impl(ref_fn: Callable) -> Callable:
    """A reference that takes (and ignores) the kernels' `impl` argument: it is one implementation. With
    `accumulate=h` (sparse_gemv's), h ← h + W·x_s (+ bias) in place, as the one-shot tiles do; `out=h`, h ← W·x_s
    (+ bias) in fp32."""
    def call(*args, impl: str = "auto", accumulate: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None, gated: str = "none", **kw):
        if gated != "none":  # a gate/up pair's raw sums [2, B, K]: the input is act(gate)·up
            args = (kref.act_ref(args[0][0], gated) * args[0][1],) + args[1:]
        if out is not None:
            return out.copy_(ref_fn(*args, residual=torch.zeros_like(out), **kw))
        if accumulate is None:
            return ref_fn(*args, **kw)
        return accumulate.copy_(ref_fn(*args, residual=accumulate, **kw))
    return call


def _kernel(impl: str) -> str:
    """The kernel that runs a choice: "accumulate" / "gather-accumulate" is the one-shot tiles / the gather walk
    adding into the stream (or writing raw sums), which an op that cannot (a residual behind a post-norm, a
    model-dtype stream) runs with an output of its own."""
    return RUNS_ON.get(impl, impl)


def _gated_mlp_any(x, wt_gate, wt_up, thresh, *, impl: str = "auto", out: Optional[torch.Tensor] = None,
                   bias=None, act: str = "silu", **kw):
    """`sparse_gated_mlp`'s reference; with `out=` [2, B, I] the raw sums W·x_s + b of gate and up, in fp32."""
    if out is None:
        return kref.sparse_gated_mlp_ref(x, wt_gate, wt_up, thresh, bias=bias, act=act, **kw)
    t = torch.as_tensor(thresh, dtype=torch.float32)
    for j, wt in enumerate((wt_gate, wt_up)):
        tj = t.reshape(-1)[j:j + 1] if t.dim() <= 1 else t[j:j + 1]
        shift = kw.get("shift")
        out[j] = kref.sparse_gemv_ref(x, wt, tj, bias=None if bias is None else bias[j],
                                      **{**kw, "shift": None if shift is None else shift[j:j + 1],
                                         "residual": torch.zeros_like(out[j])})
    return out


def _experts_any(any_fn: Callable, experts_fn: Callable) -> Callable:
    """A reference that also takes the kernels' `experts=` (and `expert_weights=`): the routed experts' sums from
    `experts_fn` (fp32), written into `out=` or added into `accumulate=`, as the one-shot tiles do."""
    def call(x, *args, experts: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
             accumulate: Optional[torch.Tensor] = None, impl: str = "auto", **kw):
        if experts is None:
            extra = {} if accumulate is None else {"accumulate": accumulate}
            return any_fn(x, *args, out=out, impl=impl, **extra, **kw)
        y = experts_fn(x, *args, experts, **kw)
        return out.copy_(y) if out is not None else accumulate.add_(y)
    return call


def _mlp_any(x, wt_gate, wt_up, wt_down, thresh, down_thresh, *, accumulate: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None, **kw):
    """`sparse_mlp`'s reference: the MLP's output added into `accumulate=` (or written into `out=`), in fp32."""
    y = kref.sparse_mlp_ref(x, wt_gate, wt_up, wt_down, thresh, down_thresh, **kw)
    return out.copy_(y) if out is not None else accumulate.add_(y)


class _TorchOps:
    """Plain-PyTorch implementations (references), for any device; not graph-capturable on GPU."""

    rmsnorm = staticmethod(kref.hf_rmsnorm_ref)
    add_normed = staticmethod(kref.add_normed_ref)
    silu_mul = staticmethod(kref.silu_mul_ref)
    sparse_gemv = staticmethod(_experts_any(_any_impl(kref.sparse_gemv_ref), kref.experts_gemv_ref))
    sparse_gated_mlp = staticmethod(_experts_any(_gated_mlp_any, kref.experts_gated_mlp_ref))
    sparse_mlp = staticmethod(_mlp_any)
    cats_up = staticmethod(_any_impl(kref.cats_up_ref))
    decode_attention = staticmethod(kref.decode_attention_ref)
    topk_thresholds = staticmethod(kref.topk_thresholds_ref)
    lowrank_add = staticmethod(kref.lowrank_add_ref)


class _TritonOps:
    """The Triton kernels (registered torch.library custom ops)."""

    def __init__(self) -> None:
        from actsparse import kernels as k

        self.rmsnorm = k.rmsnorm
        self.add_normed = k.add_normed
        self.moe_route = k.moe_route
        self.silu_mul = k.silu_mul
        self.sparse_gemv = k.sparse_gemv
        self.sparse_gated_mlp = k.sparse_gated_mlp
        self.sparse_mlp = k.sparse_mlp
        self.cats_up = k.cats_up
        self.decode_attention = k.decode_attention
        self.gather_lists = k.gather_lists
        self.topk_thresholds = k.topk_thresholds
        self.lowrank_add = k.lowrank_add


FUSED_MLP = ("fused", "fused")  # `Engine._mlp_raw`'s answer where `sparse_mlp` runs the layer's MLP
# its answer where gate|up's raw pair (the gather walk) also writes down's lists and down walks them (batch 1)
LISTED_MLP = ("gather-listing", "gather-listed")


@dataclass
class _OpRule:
    """Sparsity of one fused op (q|k|v, o, gate|up or down) in one layer."""

    thresh: torch.Tensor  # float32 [S] or [S, K], one row per site of the op
    shift: Optional[torch.Tensor] = None  # float32 [S, K]
    bias: Optional[torch.Tensor] = None  # W·shift: [N] or [2, N] (gate/up)
    expected: float = 1.0  # fraction of weight rows it is expected to skip (decides the cuBLAS fallback)
    nm: Optional[tuple[int, int]] = None  # N:M selection instead of the thresholds (one pattern per op)
    # R-Sparse: the sites' factors as `lowrank_add` reads them (`pack_lowrank`: V [K, S·R], U·S [N, R], ranks [S]),
    # thresholds `thresh`; widths: N per site
    lowrank: Optional[tuple] = None
    widths: tuple[int, ...] = ()
    # per-token Top-K: entries each token zeroes per site (int32 [S]) and WINA's score weights [S, K]; `thresh` is
    # then the buffer the step writes each token's levels into before the op
    topk: Optional[torch.Tensor] = None
    topk_w: Optional[torch.Tensor] = None


@dataclass
class _LayerRule:
    qkv: _OpRule
    o: _OpRule
    gu: _OpRule
    down: _OpRule
    gate_act: Optional[torch.Tensor] = None  # CATS threshold on act(gate), float32 [1] or [I]
    up_expected: float = 0.0  # CATS: fraction of up rows the gate_act mask is expected to skip
    countdown: bool = False   # M-COUNTDOWN: gate_act thresholds up's output and gathers the gate rows instead
    shared_gu: Optional[_OpRule] = None  # Qwen2-MoE: the shared expert's gate|up
    shared_down: Optional[_OpRule] = None  # and its down input


@dataclass
class _Graph:
    graph: Optional[torch.cuda.CUDAGraph]
    tok: torch.Tensor  # [B] int64, the token fed to the next step (the step writes its argmax here)
    pos: torch.Tensor  # [B] int32, that token's position (the step increments it)
    out: torch.Tensor  # [B, S] int64, generated tokens by position
    logits: torch.Tensor  # [B, V] of the last step


class Engine:
    """A Llama-family decoder with a static KV cache that decodes dense (cuBLAS) or sparse (Triton kernels).

    fallback_below: an op (qkv, o, gu, down) whose expected skipped-row fraction is under this
    level runs on cuBLAS instead, where the kernels lose; below it cuBLAS computes W·x exactly (a
    shift cancels out), above it the kernels' `impl="auto"` runs. A float for every op, a dict per op,
    or {batch: {op: level}} per batch (the smallest batch key ≥ the batch applies). None: with the
    Triton kernels on a GPU, cuBLAS and each sparse kernel are timed on that GPU at this model's shapes,
    once per batch (`crossover.op_times`), and every op runs whichever is fastest at its expected skip;
    otherwise 0.

    producer_lists: at batch 1 the op producing o's and down's inputs writes their active-row lists, so their gather
    walks need no compaction launch: the attention kernel o's (an fp32 stream, a power-of-two head_dim, no Top-K or
    low-rank rule on o, no rotated stream), gate|up's raw pair down's (no Top-K level or low-rank path).
    None: where measured fastest (`crossover`: o's "gather-listed", the MLP's "pair-listing" + "gated-listed");
    True: wherever it can run; False: never. Behind Gemma's post-norms o and down add into the buffer `add_normed`
    reads instead of the stream. Down's list order follows the order the pair's strips
    finish in, so its fp32 sum order (and last bits) vary from step to step, as the atomics' already do.
    """

    # Whether o and down may add into the stream in place (a tensor-parallel rank's partial sums may not).
    ACCUMULATES = True

    def __init__(self, cfg: LlamaConfig, weights: Weights, *, max_batch: int = 4, max_seq_len: int = 512,
                 kernels: str = "auto", fallback_below: Union[None, float, dict] = None,
                 use_graphs: bool = True, residual_fp32: Optional[bool] = None,
                 producer_lists: Optional[bool] = None) -> None:
        if kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {kernels!r}")
        self.cfg = cfg
        self.w = weights
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        if kernels == "auto":
            kernels = "triton" if self.device.type == "cuda" else "torch"
        self.kernels = kernels
        self.ops = _TritonOps() if kernels == "triton" else _TorchOps()
        self.use_graphs = use_graphs and self.device.type == "cuda" and kernels == "triton"
        if fallback_below is None:
            fallback_below = "measured" if self.device.type == "cuda" and kernels == "triton" else 0.0
        self.fallback_below = fallback_below
        if residual_fp32 is None:
            residual_fp32 = self.device.type == "cuda" and kernels == "triton"
        self.residual_fp32 = bool(residual_fp32) and self.ACCUMULATES
        # o at batch 1 reading the lists the attention kernel writes (no compaction launch): None where measured
        # fastest ("gather-listed"), True wherever it can run, False never
        self.producer_lists = producer_lists
        self._plain: Optional[Weights] = None  # the model's weights while a rotated plan reads a folded copy
        self._adapters: Optional[list] = None  # per layer (M before the attention read, M before the MLP read)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        shape = (cfg.n_layers, max_batch, cfg.n_kv_heads, max_seq_len, cfg.head_dim)
        # In the embedding's dtype, as Gemma's scaled embedding multiplies (sqrt(3072) is 55.5 in bf16).
        self.embed_scale = (None if cfg.embed_scale == 1.0 else
                            torch.tensor(cfg.embed_scale, dtype=self.dtype, device=self.device))
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.rules: Optional[list[_LayerRule]] = None
        self.expected_sparsity: dict[str, float] = {}
        self._graphs: dict[tuple[int, bool], _Graph] = {}
        self._sums: dict[object, torch.Tensor] = {}  # buffers by batch size (and kind)
        self.last_tokens: Optional[torch.Tensor] = None
        self.last_step_ms: float = float("nan")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf(cls, model, *, device=None, dtype: Optional[torch.dtype] = None, layouts: str = "both",
                **kw) -> "Engine":
        """Return an engine holding the weights of a transformers model of a family the engine decodes exactly
        (`config.FAMILIES`), or of a local HF directory holding one; any other model is refused with the reason (`config.unsupported_reason`) before
        a weight is copied."""
        max_seq_len = kw.get("max_seq_len", 512)
        if isinstance(model, (str, Path)):
            from transformers import AutoConfig, AutoModelForCausalLM

            path = Path(model)
            if not path.is_dir():
                raise ValueError(f"{model!r} is not a local directory; pass a loaded LlamaForCausalLM or a path")
            why = unsupported_reason(AutoConfig.from_pretrained(path), max_seq_len)
            if why:
                raise ValueError(why)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.bfloat16)
        why = unsupported_reason(model.config, max_seq_len)
        if why:
            raise ValueError(why)
        cfg = LlamaConfig.from_hf(model.config)
        p = next(model.parameters())
        device = torch.device(device) if device is not None else p.device
        dtype = dtype or p.dtype
        return cls(cfg, weights_from_hf(model, device, dtype, layouts), **kw)

    @classmethod
    def random(cls, cfg: LlamaConfig, *, device="cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
               layouts: str = "both", **kw) -> "Engine":
        """Return an engine with random weights of the given shapes (for speed measurements)."""
        return cls(cfg, random_weights(cfg, torch.device(device), dtype, seed, layouts), **kw)

    # ------------------------------------------------------------------ plans
    def set_thresholds(self, thresholds: dict[str, Threshold], shifts: Optional[dict[str, torch.Tensor]] = None,
                       expected_sparsity: Optional[dict[str, float]] = None) -> None:
        """Turn sparse decoding on from dicts keyed `layers.{i}.{role}` (see `EnginePlan.from_names`)."""
        self.set_plan(EnginePlan.from_names(self.cfg.n_layers, thresholds, shifts, expected_sparsity))

    def set_plan(self, plan: EnginePlan) -> None:
        """Turn sparse decoding on: per layer and role, a threshold (float or per-channel [K]), an optional
        shift (SCAP) and the expected fraction of skipped weight rows (ops under their crossover run on
        cuBLAS). Roles left out keep every nonzero input."""
        cfg = self.cfg
        if len(plan.layers) != cfg.n_layers:
            raise ValueError(f"the plan has {len(plan.layers)} layers, the engine {cfg.n_layers}")
        per = [{r: s.thresh for r, s in L.items()} for L in plan.layers]
        per_shift = [{r: s.shift for r, s in L.items() if s.shift is not None} for L in plan.layers]
        per_nm = [{r: s.nm for r, s in L.items() if s.nm is not None} for L in plan.layers]
        per_lr = [{r: s.lowrank for r, s in L.items() if s.lowrank is not None} for L in plan.layers]
        per_topk = [{r: s for r, s in L.items() if s.topk is not None} for L in plan.layers]
        expected = plan.expected_sparsity
        for i in range(cfg.n_layers):
            if "gate_act" in per_shift[i]:
                raise ValueError(f"layers.{i}.gate_act takes no shift (CATS thresholds |act(gate)|)")
            moe_only = sorted(r for r in per[i] if r.startswith("shared_") or EXPERT_ROLE.match(r))
            if moe_only and self.w.layers[i].router is None:
                raise ValueError(f"layers.{i}: {', '.join(moe_only)} are sites of a mixture-of-experts layer; this "
                                 f"layer's MLP is dense")

        # A refused plan leaves the engine as it was: the previous plan's rules and the weights they read.
        before = (self.w, self._plain, self._adapters)
        try:
            self._rotate(plan.rotations)
            rules = self._layer_rules(per, per_shift, per_nm, per_lr, per_topk, expected)
        except Exception:
            self.w, self._plain, self._adapters = before
            raise
        self.rules = rules
        self.expected_sparsity = dict(expected)
        self.reset_graphs()

    def _layer_rules(self, per: list, per_shift: list, per_nm: list, per_lr: list, per_topk: list,
                     expected: dict) -> list["_LayerRule"]:
        """Each layer's rule from the plan's per-layer dicts (role -> threshold, shift, N:M, low-rank, Top-K), on
        the weights the engine reads now (folded ones for a rotated plan); ValueError where the engine cannot."""
        cfg = self.cfg
        d, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
        rules = []
        for i in range(cfg.n_layers):
            th, sh, lw = per[i], per_shift[i], self.w.layers[i]

            def exp(roles: tuple[str, ...]) -> float:
                """Fraction of weight rows the op is expected to skip (its least sparse site decides)."""
                vals = []
                for r in roles:
                    name = f"layers.{i}.{r}"
                    # No expectation given: trust a threshold to pay off; a site without one skips nothing.
                    vals.append(expected[name] if name in expected else (1.0 if r in th else 0.0))
                return min(vals)

            def op(name: str, roles: tuple[str, ...], k: int, wts: list[Optional[torch.Tensor]],
                   model_bias: Optional[torch.Tensor] = None) -> _OpRule:
                t = self._stack([th.get(r, 0.0) for r in roles], k, roles, i)
                nms = {per_nm[i].get(r) for r in roles}
                if len(nms) > 1:   # the op's sites share one input and one launch: one selection rule
                    raise ValueError(f"layers.{i}: {', '.join(roles)} run as one launch on one input, so N:M "
                                     f"needs the same pattern on all of them or on none; got "
                                     f"{ {r: per_nm[i].get(r) for r in roles} }")
                s = None
                bias = model_bias
                if any(r in sh for r in roles):
                    s = self._stack([sh.get(r, torch.zeros(k)) for r in roles], k, roles, i, per_channel=True)
                    # y = W·x_s + W·m: fold the shift's contribution into a bias once.
                    parts = [s[j] @ wts[j].float() for j in range(len(roles))]
                    folded = (torch.cat(parts) if len(roles) == 3 else
                              torch.stack(parts) if len(roles) == 2 else parts[0])
                    bias = (folded if model_bias is None else folded + model_bias.float()).to(self.dtype)
                lowrank = None
                if any(r in per_lr[i] for r in roles):
                    if s is not None:
                        raise ValueError(f"layers.{i}: a low-rank path with a shift is not a rule any method fits")
                    lowrank = kpack_lowrank([per_lr[i].get(r) for r in roles], tuple(w.shape[1] for w in wts),
                                            self.dtype, self.device)
                topk = topk_w = None
                if any(r in per_topk[i] for r in roles):
                    t, topk, topk_w = self._topk_rule(i, name, roles, k, per_topk[i], s, lowrank, nms)
                return _OpRule(thresh=t, shift=s, bias=bias, expected=exp(roles), nm=nms.pop(), lowrank=lowrank,
                               widths=tuple(w.shape[1] for w in wts), topk=topk, topk_w=topk_w)

            wqkv_t = lw.wqkv_t if lw.wqkv_t is not None else lw.wqkv.t()
            qkv_cols = [wqkv_t[:, :q], wqkv_t[:, q:q + kv], wqkv_t[:, q + kv:]]
            if lw.router is not None:
                moe_topk = sorted(r for r in per_topk[i] if r not in ("q", "k", "v", "o"))
                if moe_topk:
                    raise ValueError(f"layers.{i}: the experts select by a threshold (or N:M); per-token Top-K runs on "
                                     f"q, k, v and o of a mixture-of-experts layer, not on {', '.join(moe_topk)}")
                rules.append(self._moe_rule(i, th, sh, per_lr[i], per_nm[i], op, qkv_cols, lw))
                continue
            wg_t = lw.wg_t if lw.wg_t is not None else lw.w13[:inter].t()
            wu_t = lw.wu_t if lw.wu_t is not None else lw.w13[inter:].t()
            gate_act = None
            if any(m in th for m in ("gate_act", "up_out")) and any(r in per_topk[i] for r in ("gate", "up", "down")):
                raise ValueError(f"layers.{i}: CATS / COUNTDOWN choose the MLP's channels by a threshold; a per-token "
                                 "Top-K on gate, up or down cannot join them")
            if "gate_act" in th and "up_out" in th:
                raise ValueError(f"layers.{i}: CATS (gate_act) and COUNTDOWN (up_out) each choose the intermediate "
                                 "channels; give one of them")
            # CATS gathers the up rows by |act(gate)|, COUNTDOWN the gate rows by |up|: the gathered op keeps no
            # input threshold of its own
            mask, gathered = ("gate_act", "up") if "gate_act" in th else ("up_out", "gate")
            if mask in th:
                if gathered in th and float(torch.as_tensor(th[gathered]).abs().max()) != 0.0:
                    raise ValueError(f"layers.{i}: {'CATS' if mask == 'gate_act' else 'COUNTDOWN'} ({mask}) selects "
                                     f"the {gathered} rows itself; drop the '{gathered}' threshold")
                gate_act = self._stack([th[mask]], inter, (mask,), i)[0]
                if mask == "up_out" and lw.wg is None:   # the gate rows in their natural layout, for the gather
                    lw.wg = wg_t.t().contiguous()
            rules.append(_LayerRule(
                qkv=op("qkv", ("q", "k", "v"), d, qkv_cols, lw.bqkv),
                o=op("o", ("o",), q, [lw.wo_t if lw.wo_t is not None else lw.wo.t()]),
                gu=op("gu", ("gate", "up"), d, [wg_t, wu_t]),
                down=op("down", ("down",), inter, [lw.wd_t if lw.wd_t is not None else lw.wd.t()]),
                gate_act=gate_act,
                up_expected=exp((gathered,)) if gate_act is not None else 0.0,
                countdown=mask == "up_out",
            ))
        return rules

    def _moe_rule(self, i: int, th: dict, sh: dict, lr: dict, nm: dict, op: Callable, qkv_cols: list,
                  lw) -> _LayerRule:
        """A mixture-of-experts layer's rule: q|k|v and o as any layer's; gate, up and down a threshold (or N:M
        pattern) per layer shared by every routed expert, or, where a plan names `expert{e}.gate/up/down`, a row
        set per expert ([E, S, K], the others keeping the layer's); the shared expert's gate|up under
        `shared_gate` / `shared_up`, else gate's and up's."""
        cfg = self.cfg
        d, e_n = cfg.hidden_size, cfg.n_experts
        experts = {r for r in (*th, *sh, *lr, *nm) if EXPERT_ROLE.match(r)}
        bad = sorted({r for r in ("gate", "up", "down", "shared_gate", "shared_up", "shared_down", *experts)
                      if r in sh or r in lr} | {r for r in ("gate_act", "up_out") if r in th}
                     | {r for r in experts if r in nm})
        if bad:
            raise ValueError(f"layers.{i}: the engine's experts select by a threshold (or a per-layer N:M pattern); "
                             f"{', '.join(bad)} asks for a shift, a low-rank path, CATS/COUNTDOWN's gathered rows or "
                             f"a per-expert N:M pattern, which the expert kernels do not run")
        far = sorted(r for r in experts if int(EXPERT_ROLE.match(r).group(1)) >= e_n)
        if far:
            raise ValueError(f"layers.{i}: {', '.join(far)} names an expert past the layer's {e_n}")
        if lw.wsd_t is None and any(r.startswith("shared_") for r in th):
            raise ValueError(f"layers.{i}: shared_gate/shared_up/shared_down are a shared expert's sites "
                             f"(Qwen2-MoE); this layer has none")

        def rows(roles: tuple[str, ...], k: int, expert: Optional[int] = None) -> torch.Tensor:
            """[S] or [S, k]: expert's own thresholds where named, else the layer's roles'."""
            names = roles if expert is None else tuple(f"expert{expert}.{r}" for r in roles)
            return self._stack([th.get(n, th.get(r, 0.0)) for n, r in zip(names, roles)], k, names, i)

        def experts_op(name: str, roles: tuple[str, ...], k: int, wts: list) -> _OpRule:
            rule = op(name, roles, k, wts)
            if any(EXPERT_ROLE.match(r) and r.split(".")[1] in roles for r in experts):
                per = [rows(roles, k, e) for e in range(e_n)]
                if all(t.dim() == 1 for t in per):  # scalars: [E, S] read along K with stride 0
                    rule.thresh = torch.stack(per)[:, :, None].expand(e_n, len(roles), k)
                else:
                    rule.thresh = torch.stack([t if t.dim() == 2 else t[:, None].expand(len(roles), k) for t in per])
            return rule

        shared_gu = shared_down = None
        if lw.wsd_t is not None:
            i_s = lw.wsd_t.shape[1]
            shared_gu = _OpRule(thresh=self._stack([th.get("shared_gate", th.get("gate", 0.0)),
                                                    th.get("shared_up", th.get("up", 0.0))], d,
                                                   ("shared_gate", "shared_up"), i), nm=nm.get("gate"))
            shared_down = op("shared_down", ("shared_down",), i_s, [lw.wsd_t[0]])
        return _LayerRule(qkv=op("qkv", ("q", "k", "v"), d, qkv_cols, lw.bqkv),
                          o=op("o", ("o",), cfg.q_size, [lw.wo_t if lw.wo_t is not None else lw.wo.t()]),
                          gu=experts_op("gu", ("gate", "up"), d, [lw.weg_t[0], lw.weu_t[0]]),
                          down=experts_op("down", ("down",), cfg.moe_intermediate_size, [lw.wed_t[0]]),
                          shared_gu=shared_gu, shared_down=shared_down)

    def clear_thresholds(self) -> None:
        """Turn sparse decoding off (dense cuBLAS path)."""
        self.rules = None
        self.expected_sparsity = {}
        self._rotate({})
        self.reset_graphs()

    def _rotate(self, rotations: dict) -> None:
        """Read the model's own weights (no rotations), or a copy folded for a rotated residual stream with its
        adapters (engine/rotation.py; the copy is the size of the blocks' weights, kept beside the model's until
        the plan goes)."""
        if self._plain is not None:
            self.w, self._plain, self._adapters = self._plain, None, None
        if not rotations:
            return
        check_rotations(self.w, rotations, self.cfg.n_layers)
        self._plain = self.w
        self.w, self._adapters = rotate_weights(self.w, rotations, self.cfg.n_layers)

    def _stack(self, vals: list[Threshold], k: int, roles: tuple[str, ...], layer: int,
               per_channel: bool = False) -> torch.Tensor:
        """Return float32 [S] (all scalars) or [S, k] thresholds/shifts on the engine's device."""
        ts = [torch.as_tensor(v, dtype=torch.float32).to(self.device) for v in vals]
        for t, r in zip(ts, roles):
            if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, k)):
                raise ValueError(f"layers.{layer}.{r}: expected a scalar or a per-channel [{k}] tensor, "
                                 f"got shape {tuple(t.shape)}")
        if not per_channel and all(t.numel() == 1 for t in ts):
            return torch.stack([t.reshape(()) for t in ts])
        return torch.stack([t.reshape(-1).expand(k) for t in ts]).contiguous()

    def _topk_rule(self, i: int, name: str, roles: tuple[str, ...], k: int, tk: dict, shift, lowrank,
                   nms: set) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(the levels' buffer, entries zeroed per site int32 [S], score weights [S, K] or None) of an op whose
        sites select each token's Top-K; ValueError where the op cannot."""
        missing = [r for r in roles if r not in tk]
        if missing:
            raise ValueError(f"layers.{i}: {', '.join(roles)} run as one launch on one input, so a per-token Top-K "
                             f"needs a Top-K rule on each of them; {', '.join(missing)} has none")
        if shift is not None or lowrank is not None or nms != {None}:
            raise ValueError(f"layers.{i}.{name}: a per-token Top-K takes no shift, N:M pattern or low-rank path")
        if k > TOPK_MAX_K:
            raise ValueError(f"layers.{i}.{name}: a per-token Top-K holds a token's scores in one program's registers, "
                             f"at most {TOPK_MAX_K} channels; this input has {k}")
        for r in roles:
            if not 0 <= tk[r].topk <= k:
                raise ValueError(f"layers.{i}.{r}: topk zeroes between 0 and {k} entries a token, got {tk[r].topk}")
        topk = torch.tensor([tk[r].topk for r in roles], dtype=torch.int32, device=self.device)
        if all(tk[r].topk_w is None for r in roles):
            return torch.zeros(len(roles), device=self.device), topk, None
        # WINA weighs some sites' scores (k, gate) and not others' (q, v, up): a weight of one is |x| itself
        w = []
        for r in roles:
            wr = torch.ones(k) if tk[r].topk_w is None else torch.as_tensor(tk[r].topk_w, dtype=torch.float32).cpu()
            if tuple(wr.shape) != (k,):
                raise ValueError(f"layers.{i}.{r}: topk_w must be [{k}], got shape {tuple(wr.shape)}")
            w.append(wr.float())
        return torch.zeros(len(roles), k, device=self.device), topk, torch.stack(w).to(self.device).contiguous()

    def _levels(self, rule: "_OpRule", x: torch.Tensor, **kw) -> None:
        """Write this token's Top-K levels into the op's thresholds (nothing for a threshold rule)."""
        if rule.topk is None:
            return
        if x.shape[-2] != 1:
            raise ValueError(f"a per-token Top-K plan decodes at batch 1 (each token has its own level and the "
                             f"kernels share one threshold per site across a batch); got batch {x.shape[-2]}")
        self.ops.topk_thresholds(x, rule.topk, rule.thresh, score_w=rule.topk_w, **kw)

    def _choose(self, rule: _OpRule, op: str, b: int) -> str:
        """What runs op at batch b: "dense" (cuBLAS) or the sparse kernel to ask for ("auto" where the levels
        are given rather than measured)."""
        if self.cfg.moe and op in ("gu", "down"):
            return "auto"  # the experts always run the expert-indexed tiles (`_moe`): nothing to fall back to
        fb = self.fallback_below
        if fb == "measured":
            return op_times(self, b)[op].choice(rule.expected)
        if isinstance(fb, dict) and fb and all(isinstance(k, int) for k in fb):
            keys = sorted(fb)
            fb = next((fb[k] for k in keys if b <= k), fb[keys[-1]])
        level = fb.get(op, 0.0) if isinstance(fb, dict) else float(fb)
        return "dense" if rule.expected < level else "auto"

    def _dense(self, rule: _OpRule, op: str, b: int) -> bool:
        """Whether op runs on cuBLAS at batch b."""
        return self._choose(rule, op, b) == "dense"

    def _cats(self, r: Optional[_LayerRule], b: int) -> bool:
        """Whether a layer runs CATS at batch b: only where the up rows it skips pay for its extra launch (the
        gate/up crossover); else gate, up and down run dense."""
        return (r is not None and r.gate_act is not None
                and not self._dense(_OpRule(thresh=r.gate_act, expected=r.up_expected), "gu", b))

    # ------------------------------------------------------------------ the hot path
    def _linear(self, x: torch.Tensor, w: Optional[torch.Tensor], wt: Optional[torch.Tensor],
                res: Optional[torch.Tensor] = None) -> torch.Tensor:
        """cuBLAS x·Wᵀ (+res) from whichever layout is loaded (an fp32 stream's res: added after, in fp32)."""
        wt = w.t() if w is not None else wt
        if res is not None and res.dtype != x.dtype:
            return res + x @ wt
        return torch.addmm(res, x, wt) if res is not None else x @ wt

    def _norm(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """RMSNorm with the family's rounding (Gemma: scaled by 1 + w in float32 before the cast), in the model's
        dtype (an fp32 stream's too)."""
        y = self.ops.rmsnorm(x, g, self.cfg.rms_eps, scale_in_f32=self.cfg.norm_f32)
        return y if y.dtype == self.dtype else y.to(self.dtype)

    def _raw_sums(self, impl: str, x: torch.Tensor, rule: "_OpRule") -> bool:
        """Whether an op hands on raw fp32 sums (q|k|v: `out=` for the attention kernel): in an fp32-stream step
        where measured fastest (a name of RUNS_ON) or, with given fallback levels ("auto"), wherever the
        one-shot tiles can (batch ≤ 16); R-Sparse's low-rank path is then added into the sums (`lowrank_add`)."""
        return (x.dtype == torch.float32 and self.residual_fp32
                and (impl in RUNS_ON or (impl == "auto" and x.shape[0] <= 16)))

    def _qkv_sums(self, b: int) -> torch.Tensor:
        """The fp32 [b, Nq + 2Nkv] buffer q|k|v's raw sums land in (one per batch size; each op zeroes it first)."""
        if b not in self._sums:
            self._sums[b] = torch.empty(b, self.cfg.q_size + 2 * self.cfg.kv_size, device=self.device)
        return self._sums[b]

    def _mlp_raw(self, r: Optional["_LayerRule"], x: torch.Tensor, b: int, lw, record) -> Optional[tuple[str, str]]:
        """The kernels (gate|up's, down's) where gate|up writes its two raw fp32 sums (`out=`) and down forms
        act(gate)·up from them in its prologue while adding into the fp32 stream (or, where a post-norm sits
        between, into the zeroed buffer `_post_sums` that `add_normed` then adds): where both ops run sparse, no
        CATS sits between, and (measured) the fastest of each beats gate|up's and down's best; ("fused", "fused")
        where the whole MLP in two launches (`sparse_mlp`) measured faster still; `LISTED_MLP` where the pair also
        writing down's lists and down walking them (batch 1, `producer_lists`) is fastest, or forced; None where
        they run otherwise. R-Sparse's low-rank paths add into the pair's sums and, from its act(gate)·up, into
        down's."""
        if (r is None or record is not None or not self.residual_fp32 or x.dtype != torch.float32 or b > 16
                or r.gate_act is not None):
            return None
        gu, down = self._choose(r.gu, "gu", b), self._choose(r.down, "down", b)
        if "dense" in (gu, down):
            return None
        if self.fallback_below != "measured":
            return LISTED_MLP if self.producer_lists is True and self._down_listable(r, b) else ("oneshot", "oneshot")
        t = op_times(self, b)
        if "pair" not in t:
            return None
        (pk, pt), (dk, dt) = t["pair"].best(r.gu.expected), t["gated"].best(r.down.expected)
        # R-Sparse: here gate|up is one launch and its low-rank path adds into the pair's sums; the other way runs
        # gate and up apart (H100, rsparse 0.5 decode: 0.78x before this rule, 0.83x with it)
        if r.gu.lowrank is not None or r.down.lowrank is not None:
            return pk, dk
        apart = t["gu"].at(gu, r.gu.expected) + t["down"].at(down, r.down.expected)
        best = min(pt + dt, apart)
        if self._down_listable(r, b) and "pair-listing" in t:
            lt = t["pair-listing"].at("gather", r.gu.expected) + t["gated-listed"].at("gather", r.down.expected)
            if self.producer_lists is True or lt < best:
                best, listed = lt, True
            else:
                listed = False
        else:
            listed = False
        if "mlp" in t and self._fusable(r) and not (listed and self.producer_lists is True):
            # measured with both selections at one level: read at the bytes' mean (gate|up holds 2/3 of them)
            ft = t["mlp"].at("fused", (2 * r.gu.expected + r.down.expected) / 3)
            if ft < best:
                return FUSED_MLP
        if listed:
            return LISTED_MLP
        return (pk, dk) if pt + dt < apart else None

    def _down_listable(self, r: "_LayerRule", b: int) -> bool:
        """Whether gate|up's raw pair can write down's lists here (`producer_lists` not off, batch 1, a layout
        `crossover.down_layout` finds, down's N:M groups inside the pair's column strip, no Top-K level or
        low-rank path on down)."""
        seg, strip = down_layout(self, b)
        return (self.producer_lists is not False and seg > 0 and r.down.topk is None and r.down.lowrank is None
                and r.gu.lowrank is None and (r.down.nm is None or strip % r.down.nm[1] == 0))

    def _down_lists(self) -> ActiveLists:
        """down's active-row lists (batch 1), which gate|up's raw pair writes (one buffer per list size: an
        `override_config` may change the pair's strip)."""
        seg = down_layout(self, 1)[0]
        if ("down_lists", seg) not in self._sums:
            from actsparse.kernels.gather_gemv import active_lists

            self._sums["down_lists", seg] = active_lists(self.cfg.intermediate_size, seg, self.device)
        return self._sums["down_lists", seg]

    @staticmethod
    def _fusable(r: "_LayerRule") -> bool:
        """Whether `sparse_mlp` runs a layer's MLP rule: one N:M pattern for both selections (it has one), and
        down's threshold not a per-token Top-K level (found from act(gate)·up, which never leaves the kernel)."""
        return r.gu.nm == r.down.nm and r.down.topk is None

    def _pair_sums(self, b: int) -> torch.Tensor:
        """The fp32 [2, b, I] buffer gate|up's raw sums land in (one per batch size)."""
        key = -b  # beside q|k|v's buffers
        if key not in self._sums:
            self._sums[key] = torch.empty(2, b, self.cfg.intermediate_size, device=self.device)
        return self._sums[key]

    def _accumulates(self, impl: str, x: torch.Tensor, res: Optional[torch.Tensor], rule: "_OpRule") -> bool:
        """Whether a row-split op (o, down) adds into the fp32 stream x in place: measured fastest ("accumulate"),
        or with given fallback levels ("auto") wherever it can (it adds the residual itself)."""
        return res is x and self._raw_sums(impl, x, rule)

    def _listed(self, impl: str, x: torch.Tensor, rule: "_OpRule") -> bool:
        """Whether o runs over the lists the attention kernel writes (`producer_lists`)."""
        if self.producer_lists is False or rule.topk is not None or rule.lowrank is not None:
            return False
        # adding into the stream, or behind a post-norm into the buffer add_normed reads (`_post_raw`)
        if self._adapters is not None or not listable(self, x.shape[0]) or not self._raw_sums(impl, x, rule):
            return False
        return impl == LISTED or self.producer_lists is True

    def _o_lists(self) -> ActiveLists:
        """o's active-row lists (batch 1), one per kv head, which the attention kernel writes."""
        if "o_lists" not in self._sums:
            from actsparse.kernels.gather_gemv import active_lists

            q, hkv = self.cfg.q_size, self.cfg.n_kv_heads
            self._sums["o_lists"] = active_lists(q, q // hkv, self.device)
        return self._sums["o_lists"]

    def _act(self, g: torch.Tensor) -> torch.Tensor:
        """The gate's activation (silu, or Gemma's gelu-tanh) in g's dtype."""
        return F.silu(g) if self.cfg.act == "silu" else F.gelu(g, approximate="tanh")

    def _add_lowrank(self, rule: _OpRule, xin: torch.Tensor, out: torch.Tensor, **kw) -> None:
        """R-Sparse: add the op's low-rank path, (x̂ ⊙ 1[|x̂| ≤ t])·V·(U·S)ᵀ per site, into its output in place —
        raw sums, the stream or an output in the model's dtype (`lowrank_add`, two launches)."""
        if rule.lowrank is not None:
            bounds = tuple(itertools.accumulate(rule.widths))[:-1]
            self.ops.lowrank_add(xin, rule.thresh, *rule.lowrank, out, segments=bounds, **kw)

    def _post_raw(self, impl: str, x: torch.Tensor, post_norm: Optional[torch.Tensor], rule: "_OpRule") -> bool:
        """Whether a row-split op (o, down) followed by a post-norm (Gemma) adds its raw fp32 sums into the zeroed
        buffer `_post_sums`, which one `add_normed` launch then normalises and adds into the fp32 stream: where
        the op could add into the stream itself but for the norm (no counter, epilogue or rounding of its own)."""
        return post_norm is not None and self._raw_sums(impl, x, rule)

    def _post_sums(self, b: int) -> torch.Tensor:
        """The fp32 [b, D] buffer o's and down's raw sums land in ahead of a post-norm: zero between uses (its
        consumer, `add_normed`, zeroes it as it reads it), so the ops add into it with no zeroing launch."""
        key = ("post", b)
        if key not in self._sums:
            self._sums[key] = torch.zeros(b, self.cfg.hidden_size, device=self.device)
        return self._sums[key]

    def _residual(self, x: torch.Tensor, y: torch.Tensor, post_norm: Optional[torch.Tensor],
                  raw: bool = False) -> torch.Tensor:
        """The new residual stream: y where the op added x itself, x + norm(y) where a post-norm sits between
        (raw: y is `_post_sums`, added into the fp32 stream x in place and zeroed by one launch)."""
        if raw:
            return self.ops.add_normed(x, y, post_norm, self.cfg.rms_eps, self.cfg.norm_f32, out_dtype=self.dtype)
        return y if post_norm is None else x + self._norm(y, post_norm)

    # Hooks of the row-split ops (o, down) and the LM head, which the tensor-parallel engine overrides
    # (tensor_parallel.py): here one process holds every row, so they are the plain single-GPU steps.
    def _op_residual(self, x: torch.Tensor, post_norm: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The residual a row-split op adds itself: x, unless a post-norm sits between the op and the add."""
        return x if post_norm is None else None

    def _reduce(self, y: torch.Tensor) -> torch.Tensor:
        """The sum of a row-split op's partial outputs over the shards that hold its rows: y itself here."""
        return y

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy next tokens [B] from the logits this process holds."""
        return logits.argmax(-1)

    def _block(self, i: int, x: torch.Tensor, pos: torch.Tensor, sparse: bool,
               record: Optional[Callable[[int, str, torch.Tensor], None]] = None) -> torch.Tensor:
        """One decoder block on the residual stream x [B, D]; returns the new residual stream."""
        cfg, lw, ops = self.cfg, self.w.layers[i], self.ops
        r = self.rules[i] if sparse else None
        b = x.shape[0]
        m_attn, m_mlp = self._adapters[i] if self._adapters is not None else (None, None)
        x = adapt(x, m_attn)  # a rotated stream into this layer's attention basis
        eps, q, kv, inter = cfg.rms_eps, cfg.q_size, cfg.kv_size, cfg.intermediate_size
        kc, vc = self.k_cache[i, :b], self.v_cache[i, :b]
        wg = None if lw.w13 is None else lw.w13[:inter]

        if record is not None:
            record(i, "qkv", self._norm(x, lw.attn_norm))
        impl = "dense" if r is None else self._choose(r.qkv, "qkv", b)
        if impl != "dense":
            self._levels(r.qkv, x, norm_weight=lw.attn_norm, eps=eps)
        if impl == "dense":
            qkv = self._linear(self._norm(x, lw.attn_norm), lw.wqkv, lw.wqkv_t, res=lw.bqkv)  # [B, Nq + 2Nkv]
        elif self._raw_sums(impl, x, r.qkv):  # fp32 sums, no epilogue: the attention kernel reads and casts them
            qkv = ops.sparse_gemv(x, lw.wqkv_t, r.qkv.thresh, shift=r.qkv.shift, bias=r.qkv.bias,
                                  norm_weight=lw.attn_norm, eps=eps, segments=(q, q + kv), nm=r.qkv.nm,
                                  impl=_kernel(impl), out=self._qkv_sums(b))
            self._add_lowrank(r.qkv, x, self._qkv_sums(b), norm_weight=lw.attn_norm, eps=eps)
        else:
            qkv = ops.sparse_gemv(x, lw.wqkv_t, r.qkv.thresh, shift=r.qkv.shift, bias=r.qkv.bias,
                                  norm_weight=lw.attn_norm, eps=eps, segments=(q, q + kv), nm=r.qkv.nm,
                                  impl=_kernel(impl))
            self._add_lowrank(r.qkv, x, qkv, norm_weight=lw.attn_norm, eps=eps)
        # Qwen3, Gemma 3: each head of q and of k normalised before RoPE; the Triton attention kernel does it
        # as it loads them (no norm launches), the torch backend in transformers' own order.
        head_norms = {}
        if lw.q_norm is not None and self.kernels == "triton":
            head_norms = dict(q_norm=lw.q_norm, k_norm=lw.k_norm, norm_eps=eps, norm_f32=cfg.norm_f32)
        elif lw.q_norm is not None:
            hd = cfg.head_dim
            qn = self._norm(qkv[:, :q].reshape(-1, hd), lw.q_norm).reshape(b, q)
            kn = self._norm(qkv[:, q:q + kv].reshape(-1, hd), lw.k_norm).reshape(b, kv)
            qkv = torch.cat([qn, kn, qkv[:, q + kv:]], dim=1)
        window = cfg.window(i)
        inv_freq, rope_scale = self.w.rope(local=window > 0)
        # Gemma normalises the op's output before the residual add: the op cannot add the residual itself.
        res = self._op_residual(x, lw.post_attn_norm)
        impl = "dense" if r is None else self._choose(r.o, "o", b)
        if impl == LISTED and not self._listed(impl, x, r.o):  # measured fastest, but it cannot run here
            impl = (op_times(self, b)["o"].choice(r.o.expected, exclude=(LISTED,))
                    if self.fallback_below == "measured" else "gather-accumulate")
        lists = self._o_lists() if impl != "dense" and self._listed(impl, x, r.o) else None
        if lists is not None:  # the attention kernel selects its output as o does and writes o's lists
            head_norms.update(lists=lists, list_thresh=None if r.o.nm else r.o.thresh, list_shift=r.o.shift,
                              list_nm=r.o.nm)
        a = ops.decode_attention(qkv, kc, vc, pos, inv_freq, cfg.n_heads, cfg.n_kv_heads,
                                 sm_scale=cfg.attn_scale or None, rope_scale=rope_scale, softcap=cfg.attn_softcap,
                                 window=window, **head_norms)  # [B, Nq]
        if record is not None:
            record(i, "o", a)
        post_raw = False
        if impl != "dense":
            self._levels(r.o, a)
        if impl == "dense":
            y = self._linear(a, lw.wo, lw.wo_t, res=res)
        elif lists is not None:  # into the stream, or (a post-norm between) into the buffer add_normed reads
            post_raw = lw.post_attn_norm is not None
            y = ops.gather_lists(lists, lw.wo_t, accumulate=self._post_sums(b) if post_raw else x, bias=r.o.bias)
        elif self._accumulates(impl, x, res, r.o):
            y = ops.sparse_gemv(a, lw.wo_t, r.o.thresh, shift=r.o.shift, bias=r.o.bias, nm=r.o.nm,
                                impl=_kernel(impl), accumulate=x)
            self._add_lowrank(r.o, a, x)
        elif post_raw := self._post_raw(impl, x, lw.post_attn_norm, r.o):
            y = ops.sparse_gemv(a, lw.wo_t, r.o.thresh, shift=r.o.shift, bias=r.o.bias, nm=r.o.nm,
                                impl=_kernel(impl), accumulate=self._post_sums(b))
            self._add_lowrank(r.o, a, self._post_sums(b))
        else:
            y = ops.sparse_gemv(a, lw.wo_t, r.o.thresh, shift=r.o.shift, bias=r.o.bias, residual=res, nm=r.o.nm,
                                impl=_kernel(impl))
            self._add_lowrank(r.o, a, y)
        x = self._residual(x, self._reduce(y), lw.post_attn_norm, raw=post_raw)
        x = adapt(x, m_mlp)  # and into its MLP basis

        if lw.router is not None:
            return self._moe(i, x, lw, r, record)
        if record is not None:
            xn = self._norm(x, lw.mlp_norm)
            record(i, "gu", xn)
            record(i, "gate_act", self._act(self._linear(xn, wg, lw.wg_t).float()))
        cats = self._cats(r, b)
        mlp_raw = self._mlp_raw(r, x, b, lw, record)
        if mlp_raw == FUSED_MLP:  # the whole MLP in two launches, added into the stream (or the post-norm's sums)
            self._levels(r.gu, x, norm_weight=lw.mlp_norm, eps=eps)
            post_raw = lw.post_mlp_norm is not None
            d = r.down
            y = ops.sparse_mlp(x, lw.wg_t, lw.wu_t, lw.wd_t, r.gu.thresh, d.thresh, shift=r.gu.shift,
                               bias=r.gu.bias, down_shift=None if d.shift is None else d.shift.reshape(-1),
                               down_bias=d.bias, norm_weight=lw.mlp_norm, eps=eps, act=cfg.act, nm=r.gu.nm,
                               accumulate=self._post_sums(b) if post_raw else x)
            return self._residual(x, self._reduce(y), lw.post_mlp_norm, raw=post_raw)
        if mlp_raw == LISTED_MLP:  # the raw pair also writes down's lists; down walks them (batch 1)
            self._levels(r.gu, x, norm_weight=lw.mlp_norm, eps=eps)
            post_raw = lw.post_mlp_norm is not None
            d, lists = r.down, self._down_lists()
            ops.sparse_gated_mlp(x, lw.wg_t, lw.wu_t, r.gu.thresh, shift=r.gu.shift, bias=r.gu.bias,
                                 norm_weight=lw.mlp_norm, eps=eps, act=cfg.act, nm=r.gu.nm, impl="gather",
                                 out=self._pair_sums(b), down_lists=lists, down_thresh=None if d.nm else d.thresh,
                                 down_shift=d.shift, down_nm=d.nm)
            y = ops.gather_lists(lists, lw.wd_t, accumulate=self._post_sums(b) if post_raw else x, bias=d.bias)
            return self._residual(x, self._reduce(y), lw.post_mlp_norm, raw=post_raw)
        if mlp_raw:  # the raw sums; down forms act(gate)·up itself below
            self._levels(r.gu, x, norm_weight=lw.mlp_norm, eps=eps)
            h = ops.sparse_gated_mlp(x, lw.wg_t, lw.wu_t, r.gu.thresh, shift=r.gu.shift, bias=r.gu.bias,
                                     norm_weight=lw.mlp_norm, eps=eps, nm=r.gu.nm, impl=mlp_raw[0],
                                     out=self._pair_sums(b))
            self._add_lowrank(r.gu, x, self._pair_sums(b), norm_weight=lw.mlp_norm, eps=eps)
        elif cats and r.countdown:   # a = up's output, the gate rows it keeps gathered and activated
            g = r.gu
            if self._dense(g, "gu", b):
                a_up = self._linear(self._norm(x, lw.mlp_norm), None if lw.w13 is None else lw.w13[inter:], lw.wu_t)
            else:
                a_up = ops.sparse_gemv(x, lw.wu_t, g.thresh[1:2], shift=None if g.shift is None else g.shift[1:2],
                                       bias=None if g.bias is None else g.bias[1], norm_weight=lw.mlp_norm, eps=eps,
                                       nm=g.nm)  # [B, I] = up
            up_impl = op_times(self, b)["up"].choice(r.up_expected) if self.fallback_below == "measured" else "auto"
            h = ops.cats_up(x, lw.wg, a_up, r.gate_act, norm_weight=lw.mlp_norm, eps=eps, impl=up_impl, act=cfg.act)
        elif cats:
            g = r.gu
            # the gate alone: measured as such where the engine measures (its norm and activation launches
            # around cuBLAS weigh more than in gate|up's pair), else by gate|up's levels
            gate = self._choose(g, "gate" if self.fallback_below == "measured" else "gu", b)
            if gate == "dense":
                ag = self._act(self._linear(self._norm(x, lw.mlp_norm), wg, lw.wg_t))
            else:
                ag = ops.sparse_gemv(x, lw.wg_t, g.thresh[:1], shift=None if g.shift is None else g.shift[:1],
                                     bias=None if g.bias is None else g.bias[0], norm_weight=lw.mlp_norm, eps=eps,
                                     act=cfg.act, nm=g.nm, impl=_kernel(gate))  # [B, I] = act(gate)
            up_impl = op_times(self, b)["up"].choice(r.up_expected) if self.fallback_below == "measured" else "auto"
            h = ops.cats_up(x, lw.wu, ag, r.gate_act, norm_weight=lw.mlp_norm, eps=eps, impl=up_impl)
        elif r is None or (impl := self._choose(r.gu, "gu", b)) == "dense":
            xn = self._norm(x, lw.mlp_norm)
            if lw.w13 is not None:
                h = ops.silu_mul(xn @ lw.w13.t(), act=cfg.act)  # [B, 2I] -> [B, I]
            else:
                h = self._act(xn @ lw.wg_t) * (xn @ lw.wu_t)
        elif r.gu.lowrank is not None:   # R-Sparse: the low-rank part joins gate and up before the activation
            g = r.gu
            gu = torch.stack([ops.sparse_gemv(x, wt, g.thresh[j:j + 1], bias=None if g.bias is None else g.bias[j],
                                              norm_weight=lw.mlp_norm, eps=eps, nm=g.nm, impl=impl).float()
                              for j, wt in enumerate((lw.wg_t, lw.wu_t))])  # [2, B, I]
            self._add_lowrank(g, x, gu, norm_weight=lw.mlp_norm, eps=eps)
            h = (self._act(gu[0]) * gu[1]).to(x.dtype)
        else:
            self._levels(r.gu, x, norm_weight=lw.mlp_norm, eps=eps)
            h = ops.sparse_gated_mlp(x, lw.wg_t, lw.wu_t, r.gu.thresh, shift=r.gu.shift, bias=r.gu.bias,
                                     norm_weight=lw.mlp_norm, eps=eps, act=cfg.act, nm=r.gu.nm, impl=impl)  # [B, I]
        if record is not None:
            record(i, "down", h)
        res = self._op_residual(x, lw.post_mlp_norm)
        # A CATS plan's down rows are the zeros of h that cats_up writes: none when CATS fell back to dense.
        impl = "dense" if r is None or (r.gate_act is not None and not cats) else self._choose(r.down, "down", b)
        post_raw = False
        if impl != "dense" and not mlp_raw:
            self._levels(r.down, h)
        if mlp_raw:  # into the stream, or (a post-norm between) into the zeroed buffer the norm then adds
            post_raw = lw.post_mlp_norm is not None
            self._levels(r.down, self._pair_sums(b), gated=cfg.act)
            y = ops.sparse_gemv(h, lw.wd_t, r.down.thresh, shift=r.down.shift, bias=r.down.bias, nm=r.down.nm,
                                impl=mlp_raw[1], gated=cfg.act, accumulate=self._post_sums(b) if post_raw else x)
            self._add_lowrank(r.down, self._pair_sums(b), self._post_sums(b) if post_raw else x, gated=cfg.act)
        elif impl == "dense":
            y = self._linear(h, lw.wd, lw.wd_t, res=res)
        elif self._accumulates(impl, x, res, r.down):
            y = ops.sparse_gemv(h, lw.wd_t, r.down.thresh, shift=r.down.shift, bias=r.down.bias, nm=r.down.nm,
                                impl=_kernel(impl), accumulate=x)
            self._add_lowrank(r.down, h, x)
        elif post_raw := self._post_raw(impl, x, lw.post_mlp_norm, r.down):
            y = ops.sparse_gemv(h, lw.wd_t, r.down.thresh, shift=r.down.shift, bias=r.down.bias, nm=r.down.nm,
                                impl=_kernel(impl), accumulate=self._post_sums(b))
            self._add_lowrank(r.down, h, self._post_sums(b))
        else:
            y = ops.sparse_gemv(h, lw.wd_t, r.down.thresh, shift=r.down.shift, bias=r.down.bias, residual=res,
                                nm=r.down.nm, impl=_kernel(impl))
            self._add_lowrank(r.down, h, y)
        return self._residual(x, self._reduce(y), lw.post_mlp_norm, raw=post_raw)

    def _route(self, xn: torch.Tensor, router: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids [B, T] (int64) and routing weights [B, T] of the normed hidden state xn [B, D], on the device
        (no host sync: a captured graph routes each step anew), as transformers' routers compute them: softmax over
        every expert in float32, top-k, renormalised (Mixtral always, Qwen-MoE with norm_topk_prob); Mixtral keeps
        the weights in float32, Qwen-MoE casts them to the model dtype."""
        cfg = self.cfg
        if self.kernels == "triton":
            # The router GEMV, top-k and weights in one launch (`moe_route(router=)`) instead of cuBLAS and four to
            # six more; last-bit rounding may differ from transformers', which only the torch backend matches.
            return self.ops.moe_route(xn, cfg.top_k, renorm=cfg.norm_topk_prob, router=router,
                                      w_dtype=torch.float32 if cfg.router == "mixtral" else xn.dtype)
        logits = F.linear(xn, router)  # [B, E]
        probs = torch.softmax(logits.float(), dim=-1)
        w, idx = torch.topk(probs, cfg.top_k, dim=-1)
        if cfg.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return idx, (w if cfg.router == "mixtral" else w.to(logits.dtype))

    def _experts_hf(self, xn: torch.Tensor, lw, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The routed experts' sum [B, D] in the model dtype, in transformers' order of operations and of additions
        (each token's experts by increasing id), for the torch backend's dense path to equal its greedy tokens."""
        idx, order = idx.sort(dim=-1)
        w = w.gather(-1, order)
        out = torch.zeros_like(xn)
        for t in range(idx.shape[1]):  # a slot of every token at once: the torch backend is never captured
            e = idx[:, t]
            g = torch.bmm(xn[:, None, :], lw.weg_t[e])[:, 0]  # [B, I]
            u = torch.bmm(xn[:, None, :], lw.weu_t[e])[:, 0]
            y = torch.bmm((self._act(g) * u)[:, None, :], lw.wed_t[e])[:, 0]  # [B, D]
            out = out + (y * w[:, t, None]).to(out.dtype)
        return out

    def _moe(self, i: int, x: torch.Tensor, lw, r: Optional[_LayerRule],
             record: Optional[Callable[[int, str, torch.Tensor], None]]) -> torch.Tensor:
        """A mixture-of-experts MLP on the residual stream x [B, D]; returns the new stream.

        Router (a small dense GEMV and top-k in torch, on the device), then per token its T routed experts through
        the expert-indexed kernels (the one-shot tiles; at batch 1 the gather walk where measured faster,
        `_experts_kernel`): gate|up's raw sums [B, T, 2, I] (`sparse_gated_mlp(experts=, out=)`), and
        down forming act(gate)·up, scaling it by the routing weight and adding into the fp32 stream (or an fp32
        buffer the stream then adds). Only the routed experts' weights are read. Thresholds: gate and up share the
        layer's normed hidden state, so one pair per layer can serve every expert, and down's is one per layer too
        (its inputs differ per expert, but the engine's own calibration measures one statistic per layer, over every
        routed expert's act(gate)·up); a plan that names an expert's own sites (a fitted per-expert plan) gets a row
        set per expert, which the kernels find by the routed id. The dense path runs the same kernels
        at threshold 0: a fair baseline reads only the routed experts (a host loop or a gather of the experts'
        weights would read them twice or sync the host), and cuBLAS has no device-indexed GEMV. The torch backend's
        dense path instead follows transformers' own order of operations (`_experts_hf`). Qwen2-MoE's shared expert
        runs as one more routed expert (a stack of one, id 0, weight sigmoid(xn·w_gate)) under shared_gate/up's
        thresholds (else gate|up's: it reads the same xn) and its own `shared_down`."""
        cfg, ops, b = self.cfg, self.ops, x.shape[0]
        xn = self._norm(x, lw.mlp_norm)  # [B, D] in the model dtype: what the router and the experts read
        if record is not None:
            record(i, "gu", xn)
        idx, w = self._route(xn, lw.router)
        if r is None and self.kernels == "torch":
            y = self._experts_hf(xn, lw, idx, w)
            if record is not None:
                g = torch.einsum("bd,btdi->bti", xn.float(), lw.weg_t[idx].float())
                u = torch.einsum("bd,btdi->bti", xn.float(), lw.weu_t[idx].float())
                record(i, "down", (self._act(g) * u).reshape(-1, g.shape[-1]))  # [B·T, I]: every routed expert
            if lw.wsd_t is not None:  # transformers: experts + sigmoid(gate)·shared, in the model dtype
                hs = self._act(xn @ lw.wsg_t[0]) * (xn @ lw.wsu_t[0])
                if record is not None:
                    record(i, "shared_down", hs)
                y = y + torch.sigmoid(F.linear(xn, lw.shared_gate)) * (hs @ lw.wsd_t[0])
            return x + y.to(x.dtype)
        zeros = self._zero_thresholds()
        tgu, td = (zeros[:2], zeros[:1]) if r is None else (r.gu.thresh, r.down.thresh)
        nm_gu, nm_d = (None, None) if r is None else (r.gu.nm, r.down.nm)
        k_gu, k_d = (self._experts_kernel(op, rule, b) for op, rule in
                     (("experts_gu", None if r is None else r.gu), ("experts_down", None if r is None else r.down)))
        sums = ops.sparse_gated_mlp(xn, lw.weg_t, lw.weu_t, tgu, nm=nm_gu, experts=idx, out=self._expert_sums(b),
                                    impl=k_gu)
        if record is not None:
            record(i, "down", (self._act(sums[:, :, 0]) * sums[:, :, 1]).reshape(-1, sums.shape[-1]))
        # the kernels read the routing weights w in their dtype (Qwen: the model's) and scale in fp32
        in_place = x.dtype == torch.float32 and r is not None and self.residual_fp32  # the fp32 stream takes it
        y = x if in_place else self._moe_out(b)
        if in_place:
            ops.sparse_gemv(sums, lw.wed_t, td, nm=nm_d, gated=cfg.act, accumulate=x, experts=idx, expert_weights=w,
                            impl=k_d)
        else:
            ops.sparse_gemv(sums, lw.wed_t, td, nm=nm_d, gated=cfg.act, out=y, experts=idx, expert_weights=w,
                            impl=k_d)
        if lw.wsd_t is not None:  # the shared expert: a routed expert of its own, weighted by sigmoid(gate)
            tsg, ts = (zeros[:2], zeros[:1]) if r is None else (r.shared_gu.thresh, r.shared_down.thresh)
            nm_sg, nm_s = (None, None) if r is None else (r.shared_gu.nm, r.shared_down.nm)
            one = self._shared_idx(b)
            sums_s = ops.sparse_gated_mlp(xn, lw.wsg_t, lw.wsu_t, tsg, nm=nm_sg, experts=one,
                                          out=self._shared_sums(b))
            if record is not None:
                record(i, "shared_down", self._act(sums_s[:, 0, 0]) * sums_s[:, 0, 1])
            gate = torch.sigmoid(F.linear(xn, lw.shared_gate))  # [B, 1]
            ops.sparse_gemv(sums_s, lw.wsd_t, ts, nm=nm_s, gated=cfg.act, accumulate=y, experts=one,
                            expert_weights=gate)
        return y if in_place else x + y.to(x.dtype)

    def _experts_kernel(self, op: str, rule: Optional["_OpRule"], b: int) -> str:
        """Which kernel runs a layer's routed experts ("experts_gu" or "experts_down"): where the engine measures, at
        batch 1 with one rule for every expert, the faster at the op's expected skip (the dense path: at 0) of the
        one-shot tiles and the gather walk; else "auto" (the one-shot tiles)."""
        if self.fallback_below != "measured" or b != 1 or (rule is not None and rule.thresh.dim() == 3):
            return "auto"
        t = op_times(self, b).get(op)
        return "auto" if t is None else t.choice(0.0 if rule is None else rule.expected)

    def _zero_thresholds(self) -> torch.Tensor:
        """float32 zeros [2] on the device: the dense path's thresholds (every nonzero input kept)."""
        if "zeros" not in self._sums:
            self._sums["zeros"] = torch.zeros(2, device=self.device)
        return self._sums["zeros"]

    def _expert_sums(self, b: int) -> torch.Tensor:
        """The fp32 [b, T, 2, I] buffer the routed experts' gate|up raw sums land in (one per batch size)."""
        key = ("experts", b)
        if key not in self._sums:
            cfg = self.cfg
            self._sums[key] = torch.empty(b, cfg.top_k, 2, cfg.moe_intermediate_size, device=self.device)
        return self._sums[key]

    def _shared_idx(self, b: int) -> torch.Tensor:
        """int64 zeros [b, 1]: the shared expert is expert 0 of its stack of one, for every token."""
        key = ("shared_idx", b)
        if key not in self._sums:
            self._sums[key] = torch.zeros(b, 1, dtype=torch.long, device=self.device)
        return self._sums[key]

    def _shared_sums(self, b: int) -> torch.Tensor:
        """The fp32 [b, 1, 2, I_s] buffer of the shared expert's gate|up raw sums."""
        key = ("shared_sums", b)
        if key not in self._sums:
            self._sums[key] = torch.empty(b, 1, 2, self.cfg.shared_expert_intermediate_size, device=self.device)
        return self._sums[key]

    def _moe_out(self, b: int) -> torch.Tensor:
        """The fp32 [b, D] buffer the routed experts' down projections sum into where the stream is not fp32."""
        key = ("moe_out", b)
        if key not in self._sums:
            self._sums[key] = torch.empty(b, self.cfg.hidden_size, device=self.device)
        return self._sums[key]

    def forward_step(self, tokens: torch.Tensor, pos: torch.Tensor, sparse: Optional[bool] = None,
                     record: Optional[Callable[[int, str, torch.Tensor], None]] = None) -> torch.Tensor:
        """Return logits [B, V] for tokens [B] at positions pos (int32 [B]), writing the KV cache (eager).

        `record(layer, op, x)`, if given, sees each op's input (`qkv`, `o`, `gu`, `down`, and `gate_act` =
        act(gate)): what thresholds are calibrated and sparsity measured on.
        """
        sparse = self.rules is not None if sparse is None else sparse
        if sparse and self.rules is None:
            raise RuntimeError("sparse decoding needs thresholds: call set_thresholds or set_plan first")
        x = self.w.embed[tokens]  # [B, D]
        if self.embed_scale is not None:
            x = x * self.embed_scale
        if sparse and self.residual_fp32:
            x = x.float()
            if ("post", x.shape[0]) in self._sums:  # zero between uses; a step cut short may have left sums in it
                self._post_sums(x.shape[0]).zero_()
        for i in range(self.cfg.n_layers):
            x = self._block(i, x, pos, sparse, record)
        logits = self._linear(self._norm(x, self.w.final_norm), self.w.lm_head, None)
        c = self.cfg.final_softcap
        return logits if not c else torch.tanh(logits / c) * c

    # ------------------------------------------------------------------ decoding
    def _new_state(self, b: int) -> _Graph:
        dev = self.device
        return _Graph(graph=None, tok=torch.zeros(b, dtype=torch.long, device=dev),
                      pos=torch.zeros(b, dtype=torch.int32, device=dev),
                      out=torch.zeros(b, self.max_seq_len, dtype=torch.long, device=dev),
                      logits=torch.zeros(b, self.w.lm_head.shape[0], device=dev, dtype=self.dtype))

    def _step(self, st: _Graph, sparse: bool) -> None:
        """One decode step on static buffers: logits, greedy next token, position + 1 (all on device)."""
        logits = self.forward_step(st.tok, st.pos, sparse)
        nxt = self._argmax(logits)
        st.logits.copy_(logits)
        st.tok.copy_(nxt)
        st.out.scatter_(1, (st.pos.long() + 1).clamp_(max=self.max_seq_len - 1)[:, None], nxt[:, None])
        st.pos.add_(1)

    def _state(self, b: int, sparse: bool) -> _Graph:
        key = (b, sparse)
        if key in self._graphs:
            return self._graphs[key]
        st = self._new_state(b)
        if sparse and self.fallback_below == "measured":
            op_times(self, b)  # measured now: never inside the capture below
        if self.use_graphs:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):  # compile kernels, create cuBLAS handles outside the capture
                    self._step(st, sparse)
            torch.cuda.current_stream().wait_stream(s)
            st.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(st.graph):
                self._step(st, sparse)
        self._graphs[key] = st
        return st

    def reset_graphs(self) -> None:
        """Drop the captured decode graphs: the next decode recaptures them (e.g. after an `override_config`,
        whose launch configuration a captured graph keeps)."""
        self._graphs.clear()

    def _run(self, st: _Graph, sparse: bool) -> None:
        if st.graph is not None:
            st.graph.replay()
        else:
            self._step(st, sparse)

    @torch.no_grad()
    def decode(self, prompt: Optional[torch.Tensor], n: int, *, sparse: Optional[bool] = None, batch: int = 1,
               prompt_len: int = 16, seed: int = 0) -> float:
        """Feed `prompt` [B, T] (random tokens if None), greedily decode n tokens; return decode tokens/s (all rows).

        The generated tokens land in `last_tokens` [B, T + n] and the time per step in `last_step_ms`.
        """
        sparse = self.rules is not None if sparse is None else sparse
        if sparse and self.rules is None:
            raise RuntimeError("sparse decoding needs thresholds: call set_thresholds or set_plan first")
        if prompt is None:
            g = torch.Generator().manual_seed(seed)
            prompt = torch.randint(0, self.cfg.vocab_size, (batch, prompt_len), generator=g)
        prompt = prompt.to(self.device)
        b, t0 = prompt.shape
        if b > self.max_batch or t0 + n > self.max_seq_len or t0 < 1 or n < 1:
            raise ValueError(f"need 1 ≤ batch ≤ {self.max_batch}, prompt ≥ 1 token and prompt + n ≤ max_seq_len="
                             f"{self.max_seq_len}; got batch {b}, prompt {t0}, n {n}")
        st = self._state(b, sparse)
        st.pos.zero_()
        st.out.zero_()
        for t in range(t0):  # the prompt goes through the same step, one token at a time
            st.tok.copy_(prompt[:, t])
            self._run(st, sparse)
        st.out[:, :t0] = prompt  # the steps above wrote their predictions over it
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                self._run(st, sparse)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t_start = time.perf_counter()
            for _ in range(n):
                self._run(st, sparse)
            ms = (time.perf_counter() - t_start) * 1e3
        self.last_tokens = st.out[:, : t0 + n].clone()
        self.last_step_ms = ms / n
        return b * n / (ms / 1e3)
