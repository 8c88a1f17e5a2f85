"""Kernel microbenchmark and end-to-end decode benchmark (one script, one device call).

  python3 benchmarks/bench_kernels.py --out DIR [--tune] [--budget-s 400] [--skip-decode]

(a) per projection and per block (q+k+v+o+gate+up+down) at Llama-3-8B shapes, sparsity 0–0.9,
    bf16 and fp16, batch 1 and 4, CUDA graphs, against cuBLAS (7 GEMMs as TEAL measured, and the
    4 fused GEMMs our dense engine runs) and a TEAL-style split-K kernel (fp16, batch 1);
(b) decode tokens/s of the engine, dense vs sparse (thresholds calibrated on its own activations),
    Llama-3-8B and Llama-2-7B shapes with random weights, batch 1 and 4; with --hf-baseline, beside each model's
    dense tokens/s at batch 1, Hugging Face generate's on the same shapes (static cache, compiled decode step).
Writes DIR/results.json (rows), DIR/BENCHMARKS_fragment.md and DIR/tuned.json; prints tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import pathlib
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]


# actsparse.kernels is the module actsparse/kernels.py, whose submodules live in kernels/: importable
# from the source tree with or without an install.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from actsparse.engine.crossover import crossing, graph_ms, union_threshold  # noqa: E402
from actsparse.kernels import (GatherConfig, MaskedConfig, OneshotConfig, configs, override_config,  # noqa: E402
                               pdl_enabled, ref, sparse_gated_mlp, sparse_gemv, sparse_mlp, use_pdl)

# teal_style imports Triton: after actsparse.kernels, which turns on Triton's interpreter without CUDA.
sys.path.insert(0, str(ROOT / "benchmarks"))
from teal_style import teal_style_gemv  # noqa: E402

D, KV, INTER = 4096, 1024, 14336  # Llama-3-8B
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9]
# masked walk: (block_n, block_k, num_warps, num_stages[, depth]). Batch 1: one-shot tiles (one K chunk a program, as in
# TEAL's design: thousands of programs, many masked row loads in flight) and two chunks a program; see _masked_grid.
FMA_GRID = {1: [(32, 128, 4, 1), (64, 128, 4, 1), (128, 128, 8, 1), (64, 64, 4, 1), (128, 64, 4, 1),
                (64, 256, 8, 1), (32, 256, 4, 1), (256, 64, 8, 1), (16, 256, 4, 1), (128, 32, 4, 1),
                # TEAL's winning tile on the H200 (128 columns, 64 rows, 2 warps) and its neighbours
                (128, 64, 2, 1), (128, 32, 2, 1), (64, 64, 2, 1), (256, 32, 4, 1)],
            4: [(32, 64, 4, 1), (32, 32, 4, 1), (32, 64, 8, 1), (64, 32, 8, 1), (32, 64, 4, 1, 2), (32, 32, 4, 1, 2)]}
DOT_GRID = {1: [], 4: [(64, 128, 4, 3), (32, 128, 4, 3)]}
# gather walk: GatherConfig (block_n, seg_k, block_k, num_warps, use_dot, num_stages, depth);
# depth 2 keeps two gathered weight tiles in flight per program.
GATHER_GRID = {1: [(32, 4096, 128, 4), (32, 4096, 128, 4, False, 1, 2), (64, 4096, 128, 4),
                   (64, 4096, 128, 4, False, 1, 2), (64, 2048, 64, 4, False, 1, 2), (32, 2048, 128, 4),
                   (32, 2048, 128, 4, False, 1, 2), (32, 1024, 128, 4, False, 1, 2), (64, 1024, 128, 4, False, 1, 2),
                   (128, 4096, 64, 4, False, 1, 2), (128, 2048, 64, 8, False, 1, 2), (64, 4096, 128, 8, False, 1, 2),
                   (32, 4096, 256, 8, False, 1, 2), (16, 4096, 256, 4, False, 1, 2), (16, 2048, 256, 4),
                   (64, 2048, 128, 4), (32, 16384, 128, 4, False, 1, 2), (32, 8192, 128, 4, False, 1, 2),
                   (32, 4096, 64, 4, False, 1, 2), (64, 4096, 64, 2, False, 1, 2), (16, 4096, 128, 4, False, 1, 2),
                   # short slices, about one gathered step a program at 50% (the one-shot tiles over kept rows
                   # only: every load a full tile, many programs in flight); adding into a tensor takes atomics
                   (64, 256, 128, 4), (128, 256, 128, 4), (128, 512, 128, 8, False, 1, 2), (256, 256, 128, 8),
                   (64, 512, 128, 4, False, 1, 2),
                   # the H100's winners with the first indices loaded beside the count (GatherConfig.eager),
                   # and with no compaction launch (GatherConfig.fused: the walk's first programs write the lists)
                   (32, 4096, 128, 4, False, 1, 2, True), (32, 2048, 128, 4, False, 1, 2, True),
                   (32, 1024, 128, 4, False, 1, 2, True), (32, 4096, 128, 4, False, 1, 2, False, True),
                   (32, 2048, 128, 4, False, 1, 2, False, True), (32, 1024, 128, 4, False, 1, 2, False, True)],
               # batch 4: the FMA walk, and the tensor-core walk (use_dot, num_stages): a 16-row tl.dot a step
               4: [(64, 512, 32, 4), (32, 512, 32, 4), (32, 1024, 128, 4, True), (64, 1024, 128, 4, True),
                   (32, 2048, 128, 4, True), (32, 4096, 128, 4, True), (64, 2048, 64, 4, True),
                   (16, 1024, 128, 4, True), (32, 1024, 128, 4, True, 2), (64, 2048, 128, 8, True),
                   (32, 1024, 256, 4, True)]}
# one-shot tiles: OneshotConfig (block_n columns, block_k rows, num_warps); TEAL's winning tile (128, 64, 2) and
# its neighbours, taller and wider tiles (fewer programs, fewer atomics), and 4-warp tiles for batches 2-16.
ONESHOT_GRID = {1: [(128, 64, 2), (64, 64, 2), (128, 32, 2), (256, 32, 2), (64, 128, 2), (128, 64, 4),
                    (256, 64, 4), (128, 128, 4), (256, 64, 2), (128, 128, 2)],
                4: [(64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 32, 4)]}
DEV = "cuda"
TUNE_ACCUMULATE = False  # --tune-accumulate: sweep both kernels' tiles for every op adding into a tensor
ANATOMY = False  # --anatomy: each op's fixed cost (every row skipped) and its bytes' effective bandwidth
SMOKE = os.environ.get("BENCH_SMOKE") == "1"  # CPU smoke test of this script: tiny shapes, no timing
if SMOKE:
    D, KV, INTER, DEV = 64, 16, 96, "cpu"
    SPARSITIES = [0.0, 0.5]
    FMA_GRID = {1: [(32, 32, 4, 1), (16, 16, 4, 1, 2)], 4: [(32, 32, 4, 1)]}
    DOT_GRID = {1: [], 4: [(32, 32, 4, 1)]}
    GATHER_GRID = {1: [(32, 32, 16, 4), (64, 64, 32, 4, False, 1, 2)], 4: [(32, 32, 8, 4), (32, 32, 16, 4, True)]}
    ONESHOT_GRID = {1: [(32, 16, 2), (16, 32, 4)], 4: [(16, 16, 4)]}


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.t0 = time.time()
        self.budget = budget_s

    def left(self, fraction: float = 1.0) -> float:
        """Seconds left until `fraction` of the budget is spent."""
        return fraction * self.budget - (time.time() - self.t0)


def log(*a) -> None:
    print(*a, flush=True)


def time_graph(fn, reps: int = 10, warmup: int = 2) -> float:
    """Capture fn into a CUDA graph; return the median replay time in ms (events)."""
    if SMOKE:
        fn()
        return 1.0
    return graph_ms(fn, reps, warmup)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if torch.isnan(a).any():
        return float("nan")
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------- ceilings
def ceilings() -> dict:
    n = 1 << 30 if not SMOKE else 1 << 10  # 2 GiB of bf16 per buffer
    a = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = time_graph(lambda: b.copy_(a), reps=5)
    copy_tbs = 2 * a.numel() * 2 / (ms * 1e-3) / 1e12
    del a, b
    w = torch.randn(INTER * 2, D, device=DEV, dtype=torch.bfloat16)
    x = torch.randn(1, D, device=DEV, dtype=torch.bfloat16)
    ms = time_graph(lambda: F.linear(x, w), reps=10)
    gemv_tbs = w.numel() * 2 / (ms * 1e-3) / 1e12
    del w
    if not SMOKE:
        (torch.cuda.empty_cache() if not SMOKE else None)
    return {"copy_TBps": round(copy_tbs, 3), "cublas_gemv_TBps": round(gemv_tbs, 3)}


# ---------------------------------------------------------------------- kernel setup
_sparse_gemv, _sparse_gated_mlp = sparse_gemv, sparse_gated_mlp


def _with_impl(fn, impl: str, poison: bool = False):
    def call(*a, **kw):
        with configs.poison_outputs(poison):
            return fn(*a, impl=impl, **kw)
    return call


class Layers:
    """L copies of one Llama-3-8B block's weights in both layouts (L copies so nothing stays in L2)."""

    def __init__(self, n: int, dtype: torch.dtype) -> None:
        if SMOKE and dtype == torch.bfloat16:
            dtype = torch.float32  # the Triton interpreter cannot do bf16 arithmetic
        self.n, self.dtype = n, dtype
        self.sets = []
        for _ in range(n):
            def w(o, i):
                return (torch.randn(o, i, device=DEV) / math.sqrt(i)).to(dtype)
            wqkv, wo, w13, wd = w(D + 2 * KV, D), w(D, D), w(2 * INTER, D), w(D, INTER)
            self.sets.append(dict(wqkv=wqkv, wo=wo, w13=w13, wd=wd, wqkv_t=wqkv.t().contiguous(),
                                  wo_t=wo.t().contiguous(), wg_t=w13[:INTER].t().contiguous(),
                                  wu_t=w13[INTER:].t().contiguous(), wd_t=wd.t().contiguous()))

class Inputs:
    """Decode-step inputs at batch b and per-op thresholds that give a target row sparsity."""

    def __init__(self, lay: Layers, b: int) -> None:
        dt = lay.dtype
        self.b = b
        self.x = torch.randn(b, D, device=DEV, dtype=dt)
        self.g = (torch.rand(D, device=DEV) + 0.5).to(dt)
        self.a = torch.randn(b, D, device=DEV, dtype=dt)
        s0 = lay.sets[0]
        self.xn = ref.rmsnorm_ref(self.x, self.g, 1e-5)
        gu = self.xn.to(dt) @ s0["w13"].t()
        self.h = (F.silu(gu[:, :INTER].float()) * gu[:, INTER:].float()).to(dt)

    def thresholds(self, s: float) -> dict[str, torch.Tensor]:
        tx, ta, th = union_threshold(self.xn, s), union_threshold(self.a, s), union_threshold(self.h, s)
        dev = DEV
        return {"qkv": torch.tensor([tx] * 3, device=dev), "o": torch.tensor([ta], device=dev),
                "pair": torch.tensor([tx, tx], device=dev), "down": torch.tensor([th], device=dev),
                "tx": tx, "ta": ta, "th": th}


def sparse_ops(lay: Layers, inp: Inputs, th: dict, impl: str | dict = "auto") -> dict:
    """Callables running each fused sparse op over all L weight copies (impl: auto, masked, gather or oneshot, or
    a dict op -> impl), as the engine calls them."""
    sets = lay.sets
    x, g, a, h = inp.x, inp.g, inp.a, inp.h
    pick = impl if isinstance(impl, dict) else dict.fromkeys(("qkv", "o", "pair", "down"), impl)

    def qkv(s):
        return _sparse_gemv(x, s["wqkv_t"], th["qkv"], norm_weight=g, eps=1e-5, segments=(D, D + KV),
                            impl=pick["qkv"])

    def o(s):
        return _sparse_gemv(a, s["wo_t"], th["o"], residual=x, impl=pick["o"])

    def pair(s):
        return _sparse_gated_mlp(x, s["wg_t"], s["wu_t"], th["pair"], norm_weight=g, eps=1e-5, impl=pick["pair"])

    def down(s):
        return _sparse_gemv(h, s["wd_t"], th["down"], residual=x, impl=pick["down"])

    def block(s):
        qkv(s)
        o(s)
        pair(s)
        down(s)

    def over_sets(op):
        def run():
            for s in sets:
                op(s)
        return run

    return {name: over_sets(op) for name, op in (("qkv", qkv), ("o", o), ("pair", pair), ("down", down),
                                                  ("block", block))}


