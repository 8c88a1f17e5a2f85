"""Mask stability: how predictable are the active-neuron sets? (the analysis of arXiv 2412.12178, Table II).

For each watched site (default the down projections: the MLP's neurons), the active set of a token is
the set of input channels that the site's linear layer actually reads as non-zero under the plan
installed on the model (any method, any rule kind: the sets are read off the F.linear calls, after
every rule has run). Two overlaps, per layer, as Jaccard |A ∩ B| / |A ∪ B|:

- `consecutive`: between the active sets of consecutive tokens of the same text;
- `perturbed`: between the active sets at the same position of a text and of a copy of it with a
  fraction `perturb` of its tokens replaced by random ones (the paper's 95%-70% similar inputs).

High overlaps are the evidence for predict-and-prefetch (load the next token's weights early).
`chance` is the Jaccard two independent random sets with the same densities would have, d / (2 - d),
the floor to compare against; with no plan installed every channel is active and both overlaps are 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..data.text import TextData, text_data, token_stream, token_windows
from ..errors import ActsparseError
from ..models.sites import find_sites
from ..models.split import input_device
from ..sparsifiers.apply import active_handle


class _LinearInputs(TorchFunctionMode):
    """Records, per watched weight, the input of the last F.linear call that used it."""

    def __init__(self, weights: dict[int, str]):
        super().__init__()
        self.weights, self.seen = weights, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and id(args[1]) in self.weights:
            self.seen[self.weights[id(args[1])]] = args[0].detach()
        return func(*args, **kwargs)


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Jaccard of boolean sets [..., C]; 1 where both are empty."""
    inter = (a & b).sum(-1).double()
    union = (a | b).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@torch.no_grad()
def _active_sets(model, ids: torch.Tensor, weights: dict[int, str], batch_size: int) -> dict[str, torch.Tensor]:
    """{site: bool [n, T, C]}: the channels each token's site input has non-zero."""
    handle = active_handle(model)
    dev = input_device(model)
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(ids), batch_size):
        x = ids[i:i + batch_size].to(dev)
        rec = _LinearInputs(weights)
        with rec:
            if handle is not None:  # whatever the token policy, every position is sparsified here
                with handle.positions(torch.ones(x.shape, dtype=torch.bool, device=dev)):
                    model(x, use_cache=False)
            else:
                model(x, use_cache=False)
        for site, inp in rec.seen.items():
            out.setdefault(site, []).append((inp != 0).reshape(x.shape[0], x.shape[1], -1).cpu())
    return {s: torch.cat(v) for s, v in out.items()}


@torch.no_grad()
def mask_stability(model, tok, data: "str | TextData" = "bundled:eval", seq_len: int = 128, n_windows: int = 8,
                   perturb: float = 0.3, roles: tuple[str, ...] = ("down",), batch_size: int = 8,
                   seed: int = 0) -> dict[str, float]:
    """Return Jaccard overlaps of active sets: stability/{consecutive,perturbed,chance}/<site> and /mean."""
    if not 0.0 <= perturb <= 1.0:
        raise ActsparseError(f"perturb (fraction of tokens replaced) must be in [0, 1], got {perturb}")
    if n_windows < 1:
        raise ActsparseError(f"n_windows must be >= 1, got {n_windows}")
    sites = {n: s for n, s in find_sites(model).items() if s.role in roles}
    if not sites:
        raise ActsparseError(f"no sites with roles {list(roles)} in this model; roles look like q k v o gate up down")
    if any(type(s.module).__name__ == "Conv1D" for s in sites.values()):
        raise ActsparseError("mask_stability reads F.linear inputs; Conv1D sites (GPT-2) are not supported")
    ids = token_windows(token_stream(tok, text_data(data), max_tokens=seq_len * n_windows), seq_len, n_windows)
    gen = torch.Generator().manual_seed(seed)
    swap = torch.rand(ids.shape, generator=gen) < perturb
    vocab = int(getattr(model.config, "vocab_size", int(ids.max()) + 1))
    noisy = torch.where(swap, torch.randint(0, vocab, ids.shape, generator=gen), ids)
    weights = {id(s.module.weight): n for n, s in sites.items()}
    a = _active_sets(model, ids, weights, batch_size)
    b = _active_sets(model, noisy, weights, batch_size)
    out: dict[str, float] = {}
    for name in sites:
        if name not in a:
            continue
        sa, sb = a[name], b[name]                                   # [n, T, C]
        d = float(sa.float().mean())
        out[f"stability/consecutive/{name}"] = float(_jaccard(sa[:, 1:], sa[:, :-1]).mean())
        out[f"stability/perturbed/{name}"] = float(_jaccard(sa, sb).mean())
        out[f"stability/chance/{name}"] = d / (2.0 - d) if d < 1.0 else 1.0
    for kind in ("consecutive", "perturbed", "chance"):
        v = [x for k, x in out.items() if k.startswith(f"stability/{kind}/")]
        if v:
            out[f"stability/{kind}/mean"] = sum(v) / len(v)
    return out
