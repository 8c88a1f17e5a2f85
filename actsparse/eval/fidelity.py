"""Fidelity: how close the sparsified model's outputs stay to the same model's dense outputs.

Encoders are compared on pooled sentence embeddings (mean over real tokens, or the [CLS] vector, as
the model's sentence-transformers pooling says), one vector per text chunk; decoders on the final
hidden states (or logits), one vector per position of each token window. Dense outputs come from the
same model with the installed plan lifted for that batch, so any model works, sparsified or not.
Under token policy 'decode' every compared position counts as scored and is sparsified.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.text import TextData, text_data, token_stream, token_windows
from ..errors import ActsparseError
from ..models.load import is_decoder_lm
from ..models.split import input_device
from ..sparsifiers.apply import active_handle

OUTPUTS = ("auto", "pooled", "hidden", "logits")


def text_chunks(data: TextData, n: int, min_words: int = 8) -> list[str]:
    """The first n paragraphs of at least min_words words, taken round-robin over documents (deterministic)."""
    paras = [[p for p in (" ".join(x.split()) for x in re.split(r"\n\s*\n", d)) if len(p.split()) >= min_words]
             for d in data.documents]
    out: list[str] = []
    depth = 0
    while len(out) < n and any(len(p) > depth for p in paras):
        out.extend(p[depth] for p in paras if len(p) > depth)
        depth += 1
    return out[:n]


def _pool(hidden: torch.Tensor, attn: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, H], [B, T] -> [B, H] sentence embeddings."""
    if how == "cls":
        return hidden[:, 0]
    m = attn.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def fidelity(model, tok, data: "str | TextData" = "bundled:eval", n: int = 64, seq_len: int = 128,
             batch_size: int = 8, output: str = "auto", progress: bool = False) -> dict:
    """Return {"cos", "rel_err", "n"}: mean cosine and mean relative L2 error of sparsified vs dense outputs.

    n counts text chunks for encoders and token windows of seq_len for decoders; `output` picks what is
    compared: 'pooled' (encoders' default), 'hidden' (decoders' default: final hidden states) or 'logits'.
    """
    if output not in OUTPUTS:
        raise ActsparseError(f"output must be one of {OUTPUTS}, got {output!r}")
    if n < 1 or seq_len < 2 or batch_size < 1:
        raise ActsparseError(f"n and batch_size must be >= 1 and seq_len >= 2, got n={n}, seq_len={seq_len}, "
                             f"batch_size={batch_size}")
    decoder = is_decoder_lm(model)
    output = ("hidden" if decoder else "pooled") if output == "auto" else output
    if output == "logits" and not decoder:
        raise ActsparseError(f"output='logits' needs a decoder-only LM; {type(model).__name__} is an encoder: "
                             "use output='pooled' or 'hidden'")
    data = text_data(data)
    dev = input_device(model)
    if decoder:
        windows = token_windows(token_stream(tok, data, max_tokens=n * seq_len), seq_len, n)  # [n, T]
        batches = [{"input_ids": windows[i:i + batch_size]} for i in range(0, len(windows), batch_size)]
    else:
        chunks = text_chunks(data, n)
        if not chunks:
            raise ActsparseError(f"data {data.name!r} has no paragraph of 8 words or more to embed")
        batches = [dict(tok(chunks[i:i + batch_size], padding=True, truncation=True, max_length=seq_len,
                            return_tensors="pt")) for i in range(0, len(chunks), batch_size)]
    pooling = getattr(model, "actsparse_pooling", "mean")
    handle = active_handle(model)
    cos_sum, err_sum, count = 0.0, 0.0, 0
    for batch in tqdm(batches, desc="fidelity", disable=not progress):
        batch = {k: v.to(dev) for k, v in batch.items()}
        if handle is not None:
            handle.__exit__(None, None, None)  # lift the plan for the dense reference of this batch
            try:
                ref = _outputs(model, batch, output, pooling)
            finally:
                handle.__enter__()
            ids = batch["input_ids"]
            with handle.positions(torch.ones_like(ids, dtype=torch.bool)):
                got = _outputs(model, batch, output, pooling)
        else:
            ref = got = _outputs(model, batch, output, pooling)
        ref, got = ref.float(), got.float()  # [items, H]
        cos_sum += float(F.cosine_similarity(got, ref, dim=-1).sum())
        err_sum += float(((got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).sum())
        count += ref.shape[0]
    return {"cos": cos_sum / count, "rel_err": err_sum / count, "n": count}


def _outputs(model, batch: dict, output: str, pooling: str) -> torch.Tensor:
    """The compared vectors of one batch: [B, H] pooled, or [B*T, H] per position (real tokens only)."""
    if output == "logits":
        y = model(**batch, use_cache=False).logits  # [B, T, V]
        return y.flatten(0, 1)
    if is_decoder_lm(model):
        out = model(**batch, use_cache=False, output_hidden_states=True)
        h = out.hidden_states[-1]  # [B, T, H]
    else:
        h = model(**batch).last_hidden_state  # [B, T, H]
    attn = batch.get("attention_mask")
    if output == "pooled":
        return _pool(h, attn if attn is not None else torch.ones(h.shape[:2], device=h.device), pooling)
    if attn is not None:
        return h[attn.bool()]
    return h.flatten(0, 1)
