"""Tiny random models, a byte tokenizer and their calibration stats, shared by the method tests."""
from __future__ import annotations

import pytest
import torch

import actsparse as asp


class ByteTok:
    """A byte-level tokenizer: enough of the HF tokenizer interface for calibrate() and perplexity()."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, **kwargs):
        return {"input_ids": [b + 1 for b in text.encode("utf-8")][:4096]}


def _tiny(cfg, cls, seed: int):
    torch.manual_seed(seed)
    m = cls(cfg).eval()
    m.requires_grad_(False)
    return m


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny(LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
                 LlamaForCausalLM, seed)


def tiny_qwen2(seed: int = 0, layers: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _tiny(Qwen2Config(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
                 Qwen2ForCausalLM, seed)


def tiny_gelu(seed: int = 0, layers: int = 2):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return _tiny(GPTNeoXConfig(vocab_size=260, hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
                               num_attention_heads=4, max_position_embeddings=256, hidden_act="gelu"),
                 GPTNeoXForCausalLM, seed)


def random_norms(model, seed):
    """Norm weights far from 1, so that folding them (or not) makes a difference."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = torch.rand(p.shape, generator=g) * 1.5 + 0.25
    return model


@pytest.fixture(scope="session")
def tok():
    return ByteTok()


def _calib(model, tok):
    return asp.calibrate(model, tok, tokens=1024, seq_len=64, batch_size=8, sample_size=8192, progress=False)


@pytest.fixture(scope="session")
def llama(tok):
    m = tiny_llama()
    return m, _calib(m, tok)


@pytest.fixture(scope="session")
def gelu(tok):
    m = tiny_gelu()
    return m, _calib(m, tok)


def fresh_x(model, shape=(3, 5), seed=1):
    """Random hidden states [*shape, H] with the scale of the model's MLP inputs."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, model.config.hidden_size, generator=g)


def np_quantile_abs(v, q, shift=0.0):
    """Independent reference: numpy's linear quantile of |v - shift|."""
    import numpy as np

    return float(np.quantile(np.abs(v.double().numpy() - shift), q))