def check_ops(lay: Layers, inp: Inputs, th: dict, impl: str | dict = "auto") -> dict:
    """Relative error of each fused op against the torch reference on set 0 (outputs poisoned)."""
    s = r = lay.sets[0]
    x, g = inp.x, inp.g
    pick = impl if isinstance(impl, dict) else dict.fromkeys(("qkv", "o", "pair", "down"), impl)
    sparse_gemv = _with_impl(_sparse_gemv, pick["qkv"], poison=True)
    sparse_gated_mlp = _with_impl(_sparse_gated_mlp, pick["pair"], poison=True)
    o_gemv = _with_impl(_sparse_gemv, pick["o"], poison=True)
    down_gemv = _with_impl(_sparse_gemv, pick["down"], poison=True)
    out = {}
    out["qkv"] = rel(sparse_gemv(x, s["wqkv_t"], th["qkv"], norm_weight=g, eps=1e-5, segments=(D, D + KV)),
                     ref.sparse_gemv_ref(x, r["wqkv_t"], th["qkv"], norm_weight=g, eps=1e-5, segments=(D, D + KV)))
    out["o"] = rel(o_gemv(inp.a, s["wo_t"], th["o"], residual=x),
                   ref.sparse_gemv_ref(inp.a, r["wo_t"], th["o"], residual=x))
    out["pair"] = rel(sparse_gated_mlp(x, s["wg_t"], s["wu_t"], th["pair"], norm_weight=g, eps=1e-5),
                      ref.sparse_gated_mlp_ref(x, r["wg_t"], r["wu_t"], th["pair"], norm_weight=g, eps=1e-5))
    out["down"] = rel(down_gemv(inp.h, s["wd_t"], th["down"], residual=x),
                      ref.sparse_gemv_ref(inp.h, r["wd_t"], th["down"], residual=x))
    return out


def cublas_ops(lay: Layers, inp: Inputs) -> dict:
    x, a, h = inp.x, inp.a, inp.h
    xn = inp.xn.to(lay.dtype)

    def sep7():
        for s in lay.sets:
            wq, wk, wv = s["wqkv"][:D], s["wqkv"][D:D + KV], s["wqkv"][D + KV:]
            F.linear(xn, wq), F.linear(xn, wk), F.linear(xn, wv)
            F.linear(a, s["wo"])
            F.linear(xn, s["w13"][:INTER]), F.linear(xn, s["w13"][INTER:])
            F.linear(h, s["wd"])

    def fused4():
        for s in lay.sets:
            F.linear(xn, s["wqkv"])
            torch.addmm(x, a, s["wo"].t())
            F.linear(xn, s["w13"])
            torch.addmm(x, h, s["wd"].t())

    def fused4_t():  # cuBLAS on the transposed [in, out] layout the sparse kernels read
        for s in lay.sets:
            xn @ s["wqkv_t"]
            torch.addmm(x, a, s["wo_t"])
            xn @ s["wg_t"], xn @ s["wu_t"]
            torch.addmm(x, h, s["wd_t"])

    def op(name):
        def f():
            for s in lay.sets:
                if name == "qkv":
                    F.linear(xn, s["wqkv"])
                elif name == "o":
                    torch.addmm(x, a, s["wo"].t())
                elif name == "pair":
                    F.linear(xn, s["w13"])
                else:
                    torch.addmm(x, h, s["wd"].t())
        return f

    return {"block7": sep7, "block4": fused4, "block4_t": fused4_t, **{k: op(k) for k in ("qkv", "o", "pair", "down")}}


# ---------------------------------------------------------------------- tuning
KINDS = {"qkv": ("qkv", D, D + 2 * KV), "o": ("gemv", D, D), "pair": ("pair", D, INTER), "down": ("gemv", INTER, D)}


