"""Shape of a Llama-family decoder, with presets for the models the benchmarks use."""

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
        return cls(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
            n_kv_heads=c.num_key_value_heads or c.num_attention_heads, head_dim=head_dim,
            rms_eps=c.rms_norm_eps, rope_theta=theta, tie_embeddings=bool(c.tie_word_embeddings),
        )


LLAMA3_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, n_layers=32, n_heads=32,
                        n_kv_heads=8, head_dim=128, rms_eps=1e-5, rope_theta=500000.0)
LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, n_layers=32, n_heads=32,
                        n_kv_heads=32, head_dim=128, rms_eps=1e-5, rope_theta=10000.0)
TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=16, rms_eps=1e-6, rope_theta=10000.0)

PRESETS = {"llama3-8b": LLAMA3_8B, "llama2-7b": LLAMA2_7B, "tiny": TINY}
