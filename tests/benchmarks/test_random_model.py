"""scripts/device/random_model.py: random-weight model folders at an engine config's shapes, read back by
transformers as that family, with the bundled tokenizer's ids."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from actsparse.engine.config import GEMMA3_12B, QWEN3_8B, LlamaConfig

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("random_model", ROOT / "scripts" / "device" / "random_model.py")
random_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(random_model)


def _small(cfg: LlamaConfig, **kw) -> LlamaConfig:
    """The preset's family spec at small shapes (vocab: the bundled tokenizer's 8192)."""
    return dataclasses.replace(cfg, vocab_size=8192, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4,
                               n_kv_heads=2, head_dim=16, **kw)


@pytest.mark.parametrize("cfg,family", [(_small(QWEN3_8B), "qwen3"),
                                        (_small(GEMMA3_12B, local_layers=(True, False), sliding_window=32, embed_scale=8.0),
                                         "gemma3_text")])
def test_folder_reads_back_as_the_family(tmp_path, cfg, family):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / family
    line = random_model.build(cfg, out, family=family)
    assert family in line and "ids as bundled" in line
    hf = AutoConfig.from_pretrained(out)
    assert hf.model_type == family and LlamaConfig.from_hf(hf) == cfg
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0 and next(model.parameters()).dtype == torch.bfloat16
    text = "Sparse activations, random weights: 3.14 and ünïcödé."
    bundled = AutoTokenizer.from_pretrained(random_model.TOKENIZER)
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == bundled(text)["input_ids"]


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path):
    cfg = dataclasses.replace(_small(QWEN3_8B), vocab_size=1000)
    with pytest.raises(ValueError, match="more than qwen3's vocabulary 1000"):
        random_model.build(cfg, tmp_path / "m", family="qwen3")
    assert random_model.main(["--preset", "no-such-preset", "--out", str(tmp_path / "x")]) == 2
