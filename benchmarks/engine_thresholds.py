"""Thresholds for the decode engine from its own activations, and the sparsity they give (the decode benchmark).

The engine decodes random-weight models at real shapes, where no calibration text means anything: its
thresholds are calibrated on its own dense activations over random teacher-forced tokens
(`calibrate_thresholds`), and `measure_sparsity` re-measures, on fresh tokens, what the kernels skip.

  import sys; sys.path.insert(0, "benchmarks")
  from engine_thresholds import calibrate_thresholds, measure_sparsity
"""

from __future__ import annotations

import weakref

import torch

from actsparse.calibration.quantile import AbsThresholds

# the fused op that reads each role's input; the engine records inputs, and decides its cuBLAS fallback, per op
OPS = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gu", "up": "gu", "down": "down",
       "shared_down": "shared_down"}  # the last: Qwen2-MoE's shared expert, where the model has one

# dense activations per engine, for the last (n_tokens, batch, seed): calibrating at several targets records once
_DENSE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@torch.no_grad()
def record(eng, n_tokens: int, batch: int, seed: int, sparse: bool) -> dict[str, torch.Tensor]:
    """Run n_tokens teacher-forced eager steps on random tokens; return each probe's inputs [T, B, K] float32."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, eng.cfg.vocab_size, (n_tokens, batch), generator=g).to(eng.device)
    got: dict[str, list[torch.Tensor]] = {}

    def rec(i: int, probe: str, t: torch.Tensor) -> None:
        got.setdefault(f"layers.{i}.{probe}", []).append(t.float())

    pos = torch.zeros(batch, dtype=torch.int32, device=eng.device)
    for t in range(n_tokens):
        eng.forward_step(toks[t], pos, sparse, rec)
        pos += 1
    return {k: torch.stack(v) for k, v in got.items()}


@torch.no_grad()
def calibrate_thresholds(eng, target: float, n_tokens: int = 64, *, batch: int = 1, union: bool = False,
                         method: str = "teal", seed: int = 0) -> dict[str, float]:
    """Set on the engine (and return) per-site thresholds that zero a `target` fraction of each site's inputs.

    Calibrated on the engine's own dense activations (n_tokens random teacher-forced tokens per row), at
    the k-th smallest |x| (`quantile` rank `kth`, which never zeroes more than the target). union=True
    calibrates on max_b |x_b| so the union over `batch` rows (the weight rows actually read) hits the
    target. method="cats" thresholds |silu(gate)| (site gate_act) instead of every input.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    if method not in ("teal", "cats"):
        raise ValueError(f"method must be 'teal' or 'cats', got {method!r}")
    if method == "cats" and eng.cfg.moe:
        raise ValueError("the engine's experts select by their inputs' thresholds (teal); CATS's gathered up rows "
                         "are not built for mixture-of-experts layers")
    eng.clear_thresholds()  # the model's own weights: a rotated plan's copy would record rotated inputs
    key = (n_tokens, batch, seed)
    if _DENSE.get(eng, (None,))[0] != key:
        _DENSE[eng] = (key, record(eng, n_tokens, batch, seed, sparse=False))
    acts = _DENSE[eng][1]
    th: dict[str, float] = {}
    rows_skipped: dict[str, float] = {}
    for i in range(eng.cfg.n_layers):
        for role in ("gate_act",) if method == "cats" else tuple(OPS):
            if f"layers.{i}.{OPS.get(role, role)}" not in acts:
                continue
            a = acts[f"layers.{i}.{OPS.get(role, role)}"].abs()  # [T, B, K]
            # An MoE layer's expert inputs [T, B·top_k, K] (down: one row per routed expert) are read by each
            # routed expert for its own token: no batch union there.
            own = eng.cfg.moe and role in ("gate", "up", "down", "shared_down")
            u = a if own else a.amax(dim=1)  # [T, K]: what the batch union reads
            t = AbsThresholds(u if union else a, rank="kth")(target)
            name = f"layers.{i}.{role}"
            th[name] = t
            # The kernels' cost follows the rows the union skips, not the per-token sparsity.
            rows_skipped[name] = float((u <= t).float().mean()) if target > 0 else 0.0
    if method == "cats":  # gate_act's mask decides the up and down rows
        for i in range(eng.cfg.n_layers):
            for role in ("up", "down"):
                rows_skipped[f"layers.{i}.{role}"] = rows_skipped[f"layers.{i}.gate_act"]
    eng.set_thresholds(th, expected_sparsity=rows_skipped)
    return th


