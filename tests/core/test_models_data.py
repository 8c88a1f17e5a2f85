"""load_model / text_data / site discovery, including every user-facing error."""
import pytest
import torch

import actsparse as asp
from actsparse.models import find_blocks, find_sites, resolve_model_source
from tests.conftest import make_model


def test_load_local_directory_gives_eval_model_and_tokenizer(tiny_dir):
    model, tok = asp.load_model(str(tiny_dir))
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.actsparse_source.kind == "local"
    ids = tok("The quick brown fox")["input_ids"]
    assert tok.decode(ids) == "The quick brown fox"
    m16, _ = asp.load_model(str(tiny_dir), dtype="bfloat16")
    assert next(m16.parameters()).dtype == torch.bfloat16


def test_a_model_with_attention_soft_capping_loads_with_the_attention_that_applies_it(tmp_path):
    """Gemma 2's attn_logit_softcapping: eager attention (transformers up to 5.20 default to SDPA, which drops it),
    so the loaded model's logits are the soft-capped ones."""
    import transformers as tr

    from tests.conftest import make_tokenizer

    cfg = tr.Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_logit_softcapping=1.0,
                          pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.5)
    torch.manual_seed(0)
    tr.Gemma2ForCausalLM(cfg).save_pretrained(tmp_path)
    make_tokenizer(tmp_path)
    model, _ = asp.load_model(str(tmp_path))
    assert model.config._attn_implementation == "eager"
    ref = tr.Gemma2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    seq = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(seq).logits, ref(seq).logits)


@pytest.mark.parametrize("spec, match", [
    ("/no/such/dir", "does not exist"),
    ("./missing-model", "does not exist"),
    ("tiny-lama", r"unknown model 'tiny-lama' \(did you mean the bundled 'tiny-llama'\?\).*offline"),
    ("meta-llama/Llama-3.1-8B", "hub cannot be reached"),
    ("bad id with spaces", "not a valid hub id"),
    ("", "non-empty string"),
])
def test_bad_model_specs_fail_before_loading(spec, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(asp.ActsparseError, match=match):
        resolve_model_source(spec)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(asp.ActsparseError, match="no config.json"):
        asp.load_model(str(tmp_path))


def test_bad_dtype_is_rejected(tiny_dir):
    with pytest.raises(asp.ActsparseError, match="dtype must be one of"):
        asp.load_model(str(tiny_dir), dtype="int3")


def test_text_data_specs(text_file, tmp_path):
    d = asp.text_data(str(text_file))
    assert len(d.documents) == 6 and "owl" in d.documents[2]
    assert d.key == asp.text_data(str(text_file)).key
    with pytest.raises(asp.ActsparseError, match="unknown bundled split"):
        asp.text_data("bundled:train")
    with pytest.raises(asp.ActsparseError, match="is not a file"):
        asp.text_data(str(tmp_path / "nope.txt"))
    with pytest.raises(asp.ActsparseError, match="bad dataset spec"):
        asp.text_data("hf:onlyname")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(asp.ActsparseError, match="is empty"):
        asp.text_data(str(tmp_path / "empty.txt"))


def test_hub_dataset_offline_fails_with_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(asp.ActsparseError, match="offline"):
        asp.text_data("hf:wikitext:wikitext-2-raw-v1:test")


@pytest.mark.parametrize("kind, roles", [
    ("llama", ["q", "k", "v", "o", "gate", "up", "down"]),
    ("neox", ["qkv", "o", "up", "down"]),
    ("gpt2", ["qkv", "o", "up", "down"]),
])
def test_site_discovery_per_family(kind, roles):
    model = make_model(kind, layers=3)
    sites = find_sites(model)
    assert list(sites) == [f"layers.{i}.{r}" for i in range(3) for r in roles]
    for s in sites.values():
        assert tuple(s.weight.shape) == (s.out_features, s.in_features)  # Conv1D is transposed for us
        x = torch.randn(2, s.in_features)
        ref = x @ s.weight.t() + (s.bias if s.bias is not None else 0)
        torch.testing.assert_close(s.module(x), ref)
    blocks = find_blocks(model)
    assert all(b.mlp is not None and b.act is not None for b in blocks)
    assert blocks[0].gated == (kind == "llama")


def test_model_without_sites_names_what_it_found():
    net = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]))
    with pytest.raises(asp.ActsparseError, match="no sparsifiable sites recognised"):
        find_sites(net)
