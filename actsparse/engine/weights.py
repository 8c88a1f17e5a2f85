"""Engine weights: loaded from a transformers Llama, Mistral, Qwen2, Qwen3, Phi-3, Granite, Gemma 2, Gemma 3
(text), Mixtral, Qwen2-MoE or Qwen3-MoE model or drawn at random, in the layouts each path reads.

Dense (cuBLAS) reads nn.Linear's natural [out, in] layout, fused per op (q|k|v, gate|up). The
sparse kernels read the transposed [in, out] layout, where a skipped input channel is one
contiguous row. The CATS path reads W_up in its natural layout (a skipped intermediate
channel is one contiguous row there). `layouts` picks which copies are kept. A mixture-of-experts layer keeps
its experts stacked in the sparse layout only (gate and up [E, D, I], down [E, I, D]): a copy per layout would
double the largest part of the model, and both paths read the routed experts through it.

Gemma's RMSNorms multiply by 1 + w in float32 before their one cast: the engine stores 1 + w, in float32 (every
norm reads its weight as float32), so the fold loses nothing in bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .config import GEMMA, LlamaConfig

LAYOUTS = ("dense", "sparse", "both")


@dataclass
class LayerWeights:
    """One decoder block's parameters; absent layouts are None."""

    attn_norm: torch.Tensor  # [D]
    mlp_norm: torch.Tensor  # [D]
    wqkv: Optional[torch.Tensor] = None  # [Nq + 2·Nkv, D]
    wo: Optional[torch.Tensor] = None  # [D, Nq]
    w13: Optional[torch.Tensor] = None  # [2I, D]: gate rows, then up rows
    wd: Optional[torch.Tensor] = None  # [D, I]
    wqkv_t: Optional[torch.Tensor] = None  # [D, Nq + 2·Nkv]
    wo_t: Optional[torch.Tensor] = None  # [Nq, D]
    wg_t: Optional[torch.Tensor] = None  # [D, I]
    wu_t: Optional[torch.Tensor] = None  # [D, I]
    wd_t: Optional[torch.Tensor] = None  # [I, D]
    wu: Optional[torch.Tensor] = None  # [I, D] natural layout, for the CATS row gather
    wg: Optional[torch.Tensor] = None  # [I, D] natural layout, for the COUNTDOWN row gather
    bqkv: Optional[torch.Tensor] = None  # [Nq + 2·Nkv] q/k/v biases (Qwen2)
    q_norm: Optional[torch.Tensor] = None  # [head_dim] per-head RMSNorm weights of q and k (Qwen3, Gemma 3)
    k_norm: Optional[torch.Tensor] = None
    post_attn_norm: Optional[torch.Tensor] = None  # [D] norms of the attention and MLP outputs (Gemma 2/3)
    post_mlp_norm: Optional[torch.Tensor] = None
    # A mixture-of-experts MLP (Mixtral, Qwen3-MoE): the router and the experts stacked in the sparse layout only,
    # whatever `layouts` asks (the dense path reads the routed experts through the same layout)
    router: Optional[torch.Tensor] = None  # [E, D]
    weg_t: Optional[torch.Tensor] = None  # [E, D, I_e] each expert's gate, transposed
    weu_t: Optional[torch.Tensor] = None  # [E, D, I_e] up
    wed_t: Optional[torch.Tensor] = None  # [E, I_e, D] down
    # Qwen2-MoE's shared expert, a stack of one in the same layout, and its sigmoid gate's weight [1, D]
    wsg_t: Optional[torch.Tensor] = None  # [1, D, I_s]
    wsu_t: Optional[torch.Tensor] = None  # [1, D, I_s]
    wsd_t: Optional[torch.Tensor] = None  # [1, I_s, D]
    shared_gate: Optional[torch.Tensor] = None  # [1, D]


@dataclass
class Weights:
    """All parameters of the decoder plus its RoPE frequencies."""

    embed: torch.Tensor  # [V, D]
    final_norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]
    inv_freq: torch.Tensor  # [head_dim/2] float32
    rope_scale: float
    layers: list[LayerWeights] = field(default_factory=list)
    inv_freq_local: Optional[torch.Tensor] = None  # the local layers' own RoPE (Gemma 3); None: inv_freq
    rope_scale_local: float = 1.0

    def rope(self, local: bool) -> tuple[torch.Tensor, float]:
        """(inv_freq, rope_scale) of a local (sliding-window) or global layer."""
        if local and self.inv_freq_local is not None:
            return self.inv_freq_local, self.rope_scale_local
        return self.inv_freq, self.rope_scale