@torch.no_grad()
def measure_sparsity(eng, n_tokens: int = 16, *, batch: int = 1, seed: int = 1) -> dict[str, float]:
    """Return measured sparsity under the engine's current thresholds on fresh tokens: per role (token level),
    'mean' (parameter-weighted), 'union' (weight rows skipped across the batch, weighted by parameter count =
    effective sparsity).

    An op the engine runs on cuBLAS (under its crossover, `Engine._dense`; a CATS layer under its gate/up
    crossover, `Engine._cats`) skips nothing, whatever its threshold, so the count asks the engine which ran.
    """
    if eng.rules is None:
        raise RuntimeError("no thresholds set")
    acts = record(eng, n_tokens, batch, seed, sparse=True)
    cfg = eng.cfg
    d, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    if cfg.moe:  # the weights a token reads: its top_k experts' (the down inputs are recorded per routed expert)
        inter = cfg.top_k * cfg.moe_intermediate_size
    shared = cfg.shared_expert_intermediate_size
    params = {"q": d * q, "k": d * kv, "v": d * kv, "o": q * d, "gate": d * (inter + shared),
              "up": d * (inter + shared), "down": inter * d}  # a shared expert's gate and up read gate|up's input
    if shared:
        params["shared_down"] = shared * d
    tok: dict[str, list[float]] = {r: [] for r in params}
    skipped = 0.0
    for i, r in enumerate(eng.rules):
        if r.gu.thresh.dim() == 3 or r.down.thresh.dim() == 3:
            raise ValueError(f"layers.{i} holds a threshold row set per expert ([E, S, K], a fitted plan's): "
                             "measure_sparsity counts one rule per layer and role, as calibrate_thresholds sets")
        rows = {}
        sites = (("q", r.qkv, 0), ("k", r.qkv, 1), ("v", r.qkv, 2), ("o", r.o, 0), ("gate", r.gu, 0),
                 ("up", r.gu, 1), ("down", r.down, 0))
        for role, op, j in sites + ((("shared_down", r.shared_down, 0),) if r.shared_down is not None else ()):
            x = acts[f"layers.{i}.{OPS[role]}"]  # [T, B, K]
            if op.shift is not None:
                x = x - op.shift[j]
            t = op.thresh[j] if op.thresh.dim() == 1 else op.thresh[j][None, None, :]
            keep = x.abs() > t
            if eng._dense(op, OPS[role], batch):
                keep = torch.ones_like(keep)
            if r.gate_act is not None and role in ("up", "down"):
                keep = (acts[f"layers.{i}.gate_act"].abs() > r.gate_act if eng._cats(r, batch)
                        else torch.ones_like(keep))
            tok[role].append(1.0 - keep.float().mean().item())
            # An expert's rows are read for its own tokens alone: the batch union is the token level there.
            own = cfg.moe and role in ("gate", "up", "down", "shared_down")
            rows[role] = tok[role][-1] if own else 1.0 - keep.any(dim=1).float().mean().item()
        skipped += sum(rows[k] * params[k] for k in params)
    out = {k: sum(v) / len(v) for k, v in tok.items()}
    out["mean"] = sum(out[k] * params[k] for k in params) / sum(params.values())
    out["union"] = skipped / (sum(params.values()) * cfg.n_layers)
    return out
