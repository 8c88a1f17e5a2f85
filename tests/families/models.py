"""Tiny random models of every family actsparse supports, built from transformers configs (vocab 300)."""
from __future__ import annotations

import torch

VOCAB = 300
# family -> (roles of block 0 in order, dense gated MLP?, causal LM?)
FAMILIES = {
    "llama": (["q", "k", "v", "o", "gate", "up", "down"], True, True),
    "mistral": (["q", "k", "v", "o", "gate", "up", "down"], True, True),
    "qwen2": (["q", "k", "v", "o", "gate", "up", "down"], True, True),
    "qwen3": (["q", "k", "v", "o", "gate", "up", "down"], True, True),
    "gemma": (["q", "k", "v", "o", "gate", "up", "down"], True, True),
    "neox": (["qkv", "o", "up", "down"], False, True),
    "gpt2": (["qkv", "o", "up", "down"], False, True),
    "mixtral": (["q", "k", "v", "o"] + [f"expert{e}.{r}" for e in range(4) for r in ("gate", "up", "down")], False, True),
    "qwen2_moe": (["q", "k", "v", "o", "shared_expert.gate", "shared_expert.up", "shared_expert.down"]
                  + [f"expert{e}.{r}" for e in range(4) for r in ("gate", "up", "down")], False, True),
    "qwen3_moe": (["q", "k", "v", "o"] + [f"expert{e}.{r}" for e in range(4) for r in ("gate", "up", "down")], False, True),
    "bert": (["q", "k", "v", "o", "up", "down"], False, False),
    "mamba2": (["up", "down"], False, True),
}


def make_family(kind: str, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """Return a tiny random model of the family, in eval mode, fp32."""
    import transformers as tr

    torch.manual_seed(seed)
    att = dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, vocab_size=VOCAB)
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=32)
    if kind == "llama":
        m = tr.LlamaForCausalLM(tr.LlamaConfig(intermediate_size=128, **att))
    elif kind == "mistral":
        m = tr.MistralForCausalLM(tr.MistralConfig(intermediate_size=128, sliding_window=64, **att))
    elif kind == "qwen2":
        m = tr.Qwen2ForCausalLM(tr.Qwen2Config(intermediate_size=128, **att))
    elif kind == "qwen3":
        m = tr.Qwen3ForCausalLM(tr.Qwen3Config(intermediate_size=128, head_dim=16, **att))
    elif kind == "gemma":
        m = tr.GemmaForCausalLM(tr.GemmaConfig(intermediate_size=128, head_dim=16, **att))
    elif kind == "neox":
        m = tr.GPTNeoXForCausalLM(tr.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256,
                                                   num_hidden_layers=layers, num_attention_heads=4,
                                                   max_position_embeddings=512, eos_token_id=0, bos_token_id=0))
    elif kind == "gpt2":
        m = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=512,
                                             eos_token_id=0, bos_token_id=0))
    elif kind == "mixtral":
        m = tr.MixtralForCausalLM(tr.MixtralConfig(intermediate_size=32, num_local_experts=4,
                                                   num_experts_per_tok=2, **att))
    elif kind == "qwen2_moe":
        m = tr.Qwen2MoeForCausalLM(tr.Qwen2MoeConfig(intermediate_size=128, num_experts=4,
                                                     shared_expert_intermediate_size=48, **moe, **att))
    elif kind == "qwen3_moe":
        m = tr.Qwen3MoeForCausalLM(tr.Qwen3MoeConfig(intermediate_size=128, num_experts=4, head_dim=16, **moe, **att))
    elif kind == "bert":
        m = tr.BertModel(tr.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers,
                                       num_attention_heads=4, intermediate_size=128, max_position_embeddings=512))
    elif kind == "mamba2":
        m = tr.Mamba2ForCausalLM(tr.Mamba2Config(vocab_size=VOCAB, hidden_size=64, state_size=16,
                                                 num_hidden_layers=layers, expand=2, head_dim=16, num_heads=8,
                                                 n_groups=1, chunk_size=32))
    else:
        raise ValueError(f"unknown family {kind!r}")
    m.eval()
    m.requires_grad_(False)
    return m


def model_output(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits for causal LMs, last hidden state for encoders: [B, T, *]."""
    out = model(ids, use_cache=False) if not type(model).__name__.startswith("Bert") else model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
