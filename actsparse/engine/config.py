"""Shape and family spec of a Llama-family decoder (Llama, Mistral, Qwen2's q/k/v biases, Qwen3's q/k norms, Gemma
2/3's GeGLU, sandwich norms, scalings, soft-caps and local/global layers, Mixtral's and Qwen3-MoE's routed experts),
with presets for the models the benchmarks use, and what the engine refuses to decode."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LlamaConfig:
    """Everything the engine needs to know about a Llama-family model: its shapes and its family's spec (the
    defaults are Llama's)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q, k and v
    qk_norm: bool = False  # Qwen3, Gemma 3: an RMSNorm over each head of q and of k, before RoPE
    # Gemma 2 and 3
    act: str = "silu"  # the gate's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, gelu_pytorch_tanh)
    norm_f32: bool = False  # RMSNorms scale by their weight (1 + w, kept in float32) before their one cast
    sandwich_norms: bool = False  # attention and MLP outputs are normalised before the residual add
    embed_scale: float = 1.0  # the embedding times this, in its dtype (Gemma: sqrt(hidden_size))
    attn_scale: float = 0.0  # scale of the attention scores (Gemma: query_pre_attn_scalar^-0.5); 0: head_dim^-0.5
    attn_softcap: float = 0.0  # scores <- c·tanh(scores / c) (Gemma 2); 0: off
    final_softcap: float = 0.0  # logits <- c·tanh(logits / c); 0: off
    sliding_window: int = 0  # local layers attend to the last this many positions
    local_layers: tuple[bool, ...] = ()  # per layer: local (sliding window) or global; (): all global
    rope_local_theta: float = 0.0  # RoPE base of the local layers (Gemma 3); 0: rope_theta
    rope_factor: float = 1.0  # linear RoPE scaling of the global layers (Gemma 3): positions / factor
    # Mixture-of-experts MLPs (Mixtral, Qwen3-MoE) in every layer; 0 experts: the dense gated MLP
    n_experts: int = 0
    top_k: int = 0  # experts routed per token
    moe_intermediate_size: int = 0  # each expert's intermediate width
    norm_topk_prob: bool = False  # the top-k routing weights renormalised to sum 1 (Mixtral: always)
    router: str = ""  # "mixtral": the routing weights stay float32; "qwen": cast to the model dtype (as HF does)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a dense expert every token runs, gated by a sigmoid

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def moe(self) -> bool:
        """Whether the MLPs are mixtures of experts."""
        return self.n_experts > 0

    def window(self, layer: int) -> int:
        """The sliding window of a layer: 0 for a global one."""
        return self.sliding_window if self.local_layers and self.local_layers[layer] else 0

    def with_layers(self, n_layers: int) -> "LlamaConfig":
        """Return the same shapes with a different number of layers (for shorter benchmarks); the local/global
        pattern repeats."""
        pattern = self.local_layers
        local = tuple(pattern[i % len(pattern)] for i in range(n_layers)) if pattern else ()
        return replace(self, n_layers=n_layers, local_layers=local)

    @classmethod
    def from_hf(cls, hf_config) -> "LlamaConfig":
        """Return the config of a transformers config of a family the engine decodes (`FAMILIES`)."""
        c = hf_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rope = getattr(c, "rope_parameters", None) or {}
        kind = getattr(c, "model_type", "llama")
        glob, loc = rope.get("full_attention", rope), rope.get("sliding_attention", {})  # Gemma 3: one per layer type
        theta = glob.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        cfg = cls(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
            n_kv_heads=c.num_key_value_heads or c.num_attention_heads, head_dim=head_dim,
            rms_eps=c.rms_norm_eps, rope_theta=theta, tie_embeddings=bool(c.tie_word_embeddings),
            qkv_bias=kind == "qwen2" or (kind == "qwen2_moe" and bool(getattr(c, "qkv_bias", True))),
            qk_norm=kind in ("qwen3", "gemma3_text", "qwen3_moe"),
            rope_factor=float(glob.get("factor", 1.0)) if glob.get("rope_type") == "linear" else 1.0,
        )
        if kind in MOE:
            mixtral = kind == "mixtral"
            cfg = replace(cfg, n_experts=c.num_local_experts if mixtral else c.num_experts,
                          top_k=c.num_experts_per_tok,
                          moe_intermediate_size=c.intermediate_size if mixtral else c.moe_intermediate_size,
                          norm_topk_prob=mixtral or bool(c.norm_topk_prob), router="mixtral" if mixtral else "qwen",
                          shared_expert_intermediate_size=int(getattr(c, "shared_expert_intermediate_size", 0) or 0))
        if kind not in GEMMA:
            window = _sliding_window(c, kind)
            if not window:
                return cfg
            types = getattr(c, "layer_types", None)   # Qwen2/3: the layers from max_window_layers on are local
            local = (tuple(t == "sliding_attention" for t in types) if types and kind != "mistral"
                     else (True,) * c.num_hidden_layers)
            return replace(cfg, sliding_window=window, local_layers=local)
        return replace(
            cfg, act="gelu_tanh", norm_f32=True, sandwich_norms=True, embed_scale=c.hidden_size**0.5,
            attn_scale=c.query_pre_attn_scalar**-0.5,
            # transformers' Gemma3Attention never passes attn_logit_softcapping to its attention: neither does this
            attn_softcap=float(c.attn_logit_softcapping or 0.0) if kind == "gemma2" else 0.0,
            final_softcap=float(c.final_logit_softcapping or 0.0), sliding_window=int(c.sliding_window or 0),
            local_layers=tuple(t == "sliding_attention" for t in c.layer_types),
            rope_local_theta=float(loc.get("rope_theta", 0.0)),
        )


