"""Per-probe statistics: a streaming |x| histogram, a bounded uniform sample, per-channel moments.

Memory is bounded by the sample: each probe keeps at most `sample_size` float32 values (default
2**17 = 128 Ki values = 512 KiB), plus `N_BINS` histogram counts and three float64 vectors of the probe's
width. A Llama-3-8B calibration (32 blocks x 9 probes) therefore holds about 150 MB of samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..artifacts import load_tensors_json, save_tensors_json
from ..errors import ActsparseError
from .quantile import AbsThresholds, quantile

# log10|x| histogram: 12 decades, 100 bins per decade, plus an exact-zero count kept separately
LOG_LO, LOG_HI, N_BINS = -8.0, 4.0, 1200


@dataclass
class ProbeStats:
    """What calibration keeps for one probe (a site input or an MLP internal)."""
    n: int                      # elements seen
    n_tokens: int               # token vectors seen
    sample: torch.Tensor        # [<= sample_size] float32, uniform without replacement over all elements
    hist: torch.Tensor          # [N_BINS] float64 counts of log10|x| in [LOG_LO, LOG_HI)
    n_zero: int                 # elements exactly 0
    ch_sum: torch.Tensor        # [C] float64 sum of x per channel
    ch_abs_sum: torch.Tensor    # [C] float64 sum of |x|
    ch_sq_sum: torch.Tensor     # [C] float64 sum of x^2

    @property
    def channels(self) -> int:
        return self.ch_sum.numel()

    @property
    def ch_mean(self) -> torch.Tensor:
        return self.ch_sum / max(self.n_tokens, 1)

    @property
    def ch_abs_mean(self) -> torch.Tensor:
        return self.ch_abs_sum / max(self.n_tokens, 1)

    @property
    def ch_l2(self) -> torch.Tensor:
        """Per-channel L2 norm over all calibration tokens."""
        return self.ch_sq_sum.sqrt()

    def abs_quantile(self, q: float, shift: float = 0.0) -> float:
        """The q-quantile of |x - shift| over the sample (`AbsThresholds`): the threshold on |x - shift| at sparsity q."""
        if not 0.0 <= q <= 1.0:
            raise ActsparseError(f"quantile must be in [0, 1], got {q}")
        return AbsThresholds(self.sample.double() - float(shift))(q)

    def quantile(self, q: float) -> float:
        """The q-quantile of the signed values over the sample (`quantile`)."""
        return quantile(self.sample, q)

    def hist_abs_quantile(self, q: float) -> float:
        """Approximate q-quantile of |x| over *all* elements, from the streaming histogram."""
        total = self.n
        target = q * total
        if target <= self.n_zero:
            return 0.0
        cum = torch.cumsum(self.hist, 0) + self.n_zero
        idx = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype)).item())
        idx = min(idx, N_BINS - 1)
        width = (LOG_HI - LOG_LO) / N_BINS
        return 10 ** (LOG_LO + (idx + 1) * width)


class ProbeCollector:
    """Streams tensors of one probe into a ProbeStats with bounded memory (bottom-k uniform sampling)."""

    def __init__(self, sample_size: int, seed: int):
        self.k = sample_size
        self.seed = seed
        self.gen: torch.Generator | None = None
        self.keys: torch.Tensor | None = None
        self.vals: torch.Tensor | None = None
        self.n = 0
        self.n_tokens = 0
        self.n_zero = 0
        self.hist = None
        self.ch = None  # [3, C] float64

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, C]
        dev = x.device
        if self.ch is None:
            self.gen = torch.Generator(device=dev).manual_seed(self.seed)
            self.ch = torch.zeros(3, x.shape[-1], dtype=torch.float64, device=dev)
            self.hist = torch.zeros(N_BINS, dtype=torch.float64, device=dev)
        # per-batch sums in float32 (a few thousand tokens), accumulated across batches in float64
        a2 = x.abs()
        self.ch[0] += x.sum(0).double()
        self.ch[1] += a2.sum(0).double()
        self.ch[2] += (x * x).sum(0).double()
        a = a2.flatten()
        nz = a > 0
        self.n_zero += a.numel() - int(nz.sum())
        self.hist += torch.histc(a[nz].log10_().clamp_(LOG_LO, LOG_HI - 1e-9), N_BINS, LOG_LO, LOG_HI).double()
        self.n += a.numel()
        self.n_tokens += x.shape[0]
        self._sample(x.flatten())

    def _sample(self, v: torch.Tensor) -> None:
        """Bottom-k sampling: every element gets a U(0,1) key; the k smallest keys are a uniform sample.

        Once the buffer is full only keys below its largest key tau can enter. Their number is
        Binomial(n, tau), their positions a uniform subset and their keys U(0, tau): drawing exactly
        that, instead of n keys, gives the same distribution at a cost proportional to the entrants.
        """
        n, dev = v.numel(), v.device
        tau = 1.0 if self.keys is None or self.keys.numel() < self.k else float(self.keys.max())
        c = n if tau >= 1.0 else int(torch.binomial(torch.tensor([float(n)]), torch.tensor([tau]),
                                                      generator=self._cpu_gen()).item())
        if c == 0:
            return
        if c * 16 > n:  # many entrants: one key per element is cheaper than drawing distinct positions
            keys = torch.rand(n, generator=self.gen, device=dev)
            if tau < 1.0:
                keep = keys < tau
                keys, v = keys[keep], v[keep]
        else:
            idx = torch.randint(0, n, (c,), generator=self.gen, device=dev).unique()
            while idx.numel() < c:  # collisions are rare (c << n); top up to exactly c distinct positions
                more = torch.randint(0, n, (c - idx.numel(),), generator=self.gen, device=dev)
                idx = torch.cat([idx, more]).unique()
            v = v[idx]
            keys = torch.rand(c, generator=self.gen, device=dev) * tau
        keys = keys if self.keys is None else torch.cat([self.keys, keys])
        v = v if self.vals is None else torch.cat([self.vals, v])
        if keys.numel() > self.k:
            keys, idx = torch.topk(keys, self.k, largest=False, sorted=False)
            v = v[idx]
        self.keys, self.vals = keys, v

    def _cpu_gen(self) -> torch.Generator:
        if getattr(self, "_cg", None) is None:
            self._cg = torch.Generator().manual_seed(self.seed + 1)
        return self._cg

    def result(self) -> ProbeStats:
        return ProbeStats(n=self.n, n_tokens=self.n_tokens, sample=self.vals.cpu().clone(),
                          hist=self.hist.cpu(), n_zero=self.n_zero, ch_sum=self.ch[0].cpu(),
                          ch_abs_sum=self.ch[1].cpu(), ch_sq_sum=self.ch[2].cpu())


@dataclass
class Stats:
    """The output of calibrate(): ProbeStats per probe name, the calibration tokens, and provenance."""
    probes: dict[str, ProbeStats]
    tokens: torch.Tensor                      # [n_seq, seq_len] calibration token ids, for methods that run forwards
    meta: dict = field(default_factory=dict)  # model, data, key, collector params, time

    @property
    def key(self) -> str:
        return self.meta.get("stats_key", "")

    def __getitem__(self, probe: str) -> ProbeStats:
        probe = canonical_probe(probe)
        if probe not in self.probes:
            raise ActsparseError(f"no calibration statistics for probe {probe!r}; known probes look like "
                                 f"{', '.join(list(self.probes)[:6])}, ...")
        return self.probes[probe]

    def __contains__(self, probe: str) -> bool:
        return canonical_probe(probe) in self.probes

    def save(self, path) -> None:
        """Write the stats to a directory (safetensors + JSON), atomically."""
        t = {"__tokens__": self.tokens}
        scal, aliases, first_name = {}, {}, {}
        for name, p in self.probes.items():
            if id(p) in first_name:  # the same statistics object under two names (q/k/v share an input)
                aliases[name] = first_name[id(p)]
                continue
            first_name[id(p)] = name
            t[f"{name}/sample"], t[f"{name}/hist"] = p.sample, p.hist
            t[f"{name}/ch_sum"], t[f"{name}/ch_abs_sum"], t[f"{name}/ch_sq_sum"] = p.ch_sum, p.ch_abs_sum, p.ch_sq_sum
            scal[name] = {"n": p.n, "n_tokens": p.n_tokens, "n_zero": p.n_zero}
        save_tensors_json(path, t, {"kind": "stats", "meta": self.meta, "probes": scal, "aliases": aliases})

    @classmethod
    def load(cls, path) -> "Stats":
        """Read stats written by save(); raise ActsparseError if missing or corrupt."""
        t, m = load_tensors_json(path)
        if m.get("kind") != "stats":
            raise ActsparseError(f"{path} is not a stats artifact (kind={m.get('kind')!r})")
        probes = {n: ProbeStats(sample=t[f"{n}/sample"], hist=t[f"{n}/hist"], ch_sum=t[f"{n}/ch_sum"],
                                ch_abs_sum=t[f"{n}/ch_abs_sum"], ch_sq_sum=t[f"{n}/ch_sq_sum"], **s)
                  for n, s in m["probes"].items()}
        for name, target in m.get("aliases", {}).items():
            probes[name] = probes[target]
        return cls(dict(sorted(probes.items(), key=lambda kv: _probe_order(kv[0]))), t["__tokens__"], m["meta"])


def _probe_order(name: str) -> tuple:
    parts = name.split(".")
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1, name)


def canonical_probe(probe: str) -> str:
    # `inter` (the down-projection input) is the same tensor as the down site's input
    return probe[: -len("inter")] + "down" if probe.endswith(".inter") else probe
