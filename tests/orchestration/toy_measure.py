"""A measure from outside actsparse, in one file: next-token top-1 accuracy on the eval data (`eval.measure=[top1]`).

Imported by test_measure_plugin.py, and by the sweep's worker processes through the module the cell records.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from actsparse.data.text import text_data, token_stream, token_windows
from actsparse.errors import ActsparseError
from actsparse.eval.measures import Context, Measure, Skip, register_measure


@dataclass
class Top1Settings:
    n_windows: int = 4
    seq_len: int = 64
    batch_size: int = 4


def windows(tok, data: str, s: Top1Settings) -> torch.Tensor:
    return token_windows(token_stream(tok, text_data(data), max_tokens=s.seq_len * s.n_windows), s.seq_len,
                         s.n_windows)


@register_measure("top1")
class Top1(Measure):
    """Fraction of positions whose most likely next token is the actual next token."""
    title = "next-token accuracy"
    Settings = Top1Settings
    dense = decoder_only = True
    headline = ("top1",)
    directions = {"top1": True}

    def check(self, s: Top1Settings) -> None:
        if s.n_windows < 1 or s.seq_len < 2 or s.batch_size < 1:
            raise ActsparseError(f"eval.top1 needs n_windows >= 1, seq_len >= 2 and batch_size >= 1; got {s}")

    def run(self, ctx: Context, batch_size: int) -> float:
        ids = windows(ctx.tok, ctx.data, ctx.settings)
        hits = 0
        with torch.no_grad():
            for b in ids.split(batch_size):
                logits = ctx.model(input_ids=b.to(ctx.model.device)).logits[:, :-1]
                hits += int((logits.argmax(-1).cpu() == b[:, 1:]).sum())
        return hits / ids[:, 1:].numel()

    def metrics(self, value: float, dense: float) -> dict:
        return {"top1": value, "top1_dense": dense}

    def line(self, value: float, dense: float) -> str:
        return f"top1 {value:.4f} (dense {dense:.4f})"


@register_measure("unavailable")
class Unavailable(Measure):
    """A measure this machine cannot run: every cell finishes and records why (tag `unavailable_skipped`)."""
    dense = True

    def run(self, ctx: Context, batch_size) -> float:
        raise Skip("needs an instrument this machine lacks")