def _layer(attn_norm, mlp_norm, q, k, v, o, gate, up, down, layouts: str) -> LayerWeights:
    """Pack one block from nn.Linear-layout tensors into the requested layouts (gate, up, down None: an MoE
    block, whose experts the caller stores)."""
    lw = LayerWeights(attn_norm=attn_norm.contiguous(), mlp_norm=mlp_norm.contiguous())
    if gate is None:
        if layouts in ("dense", "both"):
            lw.wqkv, lw.wo = torch.cat([q, k, v], dim=0).contiguous(), o.contiguous()
        if layouts in ("sparse", "both"):
            lw.wqkv_t, lw.wo_t = torch.cat([q, k, v], dim=0).t().contiguous(), o.t().contiguous()
        return lw
    if layouts in ("dense", "both"):
        lw.wqkv = torch.cat([q, k, v], dim=0).contiguous()
        lw.wo = o.contiguous()
        lw.w13 = torch.cat([gate, up], dim=0).contiguous()
        lw.wd = down.contiguous()
        lw.wu = lw.w13[gate.shape[0]:]  # contiguous rows of w13
        lw.wg = lw.w13[:gate.shape[0]]
    if layouts in ("sparse", "both"):
        lw.wqkv_t = torch.cat([q, k, v], dim=0).t().contiguous()
        lw.wo_t = o.t().contiguous()
        lw.wg_t = gate.t().contiguous()
        lw.wu_t = up.t().contiguous()
        lw.wd_t = down.t().contiguous()
        if lw.wu is None:
            lw.wu = up.contiguous()
    return lw


def default_inv_freq(cfg: LlamaConfig, device, theta: Optional[float] = None, factor: float = 1.0) -> torch.Tensor:
    """Return the RoPE frequencies 1/θ^(2i/d) / factor (θ: cfg.rope_theta by default; factor: linear scaling)."""
    d = cfg.head_dim
    theta = cfg.rope_theta if theta is None else theta
    return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)) / factor


def check_layouts(layouts: str) -> None:
    if layouts not in LAYOUTS:
        raise ValueError(f"layouts must be one of {LAYOUTS}, got {layouts!r}")


def _rotary(rot, prefix: str) -> Optional[tuple[torch.Tensor, float]]:
    """(inv_freq, attention scaling) of a transformers rotary module (`prefix`: Gemma 3's layer type), or None."""
    inv = getattr(rot, f"{prefix}inv_freq", None)
    return None if inv is None else (inv, float(getattr(rot, f"{prefix}attention_scaling", 1.0)))