# transformers model_types the engine decodes exactly
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "gemma2", "gemma3_text", "mixtral", "qwen2_moe",
            "qwen3_moe")
GEMMA = ("gemma2", "gemma3_text")
# Mistral's, Qwen2's and Qwen3's blocks with a mixture of experts for the MLP (Qwen2-MoE: plus a shared expert)
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
STATIC_ROPE = ("default", "llama3", "linear", "yarn")  # frequencies the model's rotary module holds fixed
LAYER_TYPES = ("sliding_attention", "full_attention")
# What the engine's block does not model, per transformers model_type: a model of these decodes wrong if its
# weights are copied into a Llama block, so it is refused with the reason instead.
_NOT_MODELLED = {
    "gemma": "Gemma 1's block ((1 + w) norms and GeGLU without Gemma 2's post-norms; not wired)",
    "olmo2": "post-norms and q/k norms",
    "gpt_neox": "parallel attention/MLP, LayerNorms and partial rotary", "gpt2": "LayerNorms, learned positions "
    "and GELU MLPs",
}


def _rope_types(c) -> list[str]:
    """The rope_type of each rotary embedding the config describes (Gemma 3: one per layer type)."""
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    per_type = [r for r in rope.values() if isinstance(r, dict)] or [rope]
    return [r.get("rope_type", r.get("type", "default")) for r in per_type]


def _gemma_reason(c, kind: str) -> str | None:
    """What of a Gemma 2 / Gemma 3 text config the engine does not model (None when it models all of it)."""
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
    if act != "gelu_pytorch_tanh":
        return f"the decode engine's Gemma MLP is GeGLU with gelu_pytorch_tanh; this {kind} model uses {act!r}"
    if getattr(c, "use_bidirectional_attention", False):
        return (f"the decode engine attends causally; this {kind} model sets use_bidirectional_attention, which "
                f"it does not model")
    types = list(getattr(c, "layer_types", None) or [])
    if len(types) != c.num_hidden_layers or any(t not in LAYER_TYPES for t in types):
        return (f"the decode engine's layers are {' or '.join(LAYER_TYPES)}; this {kind} model's layer_types are "
                f"{sorted(set(types))} for {c.num_hidden_layers} layers")
    if "sliding_attention" in types and not getattr(c, "sliding_window", None):
        return f"this {kind} model has sliding_attention layers but no sliding_window"
    return None


