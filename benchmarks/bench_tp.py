"""Tensor-parallel decode: tokens/s at world size 1, 2, 4, ... on the GPUs of this machine, and the all-reduce share
of a step (one device call).

  python3 benchmarks/bench_tp.py --out DIR [--models llama3-8b,llama3-70b] [--worlds 1,2,4,8] [--layers 0]
  python3 benchmarks/bench_tp.py --merge DIR [--note "..."]      # here, afterwards: DIR = that call's $OUT

Per model and world size W (W ≤ the GPUs present, dividing the kv heads, the shard fitting 90% of a GPU), W
processes (`launch.run_ranks`, one GPU each, NCCL) build random bf16 weights for their shard
(`TPEngine.random`) and decode batch 1 dense, then TEAL at --sparsity (thresholds calibrated on each rank's own
dense activations, `engine_thresholds`), CUDA-graphed; each run twice, with and without its collectives
(`TPEngine.comm_share`). Rows (kind "decode_tp"): tok_s, speedup over dense at the same W, scaling over W=1 of
the same method, step_ms, step_ms_no_comm and comm_share. Writes DIR/results.json and DIR/BENCHMARKS_fragment.md;
--merge puts them in benchmarks/results/<device>.json (replacing earlier decode_tp rows only) and
BENCHMARKS.md. BENCH_SMOKE=1 runs it on the CPU at tiny shapes (gloo, torch ops, fp32): no timing meaning.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pathlib
import sys
import time
import traceback

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):  # the spawned ranks import this file as their main module too
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from actsparse.engine import PRESETS  # noqa: E402
from actsparse.engine.launch import run_ranks  # noqa: E402
from actsparse.engine.tensor_parallel import TPEngine, shard_config, split_reason  # noqa: E402

SMOKE = os.environ.get("BENCH_SMOKE") == "1"
PROMPT = 16


def log(*a) -> None:
    print(*a, flush=True)


def shard_gib(cfg, world: int, layouts: str) -> float:
    """GiB of one rank's bf16 weights: its block linears in `layouts` (the sparse layout adds W_up's natural copy
    for CATS), the replicated embedding and its LM-head slice."""
    s = shard_config(cfg, world)
    d = cfg.hidden_size
    per_layer = d * (s.q_size + 2 * s.kv_size) + s.q_size * d + 3 * d * s.intermediate_size
    copies = 2.0 if layouts == "both" else 1.0 + d * s.intermediate_size / per_layer
    return (cfg.n_layers * per_layer * copies + cfg.vocab_size * d * (1 + 1 / world)) * 2 / 2**30


def _rank(rank: int, world: int, model: str, layers: int, steps: int, batch: int, sparsity: float,
          layouts: str) -> dict:
    """On each rank: dense and TEAL figures of `comm_share`, and what the engine chose per op."""
    from engine_thresholds import calibrate_thresholds, measure_sparsity

    cfg = PRESETS[model if not SMOKE else "tiny"]
    cfg = cfg.with_layers(layers) if layers else cfg
    dev = torch.device("cuda", torch.cuda.current_device()) if not SMOKE else torch.device("cpu")
    eng = TPEngine.random(cfg, rank, world, device=dev, dtype=torch.float32 if SMOKE else torch.bfloat16,
                          layouts=layouts, max_batch=batch, max_seq_len=PROMPT + steps + 1,
                          kernels="torch" if SMOKE else "triton", fallback_below=0.0 if SMOKE else None)
    out = {"dense": eng.comm_share(steps, sparse=False, batch=batch, prompt_len=PROMPT)}
    calibrate_thresholds(eng, sparsity, n_tokens=16, batch=batch)
    out["teal"] = eng.comm_share(steps, sparse=True, batch=batch, prompt_len=PROMPT)
    out["teal"]["effective_sparsity"] = measure_sparsity(eng, n_tokens=8, batch=batch)["union"]
    if not SMOKE:
        from actsparse.engine.crossover import crossovers

        out["crossovers"] = crossovers(eng, batch)
        out["gib_allocated"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def bench(models: list[str], worlds: list[int], layers: int, steps: int, batch: int, sparsity: float,
          meta: dict, rows: list[dict]) -> None:
    """Append to rows those of every (model, W) that can run here."""
    gpus = torch.cuda.device_count() if not SMOKE else max(worlds)
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if not SMOKE else float("inf")
    for model in models:
        cfg = PRESETS[model if not SMOKE else "tiny"]
        cfg = cfg.with_layers(layers) if layers else cfg
        base: dict[str, float] = {}
        for w in worlds:
            why = split_reason(cfg, w) or (f"{w} GPUs asked, {gpus} present" if w > gpus else None)
            # both layouts where they fit (cuBLAS reads its natural one), else the transposed one alone
            layouts = None if why else next((lay for lay in ("both", "sparse") if shard_gib(cfg, w, lay) < 0.9 * gib),
                                            None)
            if why is None and layouts is None:
                why = f"a shard needs {shard_gib(cfg, w, 'sparse'):.1f} GiB (one layout), a GPU has {gib:.1f}"
            if why:
                log(f"[{model} W={w}] skipped: {why}")
                continue
            t0 = time.time()
            got = run_ranks(_rank, w, model, layers, steps, batch, sparsity, layouts,
                            backend="gloo" if SMOKE else "nccl")
            r0 = got[0]
            for method in ("dense", "teal"):
                f = r0[method]
                base.setdefault(method, f["tok_s"])
                row = {**meta, "kind": "decode_tp", "model": model, "method": method,
                       "sparsity": sparsity if method == "teal" else 0.0, "batch": batch, "dtype": "bf16",
                       "world_size": w, "layers": cfg.n_layers, "layouts": layouts,
                       "tok_s": round(f["tok_s"], 1), "tok_s_dense": round(r0["dense"]["tok_s"], 1),
                       "speedup": round(f["tok_s"] / r0["dense"]["tok_s"], 3),
                       "scaling_vs_w1": round(f["tok_s"] / base[method], 3) if 1 in worlds else None,
                       "step_ms": round(f["step_ms"], 4), "step_ms_no_comm": round(f["step_ms_no_comm"], 4),
                       "comm_share": round(f["comm_share"], 4)}
                if method == "teal":
                    row["effective_sparsity"] = round(f["effective_sparsity"], 4)
                    row["crossovers"] = r0.get("crossovers")
                rows.append(row)
                log(f"[{model} W={w} {layouts}] {method}: {f['tok_s']:.1f} tok/s, {f['step_ms']:.3f} ms/step, "
                    f"{f['step_ms_no_comm']:.3f} without collectives: comm share {f['comm_share']:.1%}")
            log(f"[{model} W={w}] {time.time() - t0:.0f}s, {r0.get('gib_allocated', 0):.1f} GiB on rank 0")


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"## Tensor-parallel decode · {meta['device']} · {meta['date']} · commit {meta['commit']}", "",
           "`benchmarks/bench_tp.py`: random bf16 weights per shard, batch 1, CUDA graphs, NCCL; TEAL thresholds "
           "calibrated on each rank's own activations. comm share = 1 − (slowest rank's step without collectives) "
           "/ step.", "",
           "| model | layers | W | method | tok/s | speedup | vs W=1 | ms/step | ms no comm | comm share |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['layers']} | {r['world_size']} | {r['method']} {r['sparsity']:g} | "
                   f"{r['tok_s']:.1f} | {r['speedup']:.2f} | {r['scaling_vs_w1'] or ''} | {r['step_ms']:.3f} | "
                   f"{r['step_ms_no_comm']:.3f} | {r['comm_share']:.1%} |")
    return "\n".join(out) + "\n"


def merge(run_dir: pathlib.Path, note: str = "") -> None:
    """Make a device run's tensor-parallel rows and section the current ones for its device."""
    from results_log import merge_run

    merge_run(run_dir, note, owns=lambda r: r.get("kind") == "decode_tp",
              heading_prefix="## Tensor-parallel decode · {device} ·")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--merge", type=pathlib.Path, help="make a device run's $OUT the repo's current TP numbers")
    ap.add_argument("--note", default="", help="with --merge: a line recorded with every row")
    ap.add_argument("--out", default="bench_tp_out")
    ap.add_argument("--models", default="llama3-8b,llama3-70b")
    ap.add_argument("--worlds", default="1,2,4,8", help="world sizes tried (those over the GPUs present are skipped)")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers than the model has (0: all)")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.note)
        return
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name() if not SMOKE else "cpu-smoke"
    meta = {"device": dev, "commit": os.environ.get("COMMIT", "unknown"),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    log(f"device {dev} x{torch.cuda.device_count()}, torch {torch.__version__}, commit {meta['commit']}")
    rows: list[dict] = []
    extra: dict = {}
    try:
        bench(args.models.split(","), [int(w) for w in args.worlds.split(",")], args.layers, args.steps,
              args.batch, args.sparsity, meta, rows)
    except Exception:
        traceback.print_exc()
        extra["error"] = traceback.format_exc()
    (out / "results.json").write_text(json.dumps({"meta": meta, "extra": extra, "rows": rows}, indent=1))
    (out / "BENCHMARKS_fragment.md").write_text(markdown(rows, meta))
    log(markdown(rows, meta))


if __name__ == "__main__":
    main()