def _masked_grid(b: int, k: int, n: int, fma: dict | None = None, dot: dict | None = None) -> list[MaskedConfig]:
    """The masked-walk configs tried for one op and batch: batch 1 at one and two K chunks a program, others at
    split-K = auto/2, auto, 2·auto."""
    grid = []
    fma, dot_ = fma or FMA_GRID, DOT_GRID if dot is None else dot
    for c, dot in [(c, False) for c in fma[b]] + [(c, True) for c in dot_.get(b, [])]:
        base = MaskedConfig(*c[:4], use_dot=dot, depth=c[4] if len(c) > 4 else 1)
        tiles = -(-n // base.block_n) * (1 if not dot else -(-b // 16))
        if b == 1 and not dot:  # one chunk a program (one-shot tiles), and two; partials summed in order or atomically
            one_shot = -(-k // base.block_k)
            grid += [dataclasses.replace(base, split_k=sp, atomic=at)
                     for sp in sorted({one_shot, max(1, one_shot // 2)}) for at in (False, True)]
            continue
        auto = configs.choose_split(base, k, tiles, torch.device(DEV))
        grid += [dataclasses.replace(base, split_k=sp) for sp in sorted({max(1, auto // 2), auto, 2 * auto})]
    return grid


def _sweep(lay: Layers, clock: Clock, batches, weights: dict | None, grid, impl: str, reserve: float) -> tuple[dict, list]:
    """Time every config of grid(b, k, n) per op kind and batch at sparsity 0 / 0.5 / 0.9 (after checking it at 0.5);
    keep per (kind, K, N, batch bucket) the config with the least weighted sum of times relative to the best.

    weights: how much each sparsity counts in the choice (default 1 each). The engine runs an op on cuBLAS
    below its crossover, so `0:0,0.5:1,0.9:1` tunes for the regime the kernels actually serve.
    """
    weights = weights or {0.0: 1.0, 0.5: 1.0, 0.9: 1.0}
    tag = f"tune {impl}"
    best, rows = {}, []
    for b in batches:
        inp = Inputs(lay, b)
        ths = {s: inp.thresholds(s) for s in (0.0, 0.5, 0.9)}
        for op, (kind, k, n) in KINDS.items():
            res = {}
            for cfg in grid(b, k, n):
                if clock.left(reserve) < 0:
                    log(f"  {tag}: out of its time budget, stopping the sweep")
                    break
                try:
                    configs.COMPILED.clear()
                    with override_config(cfg):
                        err = check_ops(lay, inp, ths[0.5], impl)[op]
                        if not err < 2e-2:
                            log(f"  {tag} {op} b{b} {cfg}: WRONG rel err {err}")
                            continue
                        ts = {s: time_graph(sparse_ops(lay, inp, ths[s], impl)[op]) * 1e3 / lay.n for s in ths}
                except Exception as e:  # a config may not fit (shared memory, registers)
                    log(f"  {tag} {op} b{b} {cfg}: failed: {type(e).__name__}: {str(e)[:160]}")
                    continue
                res[cfg] = ts
                res_use = dict(configs.COMPILED)  # registers / spills / shared memory of the kernels just run
                rows.append({"op": op, "batch": b, "cfg": cfg.__dict__, "us": ts, "resources": res_use})
                log(f"  {tag} {op} b{b} {tuple(cfg.__dict__.values())}: " + " ".join(f"s{s}:{v:.1f}" for s, v in ts.items())
                    + "  " + " ".join(f"{k}={v}" for k, v in res_use.items()))
            if not res:
                continue
            mins = {s: min(r[s] for r in res.values()) for s in ths}
            cfg_best = min(res, key=lambda c: sum(weights.get(s, 1.0) * res[c][s] / mins[s] for s in ths))
            best[(kind, k, n, configs.batch_bucket(b))] = cfg_best
            log(f"  {tag} {op:5s} b{b}: best {cfg_best} -> " +
                " ".join(f"s{s}:{res[cfg_best][s]:.1f}us(min {mins[s]:.1f})" for s in ths))
    return best, rows


def tune_masked(lay: Layers, clock: Clock, batches=(1, 4), weights: dict | None = None) -> tuple[dict, list]:
    """The masked-walk sweep over FMA_GRID / DOT_GRID (see _sweep)."""
    return _sweep(lay, clock, batches, weights, _masked_grid, "masked", 0.35)


def tune_gather(lay: Layers, clock: Clock, batches=(1, 4), weights: dict | None = None) -> tuple[dict, list]:
    """The gather-walk sweep over GATHER_GRID (see _sweep)."""
    return _sweep(lay, clock, batches, weights, lambda b, k, n: [GatherConfig(*c) for c in GATHER_GRID[b]], "gather",
                  0.4)


def tune_oneshot(lay: Layers, clock: Clock, batches=(1, 4), weights: dict | None = None) -> tuple[dict, list]:
    """The one-shot tiles' sweep over ONESHOT_GRID (see _sweep)."""
    return _sweep(lay, clock, batches, weights, lambda b, k, n: [OneshotConfig(*c) for c in ONESHOT_GRID[b]],
                  "oneshot", 0.4)


CONFIG_CLASSES = {"masked": MaskedConfig, "gather": GatherConfig, "oneshot": OneshotConfig}
# kernel -> (its sweep, the configs table its winners go to, its command-line flag)
TUNERS = {"masked": (tune_masked, "TUNED_MASKED", "tune"), "gather": (tune_gather, "TUNED_GATHER", "tune_gather"),
          "oneshot": (tune_oneshot, "TUNED_ONESHOT", "tune_oneshot")}


# ---------------------------------------------------------------------- kernel microbenchmark
extra_impl: dict[str, str] = {}  # "op|b<batch>" -> the kernel fastest over 0.25-0.5, filled by kernel_bench
SIDE_BY_SIDE = ["masked", "gather", "oneshot"]  # kernels timed side by side per op (--impls)
CAPS = {"gather": configs.GATHER_MAX_BATCH, "oneshot": configs.ONESHOT_MAX_BATCH}


def kernel_bench(lay: Layers, dtype_name: str, batches, clock: Clock, meta: dict) -> list[dict]:
    """Time cuBLAS and the SIDE_BY_SIDE kernels per op and block, then the engine's pick (method "actsparse"): per
    sparsity and op the kernel fastest there, the block timed as one graph of those."""
    rows = []
    for b in batches:
        inp = Inputs(lay, b)
        cub = {k: time_graph(f) * 1e3 / lay.n for k, f in cublas_ops(lay, inp).items()}
        log(f"[kernel {dtype_name} b{b}] cuBLAS us: " + " ".join(f"{k}={v:.1f}" for k, v in cub.items()))
        ref_block = min(cub["block7"], cub["block4"], cub["block4_t"])
        for k, v in cub.items():
            rows.append({**meta, "kind": "kernel", "method": f"cublas-{k}" if k.startswith("block") else "cublas",
                         "op": "block" if k.startswith("block") else k, "sparsity": 0.0, "batch": b,
                         "dtype": dtype_name, "us_per_block" if k.startswith("block") else "us": round(v, 2)})
        impls = [i for i in SIDE_BY_SIDE if b <= CAPS.get(i, b)]
        impls = impls if (len(impls) > 1 and dtype_name == "bf16") else []
        side: dict[str, dict[float, dict[str, float]]] = {i: {} for i in impls}
        for impl in impls:  # the kernels side by side, same run, same inputs
            for s in SPARSITIES:
                if clock.left(0.6) < 0:
                    break
                th = inp.thresholds(s)
                errs = check_ops(lay, inp, th, impl)
                t = {k: time_graph(f) * 1e3 / lay.n for k, f in sparse_ops(lay, inp, th, impl).items()}
                side[impl][s] = t
                log(f"  {impl} s={s:.2f}: " + " ".join(f"{k}={v:.1f}" for k, v in t.items()) +
                    f"  max rel err {max(errs.values()):.1e}")
                if s == SPARSITIES[0]:
                    log(f"  {impl} resources: {configs.COMPILED}")
                for k in ("block", "qkv", "o", "pair", "down"):
                    rows.append({**meta, "kind": "kernel", "method": f"actsparse-{impl}", "op": k, "sparsity": s,
                                 "batch": b, "dtype": dtype_name,
                                 "us_per_block" if k == "block" else "us": round(t[k], 2),
                                 "max_rel_err": errs.get(k, max(errs.values()))})
        if "oneshot" in impls and b == 1:
            rows += prenormed_bench(lay, inp, clock, meta, dtype_name)
        if "oneshot" in impls:
            rows += accumulate_bench(lay, inp, side, clock, meta, dtype_name)
        common = [s for s in SPARSITIES if impls and all(s in side[i] for i in impls)]
        if common:
            # Per op, the kernel with the least summed time over the sparsities that keep quality (0.25-0.5):
            # what `impl="auto"` runs without a measured choice (configs.PREFERRED, installed here for this run).
            served = [s for s in common if 0.25 <= s <= 0.5] or common
            for op in ("qkv", "o", "pair", "down"):
                tv = {i: sum(side[i][s][op] for s in served) for i in impls}
                extra_impl[f"{op}|b{b}"] = min(tv, key=tv.get)
                kind, k, n = KINDS[op]
                configs.PREFERRED[(kind, k, n, configs.batch_bucket(b))] = extra_impl[f"{op}|b{b}"]
            log(f"  per-op winner at b{b}: {extra_impl}")
        for s in SPARSITIES:
            if clock.left(0.65) < 0:
                log("  kernel bench: out of its time budget")
                return rows
            th = inp.thresholds(s)
            pick = ({op: min((i for i in impls if s in side[i]), key=lambda i: side[i][s][op])
                     for op in ("qkv", "o", "pair", "down")} if any(s in side[i] for i in impls) else "auto")
            errs = check_ops(lay, inp, th, pick)
            ops = sparse_ops(lay, inp, th, pick)
            t = {k: time_graph(f) * 1e3 / lay.n for k, f in ops.items()}
            log(f"  s={s:.2f}: " + " ".join(f"{k}={v:.1f}" for k, v in t.items()) +
                f"  speedup vs best cuBLAS block {ref_block / t['block']:.2f}x  max rel err {max(errs.values()):.1e}"
                f"  kernels {pick}")
            rows.append({**meta, "kind": "kernel", "method": "actsparse", "op": "block", "sparsity": s, "batch": b,
                         "impl": pick,
                         "dtype": dtype_name, "us_per_block": round(t["block"], 2),
                         "us_cublas_block7": round(cub["block7"], 2), "us_cublas_block4": round(cub["block4"], 2),
                         "speedup": round(ref_block / t["block"], 3), "max_rel_err": max(errs.values())})
            for k in ("qkv", "o", "pair", "down"):
                rows.append({**meta, "kind": "kernel", "method": "actsparse", "op": k, "sparsity": s, "batch": b,
                             "dtype": dtype_name, "us": round(t[k], 2), "us_cublas": round(cub[k], 2),
                             "speedup": round(cub[k] / t[k], 3)})
    return rows


def prenormed_bench(lay: Layers, inp: Inputs, clock: Clock, meta: dict, dtype_name: str) -> list[dict]:
    """What the fused RMSNorm costs the one-shot tiles: q|k|v and gate|up fed the normalised x (no norm in the
    op, as TEAL's kernel is fed), against the fused op's rows (method "actsparse-oneshot")."""
    rows = []
    xn = inp.xn.to(lay.dtype)
    for s in SPARSITIES:
        if clock.left(0.6) < 0:
            break
        th = inp.thresholds(s)

        def qkv():
            for st in lay.sets:
                sparse_gemv(xn, st["wqkv_t"], th["qkv"], segments=(D, D + KV), impl="oneshot")

        def pair():
            for st in lay.sets:
                sparse_gated_mlp(xn, st["wg_t"], st["wu_t"], th["pair"], impl="oneshot")
        t = {"qkv": time_graph(qkv) * 1e3 / lay.n, "pair": time_graph(pair) * 1e3 / lay.n}
        log(f"  oneshot fed normalised x s={s:.2f}: " + " ".join(f"{k}={v:.1f}" for k, v in t.items()))
        rows += [{**meta, "kind": "kernel", "method": "oneshot-prenormed", "op": k, "sparsity": s, "batch": 1,
                  "dtype": dtype_name, "us": round(v, 2)} for k, v in t.items()]
    return rows


def anatomy(lay: Layers, inp: Inputs, raw_ops: dict, kernels: list, qkv32, gu32, meta: dict,
            dtype_name: str) -> list[dict]:
    """Where each op's time goes (--anatomy), per kernel, as the engine runs the ops (raw sums, adding into a
    tensor): with every row skipped (thresholds +inf) an op reads no weight, so its time is its fixed cost
    (launches, input and threshold loads, selection, compaction, the tail), and T(s) − T(all skipped) is what the
    weight bytes cost, at an effective bandwidth of bytes / that. "qkv_fed" / "pair_fed": the op fed the
    normalised x (no norm) adding into its sums without zeroing them: what the norm's pre-pass (and, on the
    one-shot tiles, the launch it is) costs (method "<kernel>-anatomy")."""
    rows = []
    xn = inp.xn.to(lay.dtype)
    qkv_n, pair_n = D * (D + 2 * KV), 2 * D * INTER
    nbytes = {"qkv": qkv_n, "qkv_fed": qkv_n, "o": D * D, "pair": pair_n, "pair_fed": pair_n, "down_gated": INTER * D}

    def fed(th, kern):
        return {"qkv_fed": lambda st: _sparse_gemv(xn, st["wqkv_t"], th["qkv"], segments=(D, D + KV),
                                                   accumulate=qkv32, impl=kern),
                "pair_fed": lambda st: _sparse_gated_mlp(xn, st["wg_t"], st["wu_t"], th["pair"], out=gu32,
                                                         impl=kern)}
    half = inp.thresholds(0.5)
    skip_all = {k: torch.full_like(v, float("inf")) if torch.is_tensor(v) else v for k, v in half.items()}
    shapes = {"qkv": (D, D + 2 * KV), "qkv_fed": (D, D + 2 * KV), "o": (D, D), "pair": (D, INTER),
              "pair_fed": (D, INTER), "down_gated": (INTER, D)}

    def one_launch(op: str) -> GatherConfig:
        """The gather walk's tiles of `op` (as tuned for adding into a tensor), without the compaction launch."""
        k, n = shapes[op]
        cfg = configs.TUNED_GATHER.get(("accumulate", k, n, configs.batch_bucket(inp.b))) or configs.default_gather(inp.b)
        return dataclasses.replace(cfg, fused=True)

    def on(kern: str, op: str, fn):
        """fn on the kernel `kern` names; "gather-fused": the gather walk with its lists written in its own launch."""
        if kern != "gather-fused":
            return lambda st: fn(st, kern)

        def run(st):
            with override_config(one_launch(op)):
                fn(st, "gather")
        return run
    # The gather walk's one-launch variant beside it: the compaction launch's share of the fixed cost.
    for kern in kernels + (["gather-fused"] if "gather" in kernels else []):
        t = {}
        for s, th in ((0.5, half), (0.9, inp.thresholds(0.9)), (1.0, skip_all)):
            ops = {**{op: on(kern, op, lambda st, k, fn=fn, th=th: fn(st, th, k))
                      for op, fn in raw_ops.items() if op != "down"},
                   **{op: on(kern, op, lambda st, k, th=th, op=op: fed(th, k)[op](st)) for op in ("qkv_fed", "pair_fed")}}
            t[s] = {op: time_graph(lambda fn=fn: [fn(st) for st in lay.sets]) * 1e3 / lay.n for op, fn in ops.items()}
            rows += [{**meta, "kind": "kernel", "method": f"{kern}-anatomy", "op": op, "sparsity": s, "batch": inp.b,
                      "dtype": dtype_name, "us": round(v, 2)} for op, v in t[s].items()]
        bw = {op: nbytes[op] * lay.dtype.itemsize * 0.5 / ((t[0.5][op] - t[1.0][op]) * 1e-6) / 1e12
              for op in t[0.5] if t[0.5][op] > t[1.0][op]}
        log(f"  anatomy {kern}: fixed (all rows skipped) " + " ".join(f"{op}={v:.1f}" for op, v in t[1.0].items())
            + " us; at 0.5 " + " ".join(f"{op}={v:.1f}" for op, v in t[0.5].items())
            + "; bytes' share at 0.5 as TB/s " + " ".join(f"{op}={v:.2f}" for op, v in bw.items()))
    return rows


def moe_anatomy(clock: Clock, meta: dict, preset: str = "qwen3-30b-a3b", n_sets: int = 4) -> list[dict]:
    """Where a mixture-of-experts layer's decode time goes (--moe-anatomy), batch 1, as the engine runs it: the
    norm + router GEMV + routing as one launch after the norm ("route"; "route-cublas": the GEMV on cuBLAS
    between), the routed experts' gate|up raw sums (expert-indexed one-shot tiles,
    "pair"; the gather walk over the normed state's two lists, "pair-gather") and the gated down adding into the fp32
    stream ("down", "down-gather": each routed expert's own list), each at threshold 0 (the dense engine's path),
    at the 0.5 / 0.9 |x| quantiles, and with every row skipped (+inf: the fixed cost); the bytes' effective
    bandwidth = the routed experts' bytes read at 0 (or 0.5) / (T − T_skipped). `n_sets` layers' weights rotate so
    no op reads from L2 (method "moe-anatomy")."""
    from actsparse.engine import PRESETS
    from actsparse.kernels import moe_route, rmsnorm

    cfg = PRESETS[preset]
    if SMOKE:  # the same layer, small
        cfg = dataclasses.replace(cfg, hidden_size=64, n_experts=8, top_k=2, moe_intermediate_size=32)
    d, e, ie, top = cfg.hidden_size, cfg.n_experts, cfg.moe_intermediate_size, cfg.top_k
    dt = torch.bfloat16 if not SMOKE else torch.float32
    gen = torch.Generator(device=DEV).manual_seed(0)
    sets = [{"router": (torch.randn(e, d, device=DEV, generator=gen) / d**0.5).to(dt),
             "g": (torch.rand(d, device=DEV, generator=gen) + 0.5).to(dt),
             "weg": (torch.randn(e, d, ie, device=DEV, generator=gen) / d**0.5).to(dt),
             "weu": (torch.randn(e, d, ie, device=DEV, generator=gen) / d**0.5).to(dt),
             "wed": (torch.randn(e, ie, d, device=DEV, generator=gen) / ie**0.5).to(dt)} for _ in range(n_sets)]
    x = torch.randn(1, d, device=DEV, generator=gen).to(dt)
    stream = torch.zeros(1, d, device=DEV)
    sums = torch.zeros(1, top, 2, ie, device=DEV)
    st0 = sets[0]
    xn = rmsnorm(x, st0["g"], 1e-6)
    idx, w = moe_route(xn.float() @ st0["router"].float().t(), top, renorm=True, w_dtype=dt)
    _sparse_gated_mlp(xn, st0["weg"], st0["weu"], torch.zeros(2, device=DEV), experts=idx, out=sums)
    a = (F.silu(sums[0, :, 0]) * sums[0, :, 1]).abs().flatten().float()
    levels = {0.0: (0.0, 0.0), 0.5: None, 0.9: None, 1.0: (float("inf"), float("inf"))}
    for q in (0.5, 0.9):
        levels[q] = (float(torch.quantile(xn.abs().float().flatten(), q)), float(torch.quantile(a, q)))
    routed = top * 3 * d * ie * torch.finfo(dt).bits // 8   # the routed experts' bytes at threshold 0

    def route(st):  # as the engine runs it: the router GEMV inside the routing launch
        moe_route(rmsnorm(x, st["g"], 1e-6), top, renorm=True, w_dtype=dt, router=st["router"])

    def route_cublas(st):  # the router GEMV on cuBLAS, then the routing launch
        moe_route(F.linear(rmsnorm(x, st["g"], 1e-6), st["router"]), top, renorm=True, w_dtype=dt)

    def ops(tg, td):
        tgu, tdn = torch.full((2,), tg, device=DEV), torch.full((1,), td, device=DEV)
        return {"route": route, "route-cublas": route_cublas,
                "pair": lambda st: _sparse_gated_mlp(xn, st["weg"], st["weu"], tgu, experts=idx, out=sums),
                "down": lambda st: _sparse_gemv(sums, st["wed"], tdn, gated="silu", accumulate=stream, experts=idx,
                                                expert_weights=w),
                "pair-gather": lambda st: _sparse_gated_mlp(xn, st["weg"], st["weu"], tgu, experts=idx, out=sums,
                                                            impl="gather"),
                "down-gather": lambda st: _sparse_gemv(sums, st["wed"], tdn, gated="silu", accumulate=stream,
                                                       experts=idx, expert_weights=w, impl="gather")}
    rows, t = [], {}
    for s, (tg, td) in levels.items():
        if clock.left(0.9) < 0:
            log("  moe anatomy: out of its time budget")
            break
        t[s] = {op: time_graph(lambda fn=fn: [fn(st) for st in sets]) * 1e3 / n_sets for op, fn in ops(tg, td).items()}
        rows += [{**meta, "kind": "kernel", "method": "moe-anatomy", "model": preset, "op": op, "sparsity": s,
                  "batch": 1, "dtype": "bf16", "us": round(v, 2)} for op, v in t[s].items()]
        log(f"  moe anatomy {preset} s={s}: " + " ".join(f"{op}={v:.1f}" for op, v in t[s].items()) + " us")
    if 0.0 in t and 1.0 in t:
        bw = {f"{op}@{s}": routed * (2 if op.startswith("pair") else 1) / 3 * (1 - s)
              / ((t[s][op] - t[1.0][op]) * 1e-6) / 1e12
              for op in ("pair", "down", "pair-gather", "down-gather") for s in (0.0, 0.5)
              if s in t and t[s][op] > t[1.0][op]}
        log(f"  moe anatomy {preset}: routed bytes {routed / 2**20:.1f} MiB a layer; bytes' share as TB/s "
            + " ".join(f"{k}={v:.2f}" for k, v in bw.items()))
    return rows


cats_tuned: dict[str, dict] = {}  # "walk" / "oneshot" -> the cats_up tiles --cats-anatomy chose
# cats_up's tiles swept by --cats-anatomy: the masked walk (block_n W_u rows, block_k columns a step, warps, split
# of K: 0 = enough programs to fill the GPU) and the one-shot tiles (block_n rows × block_k columns, warps).
CATS_WALK_GRID = [(n, k, w, sp) for n in (16, 32, 64) for k in (64, 128, 256) for w in (4,) for sp in (0, 1, 4)]
CATS_ONESHOT_GRID = [(64, 128, 4), (128, 64, 2), (32, 128, 2), (64, 64, 2), (16, 256, 2), (32, 256, 4),
                     (64, 256, 4), (128, 128, 4), (32, 64, 2), (16, 128, 2)]
# The kept-rows walk: (block_n channels a program, rows a step, block_k columns a step, warps, stages).
CATS_ROWS_GRID = [(32, 16, 256, 4, 2), (32, 16, 256, 4, 1), (32, 16, 256, 4, 3), (32, 16, 512, 4, 2),
                  (32, 16, 512, 8, 2), (32, 8, 512, 4, 2), (32, 8, 256, 4, 2), (64, 16, 256, 4, 2),
                  (64, 32, 256, 8, 2), (64, 16, 512, 8, 2), (64, 32, 128, 4, 2), (16, 8, 512, 4, 2),
                  (16, 8, 256, 4, 2), (16, 16, 256, 4, 2), (32, 32, 128, 4, 2), (32, 16, 128, 4, 3),
                  (64, 8, 512, 4, 2), (128, 16, 256, 4, 2), (128, 32, 256, 8, 2), (32, 32, 256, 8, 2),
                  # around the H100's winner (16, 8, 512, 4, 2): more bytes a step, fewer channels a program
                  (16, 16, 1024, 8, 2), (16, 8, 1024, 4, 2), (32, 16, 1024, 8, 2), (16, 8, 512, 4, 3),
                  (8, 8, 512, 4, 2), (16, 4, 1024, 4, 2), (16, 8, 512, 8, 2)]
if SMOKE:
    CATS_WALK_GRID, CATS_ONESHOT_GRID = [(16, 32, 4, 0), (32, 16, 4, 1)], [(16, 32, 2), (32, 16, 4)]
    CATS_ROWS_GRID = [(32, 8, 32, 4, 1), (16, 4, 64, 4, 2)]


def cats_anatomy(clock: Clock, meta: dict, n_sets: int = 4) -> list[dict]:
    """Where a CATS MLP's decode time goes (--cats-anatomy), Llama-3-8B shapes, batch 1, bf16, as the engine runs
    it: the gate (RMSNorm, cuBLAS, activation: "gate"; or the one-shot tiles at threshold 0 with the activation
    fused: "gate-oneshot"), the up rows `cats_up` keeps (|act(gate)| over its 0.5 / 0.8 quantile; every walk and
    one-shot tile of CATS_WALK_GRID / CATS_ONESHOT_GRID, the fastest over both levels installed for the rest of the
    run), cuBLAS's dense up beside it (the bytes' rate), and down over h's zeros adding into the fp32 stream (the
    gather walk and the one-shot tiles). Method "cats-anatomy"; `n_sets` weight sets rotate so nothing is in L2."""
    from actsparse.kernels import cats_up, rmsnorm
    from actsparse.kernels import cats as cats_mod

    dt = torch.bfloat16 if not SMOKE else torch.float32
    gen = torch.Generator(device=DEV).manual_seed(0)

    def w(o, i):
        return (torch.randn(o, i, device=DEV, generator=gen) / math.sqrt(i)).to(dt)
    sets = []
    for _ in range(n_sets):
        wg, wu, wd = w(INTER, D), w(INTER, D), w(D, INTER)
        sets.append({"wg": wg, "wg_t": wg.t().contiguous(), "wu": wu, "wd_t": wd.t().contiguous()})
    g = (torch.rand(D, device=DEV, generator=gen) + 0.5).to(dt)
    x = torch.randn(1, D, device=DEV, generator=gen)  # the fp32 residual stream
    stream = torch.zeros(1, D, device=DEV)
    xn = rmsnorm(x, g, 1e-5).to(dt)
    ag = F.silu(xn @ sets[0]["wg"].t())  # [1, I] CATS's gate activations
    zero = torch.zeros(1, device=DEV)
    levels = {s: torch.tensor([float(torch.quantile(ag.abs().float().flatten(), s))], device=DEV) for s in (0.5, 0.8)}
    hs = {s: cats_up(x, sets[0]["wu"], ag, t, norm_weight=g, eps=1e-5, impl="walk") for s, t in levels.items()}
    rows, t = [], {}

    def timed(name: str, fn, s=None) -> float:
        us = time_graph(lambda: [fn(st) for st in sets]) * 1e3 / n_sets
        rows.append({**meta, "kind": "kernel", "method": "cats-anatomy", "model": "llama3-8b-shapes", "op": name,
                     "sparsity": s, "batch": 1, "dtype": "bf16", "us": round(us, 2)})
        return us

    t["gate"] = timed("gate", lambda st: F.silu(rmsnorm(x, g, 1e-5).to(dt) @ st["wg"].t()))
    t["gate-oneshot"] = timed("gate-oneshot", lambda st: _sparse_gemv(x, st["wg_t"], zero, norm_weight=g, eps=1e-5,
                                                                      act="silu", impl="oneshot"))
    t["up-dense"] = timed("up-dense", lambda st: xn @ st["wu"].t())
    log(f"  cats anatomy: gate (norm, cuBLAS, silu) {t['gate']:.1f} us, gate on the one-shot tiles at threshold 0 "
        f"{t['gate-oneshot']:.1f}, cuBLAS up {t['up-dense']:.1f}")
    best = {}
    key = (D, INTER, 1)
    tables = {"oneshot": (cats_mod.TUNED_ONESHOT_UP, key), "rows": (cats_mod.TUNED_ROWS_UP, key[:2])}
    for impl, grid in (("walk", CATS_WALK_GRID), ("oneshot", CATS_ONESHOT_GRID), ("rows", CATS_ROWS_GRID)):
        got = {}
        for c in grid:
            if clock.left(0.5) < 0:
                log(f"  cats anatomy {impl}: out of its time budget")
                break
            cfg = (MaskedConfig(block_n=c[0], block_k=c[1], num_warps=c[2], split_k=c[3]) if impl == "walk" else
                   OneshotConfig(block_n=c[0], block_k=c[1], num_warps=c[2]) if impl == "oneshot" else
                   cats_mod.RowsConfig(block_n=c[0], rows=c[1], block_k=c[2], num_warps=c[3], num_stages=c[4]))
            name = "x".join(map(str, c))

            def up(st, th, cfg=cfg, impl=impl):
                with override_config(cfg if impl == "walk" else None):
                    cats_up(x, st["wu"], ag, th, norm_weight=g, eps=1e-5, impl=impl)
            table, tkey = tables.get(impl, ({}, None))
            old = table.get(tkey)
            if impl in tables:
                table[tkey] = cfg
            try:
                got[name] = (sum(timed(f"up-{impl}-{name}", lambda st, th=th: up(st, th), s) for s, th in levels.items()),
                             cfg)
            except Exception as e:  # a tile the compiler refuses (resources): its row says so, the sweep goes on
                log(f"  cats up {impl} {name}: failed ({str(e).splitlines()[0][:100]})")
            finally:
                if impl in tables and old is None:
                    table.pop(tkey)
                elif impl in tables:
                    table[tkey] = old
        if got:
            ranked = sorted(got.items(), key=lambda kv: kv[1][0])
            best[impl] = ranked[0][1][1]
            log(f"  cats up {impl} (us at 0.5 + 0.8): " + " ".join(f"{n}={v[0]:.1f}" for n, v in ranked[:8])
                + f" -> {best[impl]}")
    if "walk" in best:
        configs.TUNED_MASKED[("cats_up",) + key] = best["walk"]
    if "oneshot" in best:
        cats_mod.TUNED_ONESHOT_UP[key] = best["oneshot"]
    if "rows" in best:
        cats_mod.TUNED_ROWS_UP[key[:2]] = best["rows"]
    cats_tuned.update({k: v.__dict__ for k, v in best.items()})
    for s, th in levels.items():
        ups = {impl: timed(f"up-{impl}", lambda st, th=th, impl=impl: cats_up(x, st["wu"], ag, th, norm_weight=g,
                                                                              eps=1e-5, impl=impl), s)
               for impl in ("walk", "oneshot", "rows")}
        downs = {k: timed(f"down-{k}", lambda st, k=k: _sparse_gemv(hs[s], st["wd_t"], zero, accumulate=stream,
                                                                    impl=k), s) for k in ("gather", "oneshot")}
        log(f"  cats anatomy s={s}: up " + " ".join(f"{k}={v:.1f}" for k, v in ups.items()) + " us (tuned), down "
            + " ".join(f"{k}={v:.1f}" for k, v in downs.items()) + f"; rows kept {float((hs[s] != 0).float().mean()):.3f}")
    return rows


# sparse_mlp's tiles swept by --mlp-anatomy: MlpConfig (block_i channels of h a program, block_k kept input rows a
# walk step, block_d output columns a down step, num_warps, num_stages, depth, eager, joint, down_depth[,
# reduce_each]); the
# first: the H100's winner with gate and up walked apart and no W_d prefetch (e4965c4: 87.5 us at 0.5)
MLP_GRID = [(64, 128, 128, 4, 1, 2, False, False, 1), (64, 128, 128, 4, 1, 2, False, False, 2),
            (32, 64, 128, 2, 1, 2, False, False, 2),
            # the joint walk holds both matrices' accumulators and tiles: tiles that compile without spilling (sm_90)
            (64, 32, 128, 4, 1, 2, False, True, 2), (64, 32, 256, 4, 1, 2, False, True, 2),
            (64, 64, 128, 8, 1, 2, False, True, 2), (64, 64, 256, 8, 1, 2, False, True, 2),
            (32, 32, 128, 2, 1, 2, False, True, 2), (32, 64, 256, 4, 1, 2, False, True, 2),
            (128, 32, 128, 8, 1, 2, False, True, 2), (64, 32, 128, 4, 1, 2, False, True, 1),
            # W_d's tiles left to Triton's software pipelining (cp.async stages) instead of the explicit prefetch
            (64, 64, 128, 8, 3, 2, False, True, 1), (64, 32, 128, 4, 2, 2, False, True, 1),
            # each step's products summed at once (MlpConfig.reduce_each): taller tiles in flight, no spill
            (64, 128, 128, 4, 1, 2, False, True, 2, True), (32, 128, 128, 4, 1, 2, False, True, 2, True),
            (32, 256, 128, 8, 1, 2, False, True, 2, True)]
if SMOKE:
    MLP_GRID = [(32, 16, 32, 2, 1, 2, False, True, 2), (16, 32, 16, 2, 1, 1, True, False, 1)]
mlp_tuned: dict[str, dict] = {}  # "K|I|D|batch" -> the sparse_mlp tiles --mlp-anatomy chose


def mlp_anatomy(clock: Clock, meta: dict, n_sets: int = 4) -> list[dict]:
    """The whole gated MLP in two launches (`sparse_mlp`, --mlp-anatomy) against the engine's raw path (gate|up's
    raw sums + the gated down adding into the fp32 stream, each on its fastest kernel), Llama-3-8B shapes, batch
    1, bf16: its tiles swept at 0.25 + 0.5 (the fastest installed for the rest of the run), then both at each
    sparsity and with every row skipped (thresholds +inf: the fixed cost). Method "mlp-anatomy", ops "fused" /
    "raw"; `n_sets` weight sets rotate so nothing is in L2."""
    from actsparse.kernels import MlpConfig, sparse_mlp
    from actsparse.kernels import fused_mlp as fm

    dt = torch.bfloat16 if not SMOKE else torch.float32
    gen = torch.Generator(device=DEV).manual_seed(1)

    def w(i, o):
        return (torch.randn(i, o, device=DEV, generator=gen) / math.sqrt(i)).to(dt)
    sets = [{"wg_t": w(D, INTER), "wu_t": w(D, INTER), "wd_t": w(INTER, D)} for _ in range(n_sets)]
    g = (torch.rand(D, device=DEV, generator=gen) + 0.5).to(dt)
    x = torch.randn(1, D, device=DEV, generator=gen)  # the fp32 residual stream
    stream = torch.zeros(1, D, device=DEV)
    gu32 = torch.zeros(2, 1, INTER, device=DEV)
    xn = ref.rmsnorm_ref(x, g, 1e-5)
    h0 = F.silu(xn.to(dt).float() @ sets[0]["wg_t"].float()) * (xn.to(dt).float() @ sets[0]["wu_t"].float())

    def levels(s: float) -> tuple[torch.Tensor, torch.Tensor]:
        if s >= 1.0:  # every row skipped: no weight read at all
            return torch.full((2,), float("inf"), device=DEV), torch.full((1,), float("inf"), device=DEV)
        return (torch.full((2,), union_threshold(xn, s), device=DEV),
                torch.full((1,), union_threshold(h0, s), device=DEV))

    def fused(st, th):
        sparse_mlp(x, st["wg_t"], st["wu_t"], st["wd_t"], th[0], th[1], norm_weight=g, eps=1e-5, accumulate=stream)

    def pair(st, th, k):
        _sparse_gated_mlp(x, st["wg_t"], st["wu_t"], th[0], norm_weight=g, eps=1e-5, out=gu32, impl=k)

    def down(st, th, k):
        _sparse_gemv(gu32, st["wd_t"], th[1], gated="silu", accumulate=stream, impl=k)

    def us(fn) -> float:
        return time_graph(lambda: [fn(st) for st in sets]) * 1e3 / n_sets

    rows = []
    key = (D, INTER, D, 1)
    ths = [levels(s) for s in (0.25, 0.5)]
    got = {}
    old = fm.TUNED_MLP.get(key)
    for c in MLP_GRID:
        if clock.left(0.5) < 0:
            log("  mlp anatomy: out of its time budget, stopping the sweep")
            break
        cfg = MlpConfig(*c)
        fm.TUNED_MLP[key] = cfg
        try:
            got[cfg] = sum(us(lambda st, th=th: fused(st, th)) for th in ths)
        except Exception as e:  # a tile the compiler refuses (resources): logged, the sweep goes on
            log(f"  mlp {c}: failed ({str(e).splitlines()[0][:100]})")
    if got:
        ranked = sorted(got.items(), key=lambda kv: kv[1])
        fm.TUNED_MLP[key] = ranked[0][0]
        mlp_tuned["|".join(map(str, key))] = ranked[0][0].__dict__
        log("  mlp tiles (us at 0.25 + 0.5): " + " ".join(
            f"{c.block_i}x{c.block_k}x{c.block_d}x{c.num_warps}w{c.num_stages}s{'d2' if c.depth == 2 else ''}"
            f"{'e' if c.eager else ''}{'j' if c.joint else ''}{'r' if c.reduce_each else ''}dd{c.down_depth}={v:.1f}"
            for c, v in ranked[:8]) + f" -> {ranked[0][0]}")
    elif old is None:
        fm.TUNED_MLP.pop(key, None)
    else:
        fm.TUNED_MLP[key] = old
    kernels = ("oneshot", "gather")
    for s in (0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9, 1.0):
        if clock.left(0.6) < 0:
            log("  mlp anatomy: out of its time budget")
            break
        th = levels(s)
        tp = {k: us(lambda st, k=k: pair(st, th, k)) for k in kernels}
        td = {k: us(lambda st, k=k: down(st, th, k)) for k in kernels}
        kp, kd = min(tp, key=tp.get), min(td, key=td.get)
        t = {"fused": us(lambda st: fused(st, th)),
             "raw": us(lambda st: (pair(st, th, kp), down(st, th, kd)))}
        err = None
        if s < 1.0:
            stream.zero_()
            fused(sets[0], th)
            want = ref.sparse_mlp_ref(x, sets[0]["wg_t"].float(), sets[0]["wu_t"].float(),
                                      sets[0]["wd_t"].float(), th[0], th[1], norm_weight=g, eps=1e-5)
            err = rel(stream, want)
        rows += [{**meta, "kind": "kernel", "method": "mlp-anatomy", "model": "llama3-8b-shapes", "op": op,
                  "sparsity": s, "batch": 1, "dtype": "bf16", "us": round(v, 2), "max_rel_err": err,
                  "impl": f"{kp} + gated {kd}" if op == "raw" else None} for op, v in t.items()]
        log(f"  mlp anatomy s={s}: fused {t['fused']:.1f} us, raw pair {kp} + gated down {kd} {t['raw']:.1f} "
            f"(pair {'/'.join(f'{v:.1f}' for v in tp.values())}, down {'/'.join(f'{v:.1f}' for v in td.values())} "
            f"oneshot/gather); fused rel err {err}")
    return rows


def topk_anatomy(meta: dict, n_sets: int = 4) -> list[dict]:
    """What a per-token Top-K level costs before each op (--topk-anatomy), Llama-3-8B shapes, batch 1: the
    `topk_thresholds` launch of q|k|v (3 rows, the stream's RMSNorm), o (1 row), gate|up (2 rows, RMSNorm) and
    down (1 row of act(gate)·up from the pair's raw sums), for each warp count of long rows (topk.WARPS_LARGE);
    the fastest a layer is installed for the rest of the run (method "topk-anatomy", op "<op>-<warps>w")."""
    from actsparse.kernels import topk as topk_mod, topk_thresholds

    gen = torch.Generator(device=DEV).manual_seed(0)
    g = (torch.rand(D, device=DEV, generator=gen) + 0.5).to(torch.bfloat16 if not SMOKE else torch.float32)
    cases = {"qkv": (torch.randn(1, D, device=DEV, generator=gen), 3, {"norm_weight": g, "eps": 1e-5}),
             "o": (torch.randn(1, D, device=DEV, generator=gen).to(g.dtype), 1, {}),
             "pair": (torch.randn(1, D, device=DEV, generator=gen), 2, {"norm_weight": g, "eps": 1e-5}),
             "down": (torch.randn(2, 1, INTER, device=DEV, generator=gen), 1, {"gated": "silu"})}
    rows, per_layer = [], {}
    for warps in (8, 16):
        topk_mod.WARPS_LARGE = warps
        t = {}
        for op, (x, s, kw) in cases.items():
            n_zero = torch.full((s,), x.shape[-1] // 2, device=DEV, dtype=torch.int32)
            outs = [torch.empty(s, device=DEV) for _ in range(n_sets)]
            t[op] = time_graph(lambda: [topk_thresholds(x, n_zero, o, **kw) for o in outs]) * 1e3 / n_sets
            rows.append({**meta, "kind": "kernel", "method": "topk-anatomy", "model": "llama3-8b-shapes",
                         "op": f"{op}-{warps}w", "sparsity": 0.5, "batch": 1, "dtype": "bf16",
                         "us": round(t[op], 2)})
        per_layer[warps] = sum(t.values())
        log(f"  topk anatomy, long rows on {warps} warps: " + " ".join(f"{op}={v:.1f}" for op, v in t.items())
            + f" us (a layer: {per_layer[warps]:.1f})")
    topk_mod.WARPS_LARGE = min(per_layer, key=per_layer.get)
    log(f"  topk: long rows on {topk_mod.WARPS_LARGE} warps for the rest of the run")
    return rows


def rsparse_anatomy(meta: dict, s: float = 0.5, alpha: float = 0.8, n_sets: int = 4) -> list[dict]:
    """Where an R-Sparse block's time goes (--rsparse-anatomy), Llama-3-8B shapes, batch 1, bf16, as the engine runs
    it on the fp32 stream: each op's sparse kernel alone (q|k|v and gate|up writing raw sums, o and the gated down
    adding into the stream; thresholds keeping (1 − s)·alpha of the channels), its low-rank path alone
    (`lowrank_add`, R-Sparse's ranks for that budget: r = in·out·(1 − s)(1 − alpha) / (in + out)), and both
    (method "rsparse-anatomy", op "<op>-sparse" / "-lowrank" / "-both")."""
    from actsparse.kernels import lowrank_add, pack_lowrank

    dt = torch.bfloat16 if not SMOKE else torch.float32
    gen = torch.Generator(device=DEV).manual_seed(0)

    def w(i, o):
        return (torch.randn(i, o, device=DEV, generator=gen) / math.sqrt(i)).to(dt)

    def rank(i, o):
        return max(1, int(i * o * (1 - s) * (1 - alpha) / (i + o)))
    shapes = {"qkv": (D, (D, KV, KV)), "o": (D, (D,)), "gu": (D, (INTER, INTER)), "down": (INTER, (D,))}
    sets = []
    for _ in range(n_sets):
        st = {"wqkv_t": w(D, D + 2 * KV), "wo_t": w(D, D), "wg_t": w(D, INTER), "wu_t": w(D, INTER), "wd_t": w(INTER, D)}
        for op, (k, widths) in shapes.items():
            st[op] = pack_lowrank([(w(k, rank(k, n)), w(n, rank(k, n))) for n in widths], widths, dt, torch.device(DEV))
        sets.append(st)
    g = (torch.rand(D, device=DEV, generator=gen) + 0.5).to(dt)
    x = torch.randn(1, D, device=DEV, generator=gen)  # the fp32 stream
    a = torch.randn(1, D, device=DEV, generator=gen).to(dt)  # attention's output
    qkv32 = torch.zeros(1, D + 2 * KV, device=DEV)
    pair = torch.randn(2, 1, INTER, device=DEV, generator=gen)
    h = F.silu(pair[0]) * pair[1]
    q = 1 - (1 - s) * alpha  # the dropped fraction
    tx = float(torch.quantile(ref.rmsnorm_ref(x, g, 1e-5).abs().flatten(), q))
    t = {"qkv": torch.full((3,), tx, device=DEV), "o": torch.full((1,), float(torch.quantile(a.float().abs(), q)),
                                                                 device=DEV),
         "gu": torch.full((2,), tx, device=DEV), "down": torch.full((1,), float(torch.quantile(h.abs(), q)), device=DEV)}
    stream = x.clone()
    sparse = {"qkv": lambda st: _sparse_gemv(x, st["wqkv_t"], t["qkv"], norm_weight=g, eps=1e-5, segments=(D, D + KV),
                                             out=qkv32),
              "o": lambda st: _sparse_gemv(a, st["wo_t"], t["o"], accumulate=stream),
              "gu": lambda st: _sparse_gated_mlp(x, st["wg_t"], st["wu_t"], t["gu"], norm_weight=g, eps=1e-5, out=pair),
              "down": lambda st: _sparse_gemv(pair, st["wd_t"], t["down"], gated="silu", accumulate=stream)}
    low = {"qkv": lambda st: lowrank_add(x, t["qkv"], *st["qkv"], qkv32, norm_weight=g, eps=1e-5, segments=(D, D + KV)),
           "o": lambda st: lowrank_add(a, t["o"], *st["o"], stream),
           "gu": lambda st: lowrank_add(x, t["gu"], *st["gu"], pair, norm_weight=g, eps=1e-5, segments=(INTER,)),
           "down": lambda st: lowrank_add(pair, t["down"], *st["down"], stream, gated="silu")}
    rows, got = [], {}
    for op in shapes:
        for part, fns in (("sparse", (sparse[op],)), ("lowrank", (low[op],)), ("both", (sparse[op], low[op]))):
            us = time_graph(lambda fns=fns: [f(st) for st in sets for f in fns]) * 1e3 / n_sets
            got[f"{op}-{part}"] = us
            rows.append({**meta, "kind": "kernel", "method": "rsparse-anatomy", "model": "llama3-8b-shapes",
                         "op": f"{op}-{part}", "sparsity": s, "batch": 1, "dtype": "bf16", "us": round(us, 2)})
        log(f"  rsparse anatomy {op}: sparse {got[op + '-sparse']:.1f} us, low-rank {got[op + '-lowrank']:.1f}, "
            f"both {got[op + '-both']:.1f} (ranks {[rank(shapes[op][0], n) for n in shapes[op][1]]})")
    return rows


TILE_TABLES = {"oneshot": configs.TUNED_ONESHOT, "gather": configs.TUNED_GATHER}
accumulate_tuned: dict[str, dict] = {}  # "kernel|accumulate|K|N|batch" -> the tile accumulate_bench's sweep chose


def accumulate_bench(lay: Layers, inp: Inputs, side: dict, clock: Clock, meta: dict, dtype_name: str) -> list[dict]:
    """o and down adding straight into an fp32 residual stream (`sparse_gemv(accumulate=)`: no counter, epilogue or
    zeroing), q|k|v's raw fp32 sums (`out=`) and gate|up's, down forming act(gate)·up from those, per op and kernel
    (methods "oneshot-accumulate", "gather-accumulate"), and the block as the engine runs it: q|k|v raw where
    faster than the side-by-side kernels, gate|up raw + gated down where faster than gate|up's best + down, each op
    on its fastest kernel (method "actsparse-accumulate")."""
    rows = []
    h32 = inp.x.float()
    acc = {"o": torch.zeros(inp.b, D, device=DEV), "down": torch.zeros(inp.b, D, device=DEV)}
    gu32 = torch.zeros(2, inp.b, INTER, device=DEV)  # gate|up's raw sums
    qkv32 = torch.zeros(inp.b, D + 2 * KV, device=DEV)

    def qkv(s, th, impl="oneshot"):  # q|k|v's raw fp32 sums (out=), which the attention kernel reads
        _sparse_gemv(inp.x, s["wqkv_t"], th["qkv"], norm_weight=inp.g, eps=1e-5, segments=(D, D + KV),
                     out=qkv32, impl=impl)

    def o(s, th, impl="oneshot"):
        _sparse_gemv(inp.a, s["wo_t"], th["o"], accumulate=h32, impl=impl)

    def down(s, th, impl="oneshot"):
        _sparse_gemv(inp.h, s["wd_t"], th["down"], accumulate=h32, impl=impl)

    def pair(st, th, impl="oneshot"):  # the raw gate and up sums (out=), no act, no counter
        _sparse_gated_mlp(inp.x, st["wg_t"], st["wu_t"], th["pair"], norm_weight=inp.g, eps=1e-5, out=gu32,
                          impl=impl)

    def down_gated(st, th, impl="oneshot"):  # down forming act(gate)·up from those sums, adding into the stream
        _sparse_gemv(gu32, st["wd_t"], th["down"], gated="silu", accumulate=h32, impl=impl)

    def mlp(st, th):  # the whole MLP in two launches, adding into the stream
        sparse_mlp(inp.x, st["wg_t"], st["wu_t"], st["wd_t"], th["pair"], th["down"], norm_weight=inp.g, eps=1e-5,
                   accumulate=h32)

    raw_ops = {"qkv": qkv, "o": o, "down": down, "pair": pair, "down_gated": down_gated}
    kernels = [k for k in ("oneshot", "gather") if not configs.why_not(k, inp.b, False, False, False, True)]

    def sweep_tiles(kernel: str, op: str, cfgs, timed, key: tuple, fmt) -> None:
        """Time timed() under each of kernel's tile configs; the fastest becomes its table's key (logged, recorded)."""
        res = {}
        for cfg in cfgs:
            if clock.left(0.4) < 0:
                log(f"  {kernel} accumulate {op}: out of its time budget, stopping the sweep")
                break
            try:
                with override_config(cfg):
                    res[cfg] = timed()
            except Exception as e:
                log(f"  {kernel} accumulate {op} {cfg} failed: {type(e).__name__}: {str(e)[:100]}")
        if res:
            best = TILE_TABLES[kernel][key] = min(res, key=res.get)
            accumulate_tuned["|".join(map(str, (kernel,) + key))] = best.__dict__
            log(f"  {kernel} accumulate {op} tiles (us at 0.25 + 0.5): " + " ".join(
                f"{fmt(c)}={v * 1e3 / lay.n:.1f}" for c, v in sorted(res.items(), key=lambda kv: kv[1])[:8]) +
                f" -> {best}")

    bb = 1 if inp.b == 1 else 4
    grids = {"oneshot": ([OneshotConfig(*c) for c in ONESHOT_GRID[bb]],
                         lambda c: f"{c.block_n}x{c.block_k}x{c.num_warps}w"),
             "gather": ([GatherConfig(*c) for c in GATHER_GRID[bb]],
                        lambda c: f"{c.block_n}x{c.seg_k}x{c.block_k}x{c.num_warps}w{'d2' if c.depth == 2 else ''}"
                        f"{'e' if c.eager else ''}{'f' if c.fused else ''}")}
    # Adding into a tensor has no epilogue: other tiles (larger K tiles, fewer atomics; wider strips) may pay.
    # Always the one-shot tiles of o and down; with --tune-accumulate every raw op on every kernel.
    # The most bytes first, should the budget end the sweep.
    shapes = {"pair": (D, INTER), "down_gated": (INTER, D), "qkv": (D, D + 2 * KV), "o": (D, D)}
    ths = [inp.thresholds(s) for s in (0.25, 0.5)]
    for name, (k, n) in shapes.items():
        for kernel in kernels:
            if not TUNE_ACCUMULATE and (kernel != "oneshot" or name not in ("o", "down_gated")):
                continue
            sweep_tiles(kernel, name, grids[kernel][0],
                        lambda: sum(time_graph(lambda: [raw_ops[name](st, th, kernel) for st in lay.sets])
                                    for th in ths),
                        ("accumulate", k, n, configs.batch_bucket(inp.b)), grids[kernel][1])
    if ANATOMY:
        rows += anatomy(lay, inp, raw_ops, kernels, qkv32, gu32, meta, dtype_name)
    for s in SPARSITIES:
        if clock.left(0.6) < 0 or not all(s in side[i] for i in side):
            break
        th = inp.thresholds(s)
        errs = {}
        for name, w, xin in (("o", "wo_t", inp.a), ("down", "wd_t", inp.h)):
            st = lay.sets[0]
            acc[name].copy_(h32)
            _sparse_gemv(xin, st[w], th[name], accumulate=acc[name])
            want = h32.double() + ref.sparse_gemv_ref(xin.float(), st[w].float(), th[name]).double()
            errs[name] = rel(acc[name] - h32, want - h32.double())
        pick = {op: min(side, key=lambda i: side[i][s][op]) for op in ("qkv", "pair")}
        base = sparse_ops(lay, inp, th, "oneshot")

        def over(fn, impl):
            return lambda: [fn(st, th, impl) for st in lay.sets]

        # Each op adding into / writing its fp32 tensor on each kernel; the block takes the fastest of each.
        times = {kern: {op: time_graph(over(fn, kern)) * 1e3 / lay.n for op, fn in raw_ops.items()}
                 for kern in kernels}
        best = {op: min(kernels, key=lambda kern: times[kern][op]) for op in raw_ops}
        t = {op: times[best[op]][op] for op in raw_ops}
        raw_qkv = t["qkv"] < side[pick["qkv"]][s]["qkv"]  # the block takes whichever q|k|v is faster here
        raw_mlp = t["pair"] + t["down_gated"] < side[pick["pair"]][s]["pair"] + t["down"]
        # the whole MLP in two launches (sparse_mlp), where faster than either way above
        t["mlp"] = time_graph(lambda: [mlp(st, th) for st in lay.sets]) * 1e3 / lay.n if inp.b <= 4 else math.inf
        fused_mlp = t["mlp"] < min(t["pair"] + t["down_gated"], side[pick["pair"]][s]["pair"] + t["down"])

        def block():
            for st in lay.sets:
                if raw_qkv:
                    qkv(st, th, best["qkv"])
                else:
                    _sparse_gemv(inp.x, st["wqkv_t"], th["qkv"], norm_weight=inp.g, eps=1e-5,
                                 segments=(D, D + KV), impl=pick["qkv"])
                o(st, th, best["o"])
                if fused_mlp:
                    mlp(st, th)
                elif raw_mlp:
                    pair(st, th, best["pair"])
                    down_gated(st, th, best["down_gated"])
                else:
                    _sparse_gated_mlp(inp.x, st["wg_t"], st["wu_t"], th["pair"], norm_weight=inp.g, eps=1e-5,
                                      impl=pick["pair"])
                    down(st, th, best["down"])
        t["block"] = time_graph(block) * 1e3 / lay.n
        # The same block launched with the other programmatic-dependent-launch setting, where it can run.
        pdl_on = pdl_enabled(inp.x.device)
        with use_pdl(True):
            capable = not SMOKE and pdl_enabled(inp.x.device)
        with use_pdl(not pdl_on):
            t["block_other"] = time_graph(block) * 1e3 / lay.n if capable else None
        t0 = {k: time_graph(base[k]) * 1e3 / lay.n for k in ("o", "down", "pair", "qkv")}
        each = "  ".join(f"{op}=" + "/".join(f"{times[kern][op]:.1f}" for kern in kernels) for op in raw_ops)
        log(f"  accumulate s={s:.2f} ({'/'.join(kernels)}): {each}; one-shot with output: o={t0['o']:.1f} "
            f"down={t0['down']:.1f} gate|up (act·up epilogue)={t0['pair']:.1f} q|k|v={t0['qkv']:.1f}; "
            f"fused mlp={t['mlp']:.1f}; block={t['block']:.1f} (PDL {'on' if pdl_on else 'off'}; {t['block_other']} with it "
            f"{'off' if pdl_on else 'on'}) with q|k|v {'raw ' + best['qkv'] if raw_qkv else pick['qkv']}, o {best['o']}, "
            f"gate|up + down {'raw ' + best['pair'] + ' + gated ' + best['down_gated'] if raw_mlp else pick['pair'] + ' + accumulate ' + best['down']}"
            f"  rel err {errs}")
        rows += [{**meta, "kind": "kernel", "method": f"{kern}-accumulate", "op": k, "sparsity": s, "batch": inp.b,
                  "dtype": dtype_name, "us": round(times[kern][k], 2), "max_rel_err": errs.get(k)}
                 for kern in kernels for k in raw_ops]
        if t["mlp"] < math.inf:
            rows.append({**meta, "kind": "kernel", "method": "fused-accumulate", "op": "mlp", "sparsity": s,
                         "batch": inp.b, "dtype": dtype_name, "us": round(t["mlp"], 2)})
        rows.append({**meta, "kind": "kernel", "method": "actsparse-accumulate", "op": "block", "sparsity": s,
                     "batch": inp.b, "dtype": dtype_name, "us_per_block": round(t["block"], 2),
                     "impl": {"qkv": f"raw sums ({best['qkv']})" if raw_qkv else pick["qkv"],
                              "o": f"accumulate ({best['o']})",
                              "pair": "fused mlp" if fused_mlp else f"raw sums ({best['pair']})" if raw_mlp
                              else pick["pair"],
                              "down": "fused mlp" if fused_mlp else f"gated, accumulate ({best['down_gated']})"
                              if raw_mlp else f"accumulate ({best['down']})"},
                     "max_rel_err": max(errs.values())})
        if t["block_other"] is not None:
            rows.append({**rows[-1], "method": f"actsparse-accumulate-{'no' if pdl_on else ''}pdl",
                         "us_per_block": round(t["block_other"], 2)})
    log(f"  accumulate resources: { {k: v for k, v in configs.COMPILED.items() if 'accumulate' in k} }")
    return rows


# (block_m rows of K, block_n columns, num_warps): the published design's autotune space (small block_m, 2-4
# warps) and larger tiles.
TEAL_TILES = [(8, 128, 2), (16, 256, 4), (64, 64, 4), (64, 128, 2), (128, 64, 4), (64, 128, 4), (256, 32, 4),
              (32, 256, 4), (128, 128, 8), (256, 64, 8), (32, 128, 4)]


def teal_bench(lay: Layers, clock: Clock, meta: dict) -> list[dict]:
    """The TEAL-design baseline at batch 1, fp16 (its only dtype): a zeroing launch + one split-K atomic launch
    per projection (q|k|v fused, gate and up separate), its tile autotuned per op over TEAL_TILES (the tile with
    the least summed time at sparsity 0.25 / 0.5 / 0.8), then timed per op and per block at every sparsity."""
    rows = []
    inp = Inputs(lay, 1)
    xn = inp.xn.to(lay.dtype)
    cub = {k: time_graph(f) * 1e3 / lay.n for k, f in cublas_ops(lay, inp).items()}
    cub["block"] = min(cub["block7"], cub["block4"], cub["block4_t"])
    launches = {"qkv": [("wqkv_t", xn, "tx")], "o": [("wo_t", inp.a, "ta")],
                "pair": [("wg_t", xn, "tx"), ("wu_t", xn, "tx")], "down": [("wd_t", inp.h, "th")]}

    def op_fn(op, th, tile):
        def run():
            for st in lay.sets:
                for w, v, tk in launches[op]:
                    teal_style_gemv(v, st[w], th[tk], *tile)
        return run

    tune_th = [inp.thresholds(s) for s in (0.25, 0.5, 0.8)]
    best = {}
    for op in launches:
        res = {}
        for tile in TEAL_TILES:
            try:
                res[tile] = sum(time_graph(op_fn(op, th, tile)) for th in tune_th)
            except Exception as e:
                log(f"  teal-style {op} {tile} failed: {type(e).__name__}: {str(e)[:100]}")
        best[op] = min(res, key=res.get)
    log(f"  teal-style tiles per op (block_m, block_n, warps): {best}")
    for s in SPARSITIES:
        if clock.left(0.7) < 0:
            break
        th = inp.thresholds(s)
        t = {op: time_graph(op_fn(op, th, best[op])) * 1e3 / lay.n for op in launches}

        def block():
            for op in launches:
                op_fn(op, th, best[op])()
        t["block"] = time_graph(block) * 1e3 / lay.n
        y = teal_style_gemv(xn, lay.sets[0]["wqkv_t"], th["tx"], *best["qkv"])
        err = rel(y, ref.sparse_gemv_ref(xn, lay.sets[0]["wqkv_t"], torch.tensor([th["tx"]], device=DEV)))
        log(f"  teal-style fp16 b1 s={s:.2f}: " + " ".join(f"{k}={v:.1f}" for k, v in t.items()) + f"  rel err {err:.1e}")
        for k, v in t.items():
            rows.append({**meta, "kind": "kernel", "method": "teal-style", "op": k, "sparsity": s, "batch": 1,
                         "dtype": "fp16", "us_per_block" if k == "block" else "us": round(v, 2),
                         "speedup": round(cub["block" if k == "block" else k] / v, 3), "max_rel_err": err,
                         "tile": list(best[k]) if k in best else None})
    return rows


def crossover(rows: list[dict], op: str, batch: int) -> float:
    """Sparsity under which the sparse op loses to cuBLAS (bf16), by linear interpolation; 1.0: always."""
    return crossing([(r["sparsity"], r["speedup"]) for r in rows if r["kind"] == "kernel" and r["op"] == op
                     and r["method"] == "actsparse" and r["dtype"] == "bf16" and r["batch"] == batch])


# ---------------------------------------------------------------------- decode
# (model, batch) -> (method, union calibration, target sparsities) measured end to end
# "teal-bf16-stream": the same plan with the residual stream kept in bf16 (no op adds into it in place).
# "teal-lists" / "teal-nolists": the same plan with o and down reading the active-row lists their producers write
# (the attention kernel, gate|up's raw pair) wherever they can / never (`Engine(producer_lists=)`; the others:
# where the engine measured them fastest).
# "teal-nopdl" / "teal-pdl": the same plan with programmatic dependent launch off / on (`use_pdl`; the others:
# the default, on where the GPU has it).
# "topk": each token's Top-K per site (WINA's selection=topk, unweighted: TEAL's rule as a per-token count), the
# level found on the device before every op (`topk_thresholds`); its sparsity is its count (the level and the op
# normalise the input separately, so a channel at the cut may flip).
# "larosa": the same on a rotated residual stream (a random orthogonal basis per layer, folded into the weights;
# an adapter Q_lᵀQ_{l+1} between layers): what LaRoSA's deployment costs beyond the Top-K.
# topk, larosa, wina, scap, nm, rsparse, countdown: each method's rule kind at its recipe's sizes
# (benchmarks/method_plans.py).
DECODE_PLAN = {("llama3-8b", 1): [("teal", False, (0.25, 0.4, 0.5)), ("teal-nopdl", False, (0.25, 0.5)),
                                  ("teal-lists", False, (0.5,)), ("teal-nolists", False, (0.5,)),
                                  ("teal-bf16-stream", False, (0.25, 0.5)),
                                  ("teal", False, (0.65, 0.8, 0.9)), ("cats", False, (0.5, 0.8)),
                                  ("topk", False, (0.4, 0.5)), ("larosa", False, (0.4, 0.5)),
                                  *((m, False, (0.5,)) for m in ("wina", "scap", "nm", "rsparse", "countdown"))],
               ("llama3-8b", 2): [("teal", False, (0.5,)), ("teal-union", True, (0.5,))],
               ("llama3-8b", 4): [("teal", False, (0.5,)), ("teal-union", True, (0.5, 0.8))],
               ("llama2-7b", 1): [("teal", False, (0.25, 0.4, 0.5))]}


def decode_bench(clock: Clock, meta: dict, n_steps: int, n_layers: int | None, hf_baseline: bool = False,
                 dense_only: bool = False) -> list[dict]:
    """Decode tokens/s, dense vs sparse, per DECODE_PLAN; the engine picks sparse kernel or cuBLAS per op and
    batch from the crossovers it measures on this GPU (logged with the rows). hf_baseline: per model decoded at
    batch 1, also Hugging Face `generate`'s tokens/s on the same shapes (`hf_baseline_row`); dense_only: no sparse
    rows."""
    from actsparse.engine import PRESETS, Engine
    from actsparse.engine.crossover import crossovers, op_times
    from engine_thresholds import calibrate_thresholds, measure_sparsity
    from method_plans import METHODS as PLAN_METHODS, method_plan

    pdl_default = pdl_enabled(torch.device(DEV))  # what the engine launches with unless a variant says otherwise

    rows = []
    for name in dict.fromkeys(m for m, _ in DECODE_PLAN):
        cfg = PRESETS[name] if not SMOKE else PRESETS["tiny"]
        if n_layers:
            cfg = cfg.with_layers(n_layers)
        if clock.left() < 60:
            log(f"decode {name}: skipped, out of time budget")
            continue
        t0 = time.time()
        batches = [b for m, b in DECODE_PLAN if m == name]
        dtype = torch.bfloat16 if not SMOKE else torch.float32
        eng = Engine.random(cfg, device=DEV, dtype=dtype, max_batch=max(batches), max_seq_len=256,
                            kernels="triton", fallback_below=None if not SMOKE else 0.0)
        log(f"[decode {name}] {cfg.n_layers} layers, weights built in {time.time() - t0:.1f}s, "
            f"{torch.cuda.memory_allocated() / 2**30 if not SMOKE else 0:.1f} GiB allocated")

        def speed(b, sparse):
            runs = [eng.decode(None, n_steps, sparse=sparse, batch=b, seed=r) for r in range(3)]
            return statistics.median(runs)

        dense_b1 = None
        for b in batches:
            eng.clear_thresholds()
            dense = speed(b, False)
            dense_b1 = dense if b == 1 else dense_b1
            measure = not SMOKE and not dense_only  # the crossovers only steer the sparse ops
            cross = crossovers(eng, b) if measure else {}
            picks = ({op: {s: t.choice(s) for s in (0.25, 0.4, 0.5, 0.65, 0.8, 0.9)}
                      for op, t in op_times(eng, b).items()} if measure else {})
            log(f"  b{b} dense: {dense:.1f} tok/s ({eng.last_step_ms:.2f} ms/step); crossovers measured by the "
                f"engine (skipped-row fraction under which an op runs on cuBLAS): {cross}; its kernel per op and "
                f"skip: {picks}")
            rows.append({**meta, "kind": "decode", "model": name, "method": "dense", "sparsity": 0.0, "batch": b,
                         "dtype": "bf16", "tok_s": round(dense, 1), "tok_s_dense": round(dense, 1), "speedup": 1.0,
                         "layers": cfg.n_layers, "crossovers": cross, "kernel_choice": picks})
            for method, union, targets in DECODE_PLAN[(name, b)] if not dense_only else ():
                for s in targets:
                    if clock.left() < 25:
                        log("  decode: out of time budget")
                        break
                    if method in PLAN_METHODS:
                        method_plan(eng, method, s)
                    else:
                        calibrate_thresholds(eng, s, n_tokens=16, batch=b, union=union,
                                             method="cats" if method == "cats" else "teal")
                    eng.residual_fp32 = method != "teal-bf16-stream"
                    eng.producer_lists = {"teal-lists": True, "teal-nolists": False}.get(method)
                    eng.reset_graphs()
                    pdl = {"-pdl": True, "-nopdl": False}.get(method[method.rfind("-"):], pdl_default)
                    with use_pdl(pdl):  # captured with (or without) PDL, replayed as captured
                        tok_s = speed(b, True)
                    eng.residual_fp32, eng.producer_lists = True, None
                    eng.reset_graphs()
                    # a Top-K plan's levels change every token: its sparsity is its count, not measured
                    # thresholds on x itself are re-measured; a Top-K's sparsity is its count, the other kinds'
                    # (a shift, N:M, a low-rank path, up's output) are their plans' targets
                    ms = (measure_sparsity(eng, n_tokens=8, batch=b) if method.startswith(("teal", "cats"))
                          else {"mean": None, "union": None})
                    log(f"  b{b} {method} s={s}: {tok_s:.1f} tok/s  speedup {tok_s / dense:.2f}x  " + (
                        f"measured token sparsity {ms['mean']:.3f}, rows skipped {ms['union']:.3f}"
                        if ms["mean"] is not None else "sparsity: the plan's target"))
                    rows.append({**meta, "kind": "decode", "model": name, "method": method, "sparsity": s, "batch": b,
                                 "dtype": "bf16", "tok_s": round(tok_s, 1), "tok_s_dense": round(dense, 1),
                                 "speedup": round(tok_s / dense, 3),
                                 **({"measured_sparsity": round(ms["mean"], 4),
                                     "effective_sparsity": round(ms["union"], 4)} if ms["mean"] is not None else {}),
                                 "layers": cfg.n_layers})
        del eng
        gc.collect()  # the engine's CUDA graphs and weights go before the HF model comes: two 8B models may not fit
        (torch.cuda.empty_cache() if not SMOKE else None)
        if hf_baseline and dense_b1 is not None:
            rows.append(hf_baseline_row(name, cfg, dense_b1, n_steps, clock, meta))
    return rows


def hf_baseline_row(name: str, cfg, dense: float, n_steps: int, clock: Clock, meta: dict) -> dict:
    """The decode row of Hugging Face `generate` on a model's shapes at batch 1 (benchmarks/hf_generate.py: static
    cache, the decode step compiled with CUDA graphs), beside our dense tokens/s; an error row when it fails."""
    from hf_generate import baseline_row

    row = {**meta, "kind": "decode", "model": name, "method": "hf-generate", "sparsity": 0.0, "batch": 1,
           "dtype": "bf16", "tok_s_dense": round(dense, 1), "layers": cfg.n_layers}
    if clock.left() < 90:
        log(f"  hf-generate {name}: skipped, out of time budget")
        return {**row, "tok_s": None, "error": "skipped: out of time budget"}
    log(f"[hf-generate {name}] {cfg.n_layers} layers")
    # SMOKE: the tiny preset's Llama in float32 on the CPU, eager (Inductor's CUDA graphs need a GPU)
    got = baseline_row("tiny" if SMOKE else name, n_layers=cfg.n_layers, steps=n_steps, prompt_len=16,
                       compile=not SMOKE, device=DEV, dtype=torch.float32 if SMOKE else torch.bfloat16)
    got.pop("model")
    if got.get("tok_s"):
        got["speedup"] = round(got["tok_s"] / dense, 3)
        log(f"  our dense {dense:.1f} tok/s vs HF generate {got['tok_s']:.1f} tok/s: "
            f"{dense / got['tok_s']:.2f}x")
    import transformers

    return {**row, **got, "transformers": transformers.__version__}


# ---------------------------------------------------------------------- report
def _fmt(v, spec: str = ".1f") -> str:
    return "" if v is None else format(v, spec)


def markdown(rows: list[dict], meta: dict, extra: dict) -> str:
    """The run's tables: block and per-op kernel times with the TEAL-design baseline beside ours, and decode."""
    out = [f"\n## {meta['device']} · {meta['date']} · commit {meta['commit']}\n",
           f"Ceilings: {json.dumps(extra.get('ceilings', {}))}. Llama-3-8B shapes, CUDA graphs, median of replays, "
           "4 weight sets rotating so nothing is served from L2; thresholds at |x| quantiles of random inputs "
           "(the skipped rows of the batch union).\n"]
    for impl in TUNERS:
        if extra.get(f"tuned_{impl}"):
            out.append(f"Tuned {impl} configs this run: " +
                       "; ".join(f"{k}: {v}" for k, v in extra[f"tuned_{impl}"].items()) + "\n")
    k_rows = [r for r in rows if r["kind"] == "kernel"]

    def us(method, op, s, b=1, dtype="bf16"):
        for r in k_rows:
            if (r["method"], r["op"], r["batch"], r["dtype"]) == (method, op, b, dtype) and \
                    (r["sparsity"] == s or method.startswith("cublas")):
                return r.get("us_per_block", r.get("us"))
        return None

    impls = sorted({r["method"][len("actsparse-"):] for r in k_rows if r["method"].startswith("actsparse-")})
    for b in sorted({r["batch"] for r in k_rows if r["method"] == "actsparse"}):
        cub = min(v for v in (us("cublas-block4", "block", 0, b), us("cublas-block7", "block", 0, b),
                              us("cublas-block4_t", "block", 0, b)) if v is not None)
        out.append(f"\n### Block (q|k|v + o + gate|up + down), batch {b}, µs\n")
        head = ["sparsity", "actsparse bf16 (engine's pick)"] + [f"{i} bf16" for i in impls]
        if b == 1:
            head += ["TEAL design fp16", "actsparse fp16", "vs TEAL (bf16 / fp16)"]
        head += ["cuBLAS bf16", "vs cuBLAS"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|---" * len(head) + "|")
        for s in SPARSITIES:
            mine = us("actsparse", "block", s, b)
            if mine is None:
                continue
            cells = [f"{s:.2f}", _fmt(mine)] + [_fmt(us(f"actsparse-{i}", "block", s, b)) for i in impls]
            if b == 1:
                teal, mine16 = us("teal-style", "block", s, 1, "fp16"), us("actsparse", "block", s, 1, "fp16")
                ratio = (f"{teal / mine:.2f}× / {teal / mine16:.2f}×" if teal and mine16 else "")
                cells += [_fmt(teal), _fmt(mine16), ratio]
            cells += [f"{cub:.1f}", f"{cub / mine:.2f}×"]
            out.append("| " + " | ".join(cells) + " |")
    if any(r["method"] == "teal-style" for r in k_rows):
        out.append("\n### Per op, batch 1, µs (actsparse bf16 / TEAL design fp16 / cuBLAS bf16)\n")
        out.append("| sparsity | q\\|k\\|v | o | gate\\|up | down |")
        out.append("|---|---|---|---|---|")
        for s in SPARSITIES:
            if us("actsparse", "qkv", s) is None:
                continue
            out.append(f"| {s:.2f} | " + " | ".join(
                f"{_fmt(us('actsparse', op, s))} / {_fmt(us('teal-style', op, s, 1, 'fp16'))} / "
                f"{_fmt(us('cublas', op, 0))}" for op in ("qkv", "o", "pair", "down")) + " |")
    if extra.get("impl"):
        out.append(f"\nKernel per op fastest over sparsity 0.25–0.5 (what impl=\"auto\" runs without the engine's "
                   f"own measurement): "
                   f"{extra['impl']}. Kernel-table crossovers (skipped rows under which an op loses to cuBLAS): "
                   f"{extra.get('kernel_crossovers')}")
    dr = [r for r in rows if r["kind"] == "decode"]
    sparse = [r for r in dr if r["method"] not in ("dense", "hf-generate")]
    if sparse:
        out.append("\n### Decode, random weights, bf16, tokens/s (all rows of the batch)\n")
        out.append("| model | batch | method | target | tok/s | dense tok/s | speedup | rows skipped |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in sparse:
            out.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['sparsity']:.2f} | {r['tok_s']:.1f} | "
                       f"{r['tok_s_dense']:.1f} | {r['speedup']:.2f}× | {r.get('effective_sparsity', '')} |")
        cross = {f"{r['model']} b{r['batch']}": r.get("crossovers") for r in dr if r["method"] == "dense"}
        out.append(f"\nCrossovers the engine measured (skipped-row fraction under which an op runs on cuBLAS): "
                   f"{cross}")
    hf = [r for r in dr if r["method"] == "hf-generate"]
    if hf:
        out.append("\n### Dense engine vs Hugging Face generate, batch 1, random weights, tokens/s\n")
        out.append("HF: `model.generate`, greedy, static KV cache reused across calls, the decode step compiled "
                   "(`torch.compile`, reduce-overhead: CUDA graphs); its tokens/s over the decode steps (as ours) and "
                   "over the whole call (prefill included).\n")
        out.append("| model | layers | dense engine | HF generate (decode steps) | dense engine / HF | HF whole call | "
                   "HF attention, compile | transformers |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in hf:
            if r.get("tok_s") is None:
                err = (r.get("error") or "").split("\n")[0][:200].replace("|", "\\|")
                out.append(f"| {r['model']} | {r['layers']} | {r['tok_s_dense']:.1f} | error: {err} | | | | "
                           f"{r.get('transformers', '')} |")
                continue
            out.append(f"| {r['model']} | {r['layers']} | {r['tok_s_dense']:.1f} | {r['tok_s']:.1f} | "
                       f"{r['tok_s_dense'] / r['tok_s']:.2f}× | {r['tok_s_call']:.1f} | {r['attn']}, {r['compile']}"
                       f"{'' if r['compiled'] or r['compile'] == 'off' else ' (not compiled)'} | "
                       f"{r['transformers']} |")
    return "\n".join(out) + "\n"


def merge(run_dir: pathlib.Path, note: str = "") -> None:
    """Make a device run's numbers the current ones for its device: its rows replace this script's rows of
    benchmarks/results/<device>.json (bench_tp.py's tensor-parallel rows stay) and its section replaces that
    device's section of BENCHMARKS.md."""
    from results_log import merge_run

    merge_run(run_dir, note, owns=lambda r: r.get("kind") != "decode_tp", heading_prefix="## {device} ·")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--merge", type=pathlib.Path, help="make a device run's $OUT the repo's current numbers for it")
    ap.add_argument("--note", default="", help="with --merge: a line recorded with every row")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--tune", action="store_true", help="sweep masked-walk launch configs first and use the winners")
    ap.add_argument("--tune-gather", action="store_true", help="sweep gather-walk launch configs first, use the winners")
    ap.add_argument("--tune-oneshot", action="store_true", help="sweep the one-shot tiles' configs first, use the winners")
    ap.add_argument("--anatomy", action="store_true",
                    help="time each op (raw sums, both kernels) with every row skipped too: its fixed cost, and the "
                         "effective bandwidth of what the weight bytes add")
    ap.add_argument("--moe-anatomy", action="store_true",
                    help="time a mixture-of-experts layer's pieces (route, routed gate|up, gated down) at Qwen3-30B-A3B "
                         "shapes at thresholds 0 / 0.5 / 0.9 / all skipped: their fixed cost and bytes' bandwidth")
    ap.add_argument("--topk-anatomy", action="store_true",
                    help="time the per-token Top-K level launch before each op")
    ap.add_argument("--rsparse-anatomy", action="store_true",
                    help="time each op's sparse kernel and R-Sparse's low-rank path (lowrank_add) apart and together")
    ap.add_argument("--mlp-anatomy", action="store_true",
                    help="sweep sparse_mlp's tiles (the whole MLP in two launches) and time it against the raw "
                         "pair + gated down at each sparsity; the winner serves the rest of the run")
    ap.add_argument("--cats-anatomy", action="store_true",
                    help="time a CATS MLP's ops one by one, sweeping cats_up's tiles (the winners run the rest)")
    ap.add_argument("--tune-accumulate", action="store_true",
                    help="sweep the one-shot tiles' and the gather walk's configs for adding into a tensor (q|k|v and "
                         "gate|up raw sums, o into the stream, down gated), use the winners")
    ap.add_argument("--load-tuned", type=pathlib.Path, help="an earlier run's tuned.json: use its winners (no sweep)")
    ap.add_argument("--impls", default="masked,gather,oneshot", help="kernels timed side by side (default: %(default)s)")
    ap.add_argument("--tune-weights", default="0:1,0.5:1,0.9:1",
                    help="weight of each sparsity in the tuning objective, e.g. 0:0,0.5:1,0.9:1 (default: %(default)s)")
    ap.add_argument("--tune-batches", default="1,4", help="batches every tuning sweep covers (default: %(default)s)")
    ap.add_argument("--kernel-batches", default="1,4", help="batches of the bf16 kernel table (default: %(default)s)")
    ap.add_argument("--masked-tiles", default="", help="with --tune: batch 1's masked tiles instead of FMA_GRID[1], "
                    "'block_n,block_k,warps,stages;...'")
    ap.add_argument("--no-teal", action="store_true", help="skip the TEAL-design baseline (fp16, tuned tiles)")
    ap.add_argument("--teal-tiles", default="", help="the TEAL-design tiles tried instead of TEAL_TILES, "
                    "'block_m,block_n,warps;...'")
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--decode-layers", type=int, default=0, help="fewer layers than the model has (0: all)")
    ap.add_argument("--decode-steps", type=int, default=48)
    ap.add_argument("--decode-models", default="", help="decode only these model:batch entries of DECODE_PLAN, "
                    "e.g. llama3-8b:1,llama3-8b:4 (default: all)")
    ap.add_argument("--decode-methods", default="", help="decode only these methods of DECODE_PLAN, e.g. teal,cats")
    ap.add_argument("--decode-families", default="", help="also decode these engine presets at batch 1 (teal 0.4 / 0.5), "
                    "e.g. qwen3-8b,qwen2.5-7b,phi3-mini,granite3-8b,gemma2-9b,gemma3-12b, or the mixtures of experts "
                    "qwen3-30b-a3b,mixtral-8x7b,qwen1.5-moe-a2.7b (with --decode-layers: Mixtral's 32 layers of "
                    "experts alone are 90 GB in bf16)")
    ap.add_argument("--hf-baseline", action="store_true", help="per model decoded at batch 1, also time Hugging Face "
                    "generate on its shapes (static cache, compiled decode step) beside our dense tok/s")
    ap.add_argument("--decode-dense-only", action="store_true", help="decode dense only (no sparse plan, no "
                    "crossover measurement), e.g. with --hf-baseline")
    args = ap.parse_args()
    from actsparse.engine import PRESETS

    bad = [m for m in filter(None, args.decode_families.split(",")) if m not in PRESETS]
    if bad:
        ap.error(f"--decode-families: unknown engine preset(s) {', '.join(bad)}; expected some of {', '.join(PRESETS)}")
    if args.decode_models:
        keep = {(m, int(b)) for m, b in (k.split(":") for k in args.decode_models.split(","))}
        for key in [k for k in DECODE_PLAN if k not in keep]:
            del DECODE_PLAN[key]
    for fam in filter(None, args.decode_families.split(",")):
        DECODE_PLAN[(fam, 1)] = [("teal", False, (0.4, 0.5))]
    if args.decode_methods:
        methods = set(args.decode_methods.split(","))
        for key in DECODE_PLAN:
            DECODE_PLAN[key] = [m for m in DECODE_PLAN[key] if m[0] in methods]
    if args.merge:
        merge(args.merge, args.note)
        return
    global TUNE_ACCUMULATE, ANATOMY
    TUNE_ACCUMULATE, ANATOMY = args.tune_accumulate, args.anatomy
    if args.load_tuned:
        for impl, got in json.loads(args.load_tuned.read_text()).items():
            for key, cfg in got["best"].items():
                if impl == "accumulate":  # "kernel|accumulate|K|N|batch": adding into a tensor, per kernel
                    kernel, key = key.split("|", 1)
                    cls, table = CONFIG_CLASSES[kernel], TILE_TABLES[kernel]
                else:
                    cls, table = CONFIG_CLASSES[impl], getattr(configs, TUNERS[impl][1])
                kind, k, n, b = key.split("|")
                table[(kind, int(k), int(n), int(b))] = cls(**cfg)
        log(f"tuned configs from {args.load_tuned}: {configs.TUNED_ONESHOT} {configs.TUNED_GATHER}")
    if args.teal_tiles:
        TEAL_TILES[:] = [tuple(int(v) for v in t.split(",")) for t in args.teal_tiles.split(";") if t]
    if args.masked_tiles:
        FMA_GRID[1] = [tuple(int(v) for v in t.split(",")) for t in args.masked_tiles.split(";") if t]
    clock = Clock(args.budget_s)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name() if not SMOKE else "cpu-smoke"
    meta = {"device": dev, "commit": os.environ.get("COMMIT", "unknown"),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "model": "llama3-8b-shapes"}
    log(f"device {dev}, torch {torch.__version__}, commit {meta['commit']}")
    rows: list[dict] = []
    extra: dict = {}

    def save():
        (out / "results.json").write_text(json.dumps({"meta": meta, "extra": extra, "rows": rows}, indent=1))
        (out / "BENCHMARKS_fragment.md").write_text(markdown(rows, meta, extra))

    try:
        extra["ceilings"] = ceilings()
        log(f"ceilings: {extra['ceilings']}")
        if args.topk_anatomy:
            rows += topk_anatomy(meta)
        if args.rsparse_anatomy:
            rows += rsparse_anatomy(meta)
        if args.cats_anatomy:  # first: its cats_up winners serve every CATS row after it
            rows += cats_anatomy(clock, meta)
            extra["tuned_cats_up"] = dict(cats_tuned)
            (out / "tuned_cats_up.json").write_text(json.dumps(cats_tuned, indent=1))
            save()
        if args.mlp_anatomy:  # before the kernel table: its sparse_mlp winner serves the block and the decode
            rows += mlp_anatomy(clock, meta)
            extra["tuned_mlp"] = dict(mlp_tuned)
            (out / "tuned_mlp.json").write_text(json.dumps(mlp_tuned, indent=1))
            save()
        if not args.skip_kernels:
            lay = Layers(4, torch.bfloat16)
            tuned: dict = {}
            weights = {float(a): float(b) for a, b in (w.split(":") for w in args.tune_weights.split(","))}
            batches = tuple(int(b) for b in args.tune_batches.split(","))
            SIDE_BY_SIDE[:] = [i for i in args.impls.split(",") if i]
            for impl, (sweep, table, flag) in TUNERS.items():
                if not getattr(args, flag):
                    continue
                best, trows = sweep(lay, clock, batches, weights)
                getattr(configs, table).update(best)
                named = {"|".join(map(str, k)): v.__dict__ for k, v in best.items()}
                tuned[impl] = {"weights": weights, "best": named, "rows": trows}
                extra[f"tuned_{impl}"] = named
                extra["tune_weights"] = weights
            if tuned:
                (out / "tuned.json").write_text(json.dumps(tuned, indent=1))
            rows += kernel_bench(lay, "bf16", tuple(int(b) for b in args.kernel_batches.split(",")), clock, meta)
            if args.moe_anatomy:
                rows += moe_anatomy(clock, meta)
            extra["impl"] = dict(extra_impl)
            if accumulate_tuned:
                extra["tuned_accumulate"] = dict(accumulate_tuned)
                tuned["accumulate"] = {"best": dict(accumulate_tuned)}
                (out / "tuned.json").write_text(json.dumps(tuned, indent=1))
            save()
            del lay
            (torch.cuda.empty_cache() if not SMOKE else None)
            lay = Layers(4, torch.float16)
            rows += kernel_bench(lay, "fp16", (1,), clock, meta)
            if not args.no_teal:
                rows += teal_bench(lay, clock, meta)
            save()
            del lay
            (torch.cuda.empty_cache() if not SMOKE else None)
        if not args.skip_decode:
            # Per batch and engine op (gu = the fused gate/up), from the kernel rows above (reported only: the
            # engine measures its own crossovers at its own shapes).
            ops = (("qkv", "qkv"), ("o", "o"), ("gu", "pair"), ("down", "down"))
            if any(r["kind"] == "kernel" for r in rows):
                extra["kernel_crossovers"] = {b: {eop: crossover(rows, kop, b) for eop, kop in ops} for b in (1, 4)}
                log(f"kernel-table crossovers: {extra['kernel_crossovers']}")
            rows += decode_bench(clock, {k: v for k, v in meta.items() if k != "model"}, args.decode_steps,
                                 args.decode_layers or None, hf_baseline=args.hf_baseline,
                                 dense_only=args.decode_dense_only)
    except Exception:
        traceback.print_exc()
        extra["error"] = traceback.format_exc()
    save()
    log(markdown(rows, meta, extra))
    log(f"total {time.time() - clock.t0:.0f}s")


if __name__ == "__main__":
    main()