def unsupported_reason(hf_config, max_seq_len: int | None = None) -> str | None:
    """Why the engine cannot decode a transformers model of this config exactly (None when it can).

    The engine's block is Llama's: RMSNorm with weight w, RoPE, SwiGLU, no biases but Qwen2's on q/k/v, and Qwen3's
    per-head q/k RMSNorms. Llama, Mistral, Qwen2, Qwen3, Phi-3 (fused q|k|v and gate|up) and Granite (its four
    multipliers folded into the weights) checkpoints are that block; Gemma 2 and Gemma 3's text model are it with
    their spec on (`LlamaConfig`: (1 + w) norms folded at load, GeGLU, sandwich norms, embedding and attention
    scales, soft-caps, local/global layers, Gemma 3's q/k norms and per-layer-type RoPE). Mixtral and Qwen3-MoE are
    Mistral's and Qwen3's block with a mixture of SwiGLU experts in every layer (router, top-k, softmax weights),
    Qwen2-MoE Qwen2's with them and a sigmoid-gated shared expert; Qwen-MoE's dense layers (mlp_only_layers,
    decoder_sparse_step) are not modelled. Anything it does not
    compute (another family, another bias, another activation, another attention pattern) would decode
    wrong tokens silently, so it is refused before any weight is copied."""
    c = hf_config
    kind = getattr(c, "model_type", "?")
    if kind == "gemma3":
        return ("the decode engine runs Gemma 3's text model (Gemma3ForCausalLM, model_type gemma3_text), not the "
                "multimodal Gemma3ForConditionalGeneration (model_type gemma3: a vision tower and image tokens); "
                "load the checkpoint's language model as Gemma3ForCausalLM")
    if kind not in FAMILIES:
        what = _NOT_MODELLED.get(kind, "a block other than Llama's")
        return (f"the decode engine runs {', '.join(FAMILIES)} models exactly; {kind} needs {what}, which it "
                f"does not model")
    moving = [t for t in _rope_types(c) if t not in STATIC_ROPE]
    if moving:
        return (f"the decode engine's RoPE frequencies are fixed; this {kind} model's rope_type {moving[0]!r} "
                f"changes them with the sequence length")
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if float(rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        return f"the decode engine rotates whole heads; this {kind} model rotates part of each (partial_rotary_factor)"
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(c, flag, False):
            return f"the decode engine's projections have no biases; this {kind} model sets {flag}"
    if kind in GEMMA:
        return _gemma_reason(c, kind)  # local layers are modelled: no limit on the sequence
    if kind in ("qwen2_moe", "qwen3_moe"):
        dense = list(getattr(c, "mlp_only_layers", None) or [])
        step = getattr(c, "decoder_sparse_step", 1)
        if dense or step != 1 or not c.num_experts:
            return (f"the decode engine's mixture-of-experts models have experts in every layer; this {kind} model "
                    f"has dense MLP layers (mlp_only_layers={dense}, decoder_sparse_step={step}, "
                    f"num_experts={c.num_experts})")
    act = getattr(c, "hidden_act", "silu")
    if act != "silu":
        return f"the decode engine's MLP is SwiGLU (silu); this {kind} model uses {act!r}"
    types = set(getattr(c, "layer_types", None) or ())
    if _sliding_window(c, kind) and not types <= set(LAYER_TYPES):
        return f"this {kind} model has layer types {sorted(types - set(LAYER_TYPES))}, which the engine does not model"
    return None


def _sliding_window(c, kind: str) -> int:
    """The window of a Llama-block model's local layers (0: none): Mistral's on every layer; Qwen's only when
    use_sliding_window turns it on (their configs carry a window either way)."""
    if kind in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not getattr(c, "use_sliding_window", False):
        return 0
    return int(getattr(c, "sliding_window", None) or 0)


LLAMA3_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, n_layers=32, n_heads=32,
                        n_kv_heads=8, head_dim=128, rms_eps=1e-5, rope_theta=500000.0)
LLAMA3_70B = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, n_layers=80, n_heads=64,
                         n_kv_heads=8, head_dim=128, rms_eps=1e-5, rope_theta=500000.0)
LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, n_layers=32, n_heads=32,
                        n_kv_heads=32, head_dim=128, rms_eps=1e-5, rope_theta=10000.0)
TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=16, rms_eps=1e-6, rope_theta=10000.0)

# The other families' 7-8B-class shapes (their published config.json), for random-weight speed measurements.
QWEN2_5_7B = LlamaConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, n_layers=28, n_heads=28,
                         n_kv_heads=4, head_dim=128, rms_eps=1e-6, rope_theta=1e6, qkv_bias=True)