@torch.no_grad()
def weights_from_hf(model, device, dtype: torch.dtype, layouts: str = "both") -> Weights:
    """Return the weights of a transformers model of a family the engine decodes (`config.FAMILIES`), copied to
    `device` in `dtype` (Gemma's norms as 1 + w in float32)."""
    check_layouts(layouts)
    inner = model.model

    def cp(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=device, dtype=dtype)

    layers = []
    c = model.config
    kind = getattr(c, "model_type", "")
    qkv_bias = kind == "qwen2"
    gemma = kind in GEMMA

    def norm(m) -> torch.Tensor:
        return (1.0 + m.weight.detach().float()).to(device) if gemma else cp(m.weight)

    # Granite scales the embeddings, each block's output before the residual add, the attention scores (instead of
    # 1/sqrt(head_dim)) and the logits: all linear, so folded into the embedding, o and down, q, and the LM head.
    granite = {} if kind != "granite" else {
        "embed": c.embedding_multiplier, "residual": c.residual_multiplier, "logits": 1.0 / c.logits_scaling,
        "q": c.attention_multiplier * math.sqrt(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)}
    for blk in inner.layers:
        at, mlp = blk.self_attn, blk.mlp
        if hasattr(mlp, "experts"):
            layers.append(_moe_layer(blk, cp, layouts, c.qkv_bias if kind == "qwen2_moe" else False))
            continue
        fused = hasattr(at, "qkv_proj")  # Phi-3: q|k|v and gate|up are one linear each
        qkv_projs = (at.qkv_proj,) if fused else (at.q_proj, at.k_proj, at.v_proj)
        mlp_projs = (mlp.gate_up_proj, mlp.down_proj) if fused else (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        for proj in (at.o_proj, *mlp_projs, *(() if qkv_bias else qkv_projs)):
            if getattr(proj, "bias", None) is not None:
                raise ValueError("the engine's projections have no biases but Qwen2's q/k/v; got a biased "
                                 f"{type(proj).__name__} in {type(at).__name__}")
        o, down = cp(at.o_proj.weight), cp(mlp.down_proj.weight)
        if fused:
            nq = at.o_proj.in_features
            nkv = (at.qkv_proj.out_features - nq) // 2
            q, k, v = cp(at.qkv_proj.weight).split([nq, nkv, nkv])
            gate, up = cp(mlp.gate_up_proj.weight).chunk(2)
        else:
            q, k, v = cp(at.q_proj.weight), cp(at.k_proj.weight), cp(at.v_proj.weight)
            gate, up = cp(mlp.gate_proj.weight), cp(mlp.up_proj.weight)
        if granite:
            q, o, down = q * granite["q"], o * granite["residual"], down * granite["residual"]
        # Gemma's post_attention_layernorm normalises the attention output; its MLP's input norm is
        # pre_feedforward_layernorm. Llama's post_attention_layernorm is the MLP's input norm.
        mlp_norm = blk.pre_feedforward_layernorm if gemma else blk.post_attention_layernorm
        lw = _layer(norm(blk.input_layernorm), norm(mlp_norm), q, k, v, o, gate, up, down, layouts)
        if gemma:
            lw.post_attn_norm = norm(blk.post_attention_layernorm)
            lw.post_mlp_norm = norm(blk.post_feedforward_layernorm)
        if qkv_bias:
            lw.bqkv = torch.cat([cp(at.q_proj.bias), cp(at.k_proj.bias), cp(at.v_proj.bias)])
        if getattr(at, "q_norm", None) is not None:
            lw.q_norm, lw.k_norm = norm(at.q_norm), norm(at.k_norm)
        layers.append(lw)
    embed = cp(inner.embed_tokens.weight)
    tied = model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()
    lm_head = embed if tied else cp(model.lm_head.weight)  # one copy of a tied matrix
    if granite:  # out of place: a tied head may be the embedding's own tensor
        embed, lm_head = embed * granite["embed"], lm_head * granite["logits"]
    return Weights(embed=embed, final_norm=norm(inner.norm), lm_head=lm_head, layers=layers,
                   **rope_weights(inner.rotary_emb, device))


def _moe_layer(blk, cp, layouts: str, qkv_bias: bool) -> LayerWeights:
    """One Mixtral / Qwen2-MoE / Qwen3-MoE block: attention as any Llama block's, the router, and the experts stacked
    in the sparse layout (transformers keeps them as 3-D parameters: gate|up [E, 2I, D], down [E, D, I]); Qwen2-MoE's
    shared expert as a stack of one beside them, and its gate."""
    at, moe = blk.self_attn, blk.mlp
    ex = moe.experts
    if not (hasattr(ex, "gate_up_proj") and hasattr(ex, "down_proj")) or getattr(moe.gate, "bias", None) is not None:
        raise ValueError(f"the engine reads a mixture-of-experts layer's experts as fused 3-D gate_up_proj / down_proj "
                         f"parameters and an unbiased router; got {type(ex).__name__} in {type(moe).__name__}")
    biased = (at.o_proj,) if qkv_bias else (at.q_proj, at.k_proj, at.v_proj, at.o_proj)
    for proj in biased:
        if getattr(proj, "bias", None) is not None:
            raise ValueError(f"the engine's mixture-of-experts attention has no biases but Qwen2-MoE's on q/k/v; got "
                             f"a biased {type(at).__name__}")
    lw = _layer(cp(blk.input_layernorm.weight), cp(blk.post_attention_layernorm.weight), cp(at.q_proj.weight),
                cp(at.k_proj.weight), cp(at.v_proj.weight), cp(at.o_proj.weight), None, None, None, layouts)
    lw.router = cp(moe.gate.weight).contiguous()
    gate, up = cp(ex.gate_up_proj).chunk(2, dim=1)  # [E, I, D] each
    lw.weg_t, lw.weu_t = gate.transpose(1, 2).contiguous(), up.transpose(1, 2).contiguous()
    lw.wed_t = cp(ex.down_proj).transpose(1, 2).contiguous()
    if getattr(at, "q_norm", None) is not None:
        lw.q_norm, lw.k_norm = cp(at.q_norm.weight), cp(at.k_norm.weight)
    if qkv_bias:
        lw.bqkv = torch.cat([cp(at.q_proj.bias), cp(at.k_proj.bias), cp(at.v_proj.bias)])
    se = getattr(moe, "shared_expert", None)
    if se is not None:
        lw.wsg_t, lw.wsu_t, lw.wsd_t = (cp(m.weight).t().contiguous()[None] for m in (se.gate_proj, se.up_proj,
                                                                                      se.down_proj))
        lw.shared_gate = cp(moe.shared_expert_gate.weight).contiguous()
    return lw


def rope_weights(rot, device) -> dict:
    """Weights' RoPE fields (inv_freq, rope_scale and, for Gemma 3's local layers, inv_freq_local and
    rope_scale_local) from a transformers rotary module, on `device` in float32."""
    local = _rotary(rot, "sliding_attention_")  # Gemma 3: each layer type has its own frequencies
    glob = _rotary(rot, "full_attention_") or _rotary(rot, "") or local
    out = {"inv_freq": glob[0].detach().to(device=device, dtype=torch.float32), "rope_scale": glob[1]}
    if local is not None and local is not glob:
        out |= {"inv_freq_local": local[0].detach().to(device=device, dtype=torch.float32),
                "rope_scale_local": local[1]}
    return out


@torch.no_grad()
def random_weights(cfg: LlamaConfig, device, dtype: torch.dtype, seed: int = 0, layouts: str = "both") -> Weights:
    """Return weights drawn like a freshly initialised model (normal, std 1/sqrt(fan_in)), norms at 1, the scaled
    embedding at unit RMS."""
    check_layouts(layouts)
    gen = torch.Generator(device=device).manual_seed(seed)
    d, i = cfg.hidden_size, cfg.intermediate_size

    def lin(n_out: int, n_in: int) -> torch.Tensor:
        w = torch.empty(n_out, n_in, device=device, dtype=dtype)
        return w.normal_(0.0, 1.0 / math.sqrt(n_in), generator=gen)

    def ones(n: int = d) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=torch.float32 if cfg.norm_f32 else dtype)

    def experts(n_in: int, n_out: int) -> torch.Tensor:
        """[E, n_in, n_out]: each expert's transposed weight, drawn in place (no natural-layout copy)."""
        w = torch.empty(cfg.n_experts, n_in, n_out, device=device, dtype=dtype)
        return w.normal_(0.0, 1.0 / math.sqrt(n_in), generator=gen)

    layers = []
    for _ in range(cfg.n_layers):
        mlp = (None, None, None) if cfg.moe else (lin(i, d), lin(i, d), lin(d, i))
        lw = _layer(ones(), ones(), lin(cfg.q_size, d), lin(cfg.kv_size, d), lin(cfg.kv_size, d),
                    lin(d, cfg.q_size), *mlp, layouts)
        if cfg.moe:
            ie = cfg.moe_intermediate_size
            lw.router = lin(cfg.n_experts, d)
            lw.weg_t, lw.weu_t, lw.wed_t = experts(d, ie), experts(d, ie), experts(ie, d)
            if cfg.shared_expert_intermediate_size:
                i_s = cfg.shared_expert_intermediate_size
                lw.wsg_t, lw.wsu_t, lw.wsd_t = lin(i_s, d).t()[None], lin(i_s, d).t()[None], lin(d, i_s).t()[None]
                lw.wsg_t, lw.wsu_t, lw.wsd_t = (w.contiguous() for w in (lw.wsg_t, lw.wsu_t, lw.wsd_t))
                lw.shared_gate = lin(1, d)
        if cfg.qkv_bias:
            lw.bqkv = lin(1, cfg.q_size + 2 * cfg.kv_size)[0]
        if cfg.qk_norm:
            lw.q_norm, lw.k_norm = ones(cfg.head_dim), ones(cfg.head_dim)
        if cfg.sandwich_norms:
            lw.post_attn_norm, lw.post_mlp_norm = ones(), ones()
        layers.append(lw)
    embed = torch.empty(cfg.vocab_size, d, device=device, dtype=dtype).normal_(0.0, 1.0 / cfg.embed_scale,
                                                                                 generator=gen)
    lm_head = embed if cfg.tie_embeddings else lin(cfg.vocab_size, d)
    w = Weights(embed=embed, final_norm=ones(), lm_head=lm_head,
                inv_freq=default_inv_freq(cfg, device, factor=cfg.rope_factor), rope_scale=1.0, layers=layers)
    if cfg.rope_local_theta:
        w.inv_freq_local = default_inv_freq(cfg, device, theta=cfg.rope_local_theta)
    return w
