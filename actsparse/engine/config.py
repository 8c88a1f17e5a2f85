"""Shape of a Llama-family decoder (Llama, Mistral, Qwen2's q/k/v biases, Qwen3's q/k norms), with presets for
the models the benchmarks use, and what the engine refuses to decode."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LlamaConfig:
    """Everything the engine needs to know about a Llama-family model's shapes."""

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
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head of q and of k, before RoPE

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def with_layers(self, n_layers: int) -> "LlamaConfig":
        """Return the same shapes with a different number of layers (for shorter benchmarks)."""
        return replace(self, n_layers=n_layers)

    @classmethod
    def from_hf(cls, hf_config) -> "LlamaConfig":
        """Return the config of a transformers LlamaConfig."""
        c = hf_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rope = getattr(c, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        kind = getattr(c, "model_type", "llama")
        return cls(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
            n_kv_heads=c.num_key_value_heads or c.num_attention_heads, head_dim=head_dim,
            rms_eps=c.rms_norm_eps, rope_theta=theta, tie_embeddings=bool(c.tie_word_embeddings),
            qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3",
        )


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite")
STATIC_ROPE = ("default", "llama3", "linear", "yarn")  # frequencies the model's rotary module holds fixed  # transformers model_types the engine decodes exactly
# What the engine's block does not model, per transformers model_type: a model of these decodes wrong if its
# weights are copied into a Llama block, so it is refused with the reason instead.
_NOT_MODELLED = {
    "gemma": "(1 + w) RMSNorms, GeGLU and the embedding scale", "gemma2": "(1 + w) pre/post norms, GeGLU, "
    "soft-capping and local/global attention", "gemma3": "(1 + w) pre/post norms, q/k norms, GeGLU and "
    "local/global attention", "gemma3_text": "(1 + w) pre/post norms, q/k norms, GeGLU and local/global attention",
    "olmo2": "post-norms and q/k norms", "mixtral": "mixture-of-experts MLPs",
    "qwen2_moe": "mixture-of-experts MLPs", "qwen3_moe": "mixture-of-experts MLPs and q/k norms",
    "gpt_neox": "parallel attention/MLP, LayerNorms and partial rotary", "gpt2": "LayerNorms, learned positions "
    "and GELU MLPs",
}


def unsupported_reason(hf_config, max_seq_len: int | None = None) -> str | None:
    """Why the engine cannot decode a transformers model of this config exactly (None when it can).

    The engine's block is Llama's: RMSNorm with weight w, RoPE, SwiGLU, no biases but Qwen2's on q/k/v, and Qwen3's
    per-head q/k RMSNorms. Llama, Mistral, Qwen2, Qwen3, Phi-3 (fused q|k|v and gate|up) and Granite (its four
    multipliers folded into the weights) checkpoints are that block; anything it does not compute
    (another family, another bias, another activation, a sliding window shorter than the sequence) would decode
    wrong tokens silently, so it is refused before any weight is copied."""
    c = hf_config
    kind = getattr(c, "model_type", "?")
    if kind not in FAMILIES:
        what = _NOT_MODELLED.get(kind, "a block other than Llama's")
        return (f"the decode engine runs {', '.join(FAMILIES)} models exactly; {kind} needs {what}, which it "
                f"does not model")
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in STATIC_ROPE:
        return (f"the decode engine's RoPE frequencies are fixed; this {kind} model's rope_type "
                f"{rope.get('rope_type', rope.get('type'))!r} changes them with the sequence length")
    if float(rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        return f"the decode engine rotates whole heads; this {kind} model rotates part of each (partial_rotary_factor)"
    act = getattr(c, "hidden_act", "silu")
    if act != "silu":
        return f"the decode engine's MLP is SwiGLU (silu); this {kind} model uses {act!r}"
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(c, flag, False):
            return f"the decode engine's projections have no biases; this {kind} model sets {flag}"
    window = getattr(c, "sliding_window", None)
    if kind in ("qwen2", "qwen3") and not getattr(c, "use_sliding_window", False):
        window = None  # Qwen configs carry a window that only use_sliding_window turns on
    if window and max_seq_len is not None and max_seq_len > window:
        return (f"the decode engine attends to the whole cache; this {kind} model's sliding window ({window}) is "
                f"shorter than max_seq_len={max_seq_len} (lower it to {window} or less)")
    return None


LLAMA3_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, n_layers=32, n_heads=32,
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

PRESETS = {"llama3-8b": LLAMA3_8B, "llama2-7b": LLAMA2_7B, "qwen2.5-7b": QWEN2_5_7B, "qwen3-8b": QWEN3_8B,
           "phi3-mini": PHI3_MINI, "granite3-8b": GRANITE3_8B, "tiny": TINY}