QWEN3_8B = LlamaConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288, n_layers=36, n_heads=32,
                       n_kv_heads=8, head_dim=128, rms_eps=1e-6, rope_theta=1e6, qk_norm=True)
PHI3_MINI = LlamaConfig(vocab_size=32064, hidden_size=3072, intermediate_size=8192, n_layers=32, n_heads=32,
                        n_kv_heads=32, head_dim=96, rms_eps=1e-5, rope_theta=1e4)
GRANITE3_8B = LlamaConfig(vocab_size=49155, hidden_size=4096, intermediate_size=12800, n_layers=40, n_heads=32,
                          n_kv_heads=8, head_dim=128, rms_eps=1e-5, rope_theta=1e7, tie_embeddings=True)

# Gemma 2 9B and Gemma 3 12B (text): GeGLU, (1 + w) sandwich norms, embedding scale sqrt(hidden), scores scaled by
# query_pre_attn_scalar^-0.5; Gemma 2 alternates local (window 4096) and global layers and soft-caps scores at 50
# and logits at 30; Gemma 3 has five local layers (window 1024, RoPE base 1e4) to one global (base 1e6, linear
# factor 8) and q/k norms.
_GEMMA = dict(act="gelu_tanh", norm_f32=True, sandwich_norms=True, rms_eps=1e-6, tie_embeddings=True,
              attn_scale=256**-0.5, n_heads=16, n_kv_heads=8, head_dim=256)
GEMMA2_9B = LlamaConfig(vocab_size=256000, hidden_size=3584, intermediate_size=14336, n_layers=42, rope_theta=1e4,
                        embed_scale=3584**0.5, attn_softcap=50.0, final_softcap=30.0, sliding_window=4096,
                        local_layers=tuple(i % 2 == 0 for i in range(42)), **_GEMMA)
GEMMA3_12B = LlamaConfig(vocab_size=262208, hidden_size=3840, intermediate_size=15360, n_layers=48, rope_theta=1e6,
                         rope_factor=8.0, rope_local_theta=1e4, qk_norm=True, embed_scale=3840**0.5,
                         sliding_window=1024, local_layers=tuple((i + 1) % 6 != 0 for i in range(48)), **_GEMMA)

# Mixture-of-experts shapes (their published config.json): Qwen3-30B-A3B (128 experts of 768, top-8, q/k norms)
# and Mixtral 8x7B (8 experts of 14336, top-2).
QWEN3_30B_A3B = LlamaConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, n_layers=48, n_heads=32,
                            n_kv_heads=4, head_dim=128, rms_eps=1e-6, rope_theta=1e6, qk_norm=True, n_experts=128,
                            top_k=8, moe_intermediate_size=768, norm_topk_prob=True, router="qwen")
MIXTRAL_8X7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, n_layers=32, n_heads=32,
                           n_kv_heads=8, head_dim=128, rms_eps=1e-5, rope_theta=1e6, n_experts=8, top_k=2,
                           moe_intermediate_size=14336, norm_topk_prob=True, router="mixtral")

# Qwen1.5-MoE-A2.7B (model_type qwen2_moe): 60 experts of 1408, top-4 (not renormalised), a shared expert of 5632.
QWEN1_5_MOE_A2_7B = LlamaConfig(vocab_size=151936, hidden_size=2048, intermediate_size=5632, n_layers=24, n_heads=16,
                                n_kv_heads=16, head_dim=128, rms_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                                n_experts=60, top_k=4, moe_intermediate_size=1408, norm_topk_prob=False,
                                router="qwen", shared_expert_intermediate_size=5632)

PRESETS = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B, "llama2-7b": LLAMA2_7B, "qwen2.5-7b": QWEN2_5_7B,
           "qwen3-8b": QWEN3_8B, "phi3-mini": PHI3_MINI, "granite3-8b": GRANITE3_8B, "gemma2-9b": GEMMA2_9B, "gemma3-12b": GEMMA3_12B,
           "qwen3-30b-a3b": QWEN3_30B_A3B, "mixtral-8x7b": MIXTRAL_8X7B,
           "qwen1.5-moe-a2.7b": QWEN1_5_MOE_A2_7B, "tiny": TINY}
