"""A tensor-parallel rank's shard read slice by slice from a saved folder's safetensors (`TPEngine.from_pretrained`)
is, tensor for tensor and in the same dtype, the shard `from_hf` cuts from the model loaded whole, for every family
the engine decodes (GQA, Qwen2's biases, Phi-3's fused projections, Granite's multipliers, Gemma's norms and tied
head), from one file and from an indexed set of shards; two gloo ranks reading the folder decode the single-process
engine's greedy tokens; and what cannot be read or split is refused with the reason, before any weight is read."""

from dataclasses import fields

import pytest
import torch

from actsparse.engine import Engine
from actsparse.engine.checkpoint import load_shard
from actsparse.engine.config import LlamaConfig
from actsparse.engine.launch import run_ranks
from actsparse.engine.tensor_parallel import TPEngine, shard_weights
from actsparse.engine.weights import LayerWeights, Weights, weights_from_hf

from .test_gemma import _hf_gemma

FAMILIES = ("llama", "qwen2", "phi3", "granite", "gemma2", "gemma3")
# An odd vocabulary: the ranks' LM-head slices differ in size (151 and 150).
SHAPE = dict(vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, eos_token_id=None, bos_token_id=0)


def _model(family: str, seed: int = 0):
    """A tiny random causal LM of the family, fp32, its norms and biases away from their defaults."""
    import transformers as tr

    if family in ("gemma2", "gemma3"):
        return _hf_gemma(family, seed, vocab_size=301)
    torch.manual_seed(seed)
    cls, conf = {"llama": (tr.LlamaForCausalLM, tr.LlamaConfig), "qwen2": (tr.Qwen2ForCausalLM, tr.Qwen2Config),
                 "phi3": (tr.Phi3ForCausalLM, tr.Phi3Config),
                 "granite": (tr.GraniteForCausalLM, tr.GraniteConfig)}[family]
    extra = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
                 logits_scaling=8.0, tie_word_embeddings=True) if family == "granite" else {}
    model = cls(conf(**SHAPE, **extra)).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """family -> (model, {"single": folder with model.safetensors, "sharded": folder with an index and shards})."""
    out = {}
    for family in FAMILIES:
        model = _model(family)
        root = tmp_path_factory.mktemp(family)
        model.save_pretrained(root / "single")
        model.save_pretrained(root / "sharded", max_shard_size="20KB")
        assert (root / "single" / "model.safetensors").is_file()
        assert len(list((root / "sharded").glob("*.safetensors"))) > 2
        assert (root / "sharded" / "model.safetensors.index.json").is_file()
        out[family] = (model, {"single": root / "single", "sharded": root / "sharded"})
    return out


def _assert_same(got: Weights, want: Weights, where: str) -> None:
    """Every tensor of two Weights (and of each block) equal, in the same dtype; absent ones absent in both."""
    pairs = [(f.name, getattr(got, f.name), getattr(want, f.name)) for f in fields(Weights) if f.name != "layers"]
    assert len(got.layers) == len(want.layers)
    for i, (g, w) in enumerate(zip(got.layers, want.layers)):
        pairs += [(f"layers.{i}.{f.name}", getattr(g, f.name), getattr(w, f.name)) for f in fields(LayerWeights)]
    for name, g, w in pairs:
        if not isinstance(w, torch.Tensor) or g is None:
            assert g == w, (where, name, g, w)
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, (where, name, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g, w), (where, name, (g.float() - w.float()).abs().max())
    tied = want.lm_head.data_ptr() == want.embed.data_ptr()
    assert (got.lm_head.data_ptr() == got.embed.data_ptr()) == tied, where  # a tied head: a view, as from_hf's


