"""The quantile every threshold is taken with, and the calibrator of thresholds on |x| built on it.

A threshold taken from a sample of values (the calibration statistics' sample, captured site inputs,
predictor logits, a benchmark's recorded activations) is `quantile` of that sample; a threshold on
|x| at a target sparsity is an `AbsThresholds`.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from ..errors import ActsparseError

Rank = Literal["linear", "nearest", "kth"]
RANKS = ("linear", "nearest", "kth")


def quantile(v: torch.Tensor, q: float, rank: Rank = "linear", *, is_sorted: bool = False) -> float:
    """Return the q-quantile (q in [0, 1]) of the values of v (any shape; `is_sorted`: v is 1-D, ascending).

    With the n values sorted, s[0] <= ... <= s[n-1], and pos = q (n - 1):
    - `linear` (the default; numpy's and torch.quantile's default, Hyndman & Fan's type 7):
      s[floor(pos)] + (s[floor(pos) + 1] - s[floor(pos)]) * (pos - floor(pos)), in float64. It is
      continuous and monotone in q, the sample's minimum at q = 0 and maximum at q = 1, and the number
      np.quantile computes, so a threshold can be checked against numpy. As a threshold with keep
      |x| > t it zeroes floor(pos) + 1 of the n values when they are distinct: the fraction q to within 1/n.
    - `nearest`: s[round(pos)], halves to even (numpy's `nearest`): always one of the sample's values.
    - `kth`: s[k - 1] with k = floor(q n), clamped to [1, n] (the k-th smallest): with keep |x| > t it
      zeroes exactly k values when they are distinct, never more than the fraction q.
    Every fit uses `linear` except D-COUNTDOWN's logit threshold (`nearest`) and the decode benchmark's
    engine calibration (`kth`). The three read order statistics at most two ranks apart, a difference
    that vanishes on samples of thousands of values; those two keep theirs so that their thresholds, and
    the results stored with them, stay reproducible.

    The sort runs where v is, in float32 for float32 or narrower inputs (the same order, hence the same
    order statistics, as in float64) and in float64 otherwise.
    """
    if rank not in RANKS:
        raise ActsparseError(f"quantile rank must be one of {list(RANKS)}, got {rank!r}")
    if not 0.0 <= q <= 1.0:
        raise ActsparseError(f"quantile must be in [0, 1], got {q}")
    s = v if is_sorted else _sorted(v)
    n = s.numel()
    if n == 0:
        raise ActsparseError("the quantile of an empty sample is undefined; calibrate on more tokens")
    if rank == "kth":
        return float(s[min(max(int(q * n), 1), n) - 1])
    pos = q * (n - 1)
    if rank == "nearest":
        return float(s[round(pos)])
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    a, b = float(s[lo]), float(s[hi])
    return a + (b - a) * (pos - lo)


def _sorted(v: torch.Tensor) -> torch.Tensor:
    """v's values flattened and sorted ascending (float32, or float64 for float64 input)."""
    dt = torch.float64 if v.dtype == torch.float64 else torch.float32
    return v.detach().to(dt).flatten().sort().values


class AbsThresholds:
    """Thresholds on |v| by target sparsity: `self(s)` is the s-quantile of |v| (`quantile`), 0 at s <= 0.

    A threshold of 0 keeps every nonzero value, so sparsity 0 changes nothing. |v| is sorted once, on
    `device` (default: where v is), so a greedy search reads thresholds at many levels for the price of one
    sort; passing the model's GPU turns a fit's seconds-per-site CPU sort of [tokens x channels] values
    into milliseconds. Levels above 1 read the maximum.
    """

    def __init__(self, v: torch.Tensor, device: "torch.device | str | None" = None, rank: Rank = "linear"):
        v = v.detach()
        if device is not None:
            v = v.to(device)
        self.s = _sorted(v.abs())
        self.rank = rank

    def __call__(self, sparsity: float) -> float:
        if sparsity <= 0.0:
            return 0.0
        return quantile(self.s, min(sparsity, 1.0), self.rank, is_sorted=True)
