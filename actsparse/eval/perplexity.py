"""Perplexity over sliding windows, with the scored positions handed to the token policy."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.text import TextData, text_data, token_stream
from ..errors import ActsparseError
from ..models.load import require_decoder
from ..models.split import input_device
from ..sparsifiers.apply import active_handle


@torch.no_grad()
def perplexity(model, tok, data: "str | TextData" = "bundled:eval", seq_len: int = 512, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 8, progress: bool = False) -> float:
    """Return exp(mean NLL) over the data's token stream, in windows of seq_len moved by stride.

    Documents are tokenized and joined with EOS into one stream. The first window scores all its
    predicted tokens; each later window scores only its last `stride` tokens (the rest is context).
    stride defaults to seq_len: disjoint windows, every token scored once; a trailing partial window
    is dropped. Under token policy 'decode', exactly the scored positions are sparsified.
    """
    require_decoder(model, "perplexity")
    stride = seq_len if stride is None else stride
    if seq_len < 2:
        raise ActsparseError(f"seq_len must be >= 2, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ActsparseError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if max_tokens is not None and max_tokens < seq_len:
        raise ActsparseError(f"max_tokens ({max_tokens}) must be at least seq_len ({seq_len})")
    ids = token_stream(tok, text_data(data), max_tokens=max_tokens)
    if ids.numel() < seq_len:
        raise ActsparseError(f"the data has {ids.numel()} tokens, fewer than one window of {seq_len}")
    starts = list(range(0, ids.numel() - seq_len + 1, stride))
    dev = input_device(model)
    handle = active_handle(model)
    nll, count = 0.0, 0
    for b in tqdm(range(0, len(starts), batch_size), desc="perplexity", disable=not progress):
        chunk = starts[b:b + batch_size]
        x = torch.stack([ids[s:s + seq_len] for s in chunk]).to(dev)  # [B, T]
        # scored[i, j]: does position j predict a token counted in the loss? (first window: all)
        scored = torch.zeros_like(x, dtype=torch.bool)
        for i, s in enumerate(chunk):
            scored[i, (0 if s == 0 else max(0, seq_len - 1 - stride)):seq_len - 1] = True
        if handle is not None:
            with handle.positions(scored):
                logits = model(x, use_cache=False).logits
        else:
            logits = model(x, use_cache=False).logits
        lp = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        m = scored[:, :-1].flatten()
        nll += float(lp[m].sum())
        count += int(m.sum())
    return math.exp(nll / count)
