"""A BPE tokenizer trained on the bundled calibration text and a tiny random Llama over its vocabulary."""
from __future__ import annotations

import pytest
import torch

VOCAB = 1024


@pytest.fixture(scope="session")
def bpe_tok():
    """A byte-level BPE (vocab 1024) trained on bundled:calib, so bundled text tokenizes compactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import actsparse as asp

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(asp.text_data("bundled:calib").documents,
                           trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def llama_1k():
    """A tiny random Llama (2 blocks, hidden 64) over the 1024-token vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    m = LlamaForCausalLM(cfg).eval()
    m.requires_grad_(False)
    return m


@pytest.fixture(scope="session")
def llama_1k_stats(llama_1k, bpe_tok):
    import actsparse as asp

    return asp.calibrate(llama_1k, bpe_tok, tokens=1024, seq_len=128, sample_size=8192, progress=False)