@pytest.mark.parametrize("family", FAMILIES)
def test_each_ranks_shard_read_from_the_folder_equals_the_shard_of_the_loaded_model(family, saved):
    model, folders = saved[family]
    cfg = LlamaConfig.from_hf(model.config)
    for dtype in (torch.float32, torch.bfloat16):
        whole = weights_from_hf(model, torch.device("cpu"), dtype, "dense")
        for world in (1, 2):
            for rank in range(world):
                want = shard_weights(whole, cfg, rank, world, "cpu", "both")
                for kind, folder in folders.items():
                    got_cfg, got = load_shard(folder, rank, world, "cpu", dtype, "both")
                    assert got_cfg == cfg
                    _assert_same(got, want, f"{family} {kind} {dtype} rank {rank}/{world}")


def test_from_hf_given_a_folder_reads_it_rank_by_rank(saved):
    model, folders = saved["qwen2"]
    want = TPEngine.from_hf(model, 0, 1, device="cpu", kernels="torch").w
    got = TPEngine.from_hf(str(folders["single"]), 0, 1, device="cpu", dtype=torch.float32, kernels="torch")
    _assert_same(got.w, want, "from_hf(path)")


def _rank_decode(rank: int, world: int, folders: dict, prompt: torch.Tensor, n: int) -> dict:
    """On each rank: every folder's greedy tokens, its engine read from the folder's safetensors."""
    out = {}
    for family, folder in folders.items():
        eng = TPEngine.from_pretrained(folder, rank, world, device="cpu", dtype=torch.float32, kernels="torch",
                                       max_batch=2, max_seq_len=prompt.shape[1] + n)
        eng.decode(prompt, n)
        out[family] = eng.last_tokens.cpu()
    return out


def test_two_gloo_ranks_reading_the_folder_decode_the_single_process_engines_tokens(saved):
    prompt = torch.randint(1, 300, (2, 5), generator=torch.Generator().manual_seed(3))
    n = 6  # past Gemma's window of 4
    families = ("llama", "phi3", "gemma2", "gemma3")
    folders = {f: saved[f][1]["sharded"] for f in families}
    got = run_ranks(_rank_decode, 2, folders, prompt, n, backend="gloo")
    for family in families:
        model = saved[family][0]
        eng = Engine.from_hf(model, device="cpu", kernels="torch", max_batch=2, max_seq_len=prompt.shape[1] + n)
        eng.decode(prompt, n)
        want = eng.last_tokens.cpu()
        for r in got:
            assert torch.equal(r[family], want), (family, r[family], want)


def test_what_cannot_be_read_or_split_is_refused_with_the_reason(saved, tmp_path):
    model, folders = saved["llama"]
    with pytest.raises(ValueError, match="is not a local directory"):
        TPEngine.from_pretrained(tmp_path / "absent", kernels="torch")
    with pytest.raises(ValueError, match="is not a local directory"):
        TPEngine.from_pretrained(folders["single"] / "model.safetensors", kernels="torch")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        TPEngine.from_pretrained(tmp_path, kernels="torch")

    pt = tmp_path / "pt"  # the weights only as a PyTorch pickle
    model.config.save_pretrained(pt)
    torch.save(model.state_dict(), pt / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"has no \*.safetensors files \(it holds pytorch_model.bin\); "
                                                r"per-rank loading reads .* re-save the model with save_pretrained"):
        TPEngine.from_pretrained(pt, kernels="torch")

    # Splits and families are refused from the config alone: these folders hold no weights at all.
    with pytest.raises(ValueError, match="world_size 4 does not divide the model's 2 kv heads; use a divisor of 2"):
        TPEngine.from_pretrained(pt, 0, 4, kernels="torch")
    wide = tmp_path / "wide"
    model.config.__class__(**{**SHAPE, "num_key_value_heads": 4, "intermediate_size": 130}).save_pretrained(wide)
    with pytest.raises(ValueError, match="world_size 4 does not divide intermediate_size 130"):
        TPEngine.from_pretrained(wide, 0, 4, kernels="torch")
    from tests.families.models import make_family

    gemma1 = tmp_path / "gemma1"
    make_family("gemma", layers=1).config.save_pretrained(gemma1)
    with pytest.raises(ValueError, match="gemma needs Gemma 1's block"):
        TPEngine.from_pretrained(gemma1, kernels="torch")
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        TPEngine.from_pretrained(folders["single"], 2, 2, kernels="torch")
