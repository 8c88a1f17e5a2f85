"""Sweep benchmarks: one calibration for a 4 x 4 grid, the cost of re-running a finished sweep,
what model affinity saves, and the same grid on 1 vs 2 GPUs with both GPUs' utilisation sampled.

    python benchmarks/sweep_bench.py                                  # CPU: grid, re-run, affinity
    python benchmarks/sweep_bench.py --parts grid,rerun,gpus --gpus 2 --device cuda --model /tmp/big-llama
                                                                      # GPU machine (scripts/device/ray_sweep.sh)

Every sweep runs as the real console script in a fresh process (fresh Ray, as a user would run it), on
its own MLflow SQLite store under --work; figures come from the parent run's tags and metrics. Prints a
table, writes <out>/sweep_bench.json, and appends a dated section to benchmarks/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = "teal,cats,countdown,ffn_threshold"   # ffn_threshold fits with forward passes (on the model workers)
SPARSITIES = "0.3,0.4,0.5,0.6"


def sweep(work: Path, name: str, overrides: list[str], timeout: int = 3000) -> dict:
    """Run `actsparse sweep` in a fresh process; return its wall time, summary counts and parent-run figures."""
    db = work / f"{name}.db"
    cmd = [sys.executable, "-m", "actsparse.cli", "sweep", f"tracking.uri=sqlite:///{db}",
           f"report.dir={work}/results", "report.enabled=false", *overrides]
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=path, RAY_USAGE_STATS_ENABLED="0",
               TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    print(f"sweep {name}: exit {proc.returncode}, {wall:.1f} s", flush=True)
    (work / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    m = re.search(r"cells: (\d+) finished, (\d+) skipped, (\d+) failed", proc.stdout)
    if proc.returncode != 0 or not m:
        raise SystemExit(f"sweep {name} failed (exit {proc.returncode}); see {work / (name + '.log')}:\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{db}")
    exp = c.get_experiment_by_name("actsparse")
    parent = sorted(c.search_runs([exp.experiment_id], "tags.run_kind = 'sweep'"), key=lambda r: r.info.start_time)[-1]
    cells = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000)
    return {"name": name, "wall_s": wall, "finished": int(m[1]), "skipped": int(m[2]), "failed": int(m[3]),
            "ray_started": "ray: " in proc.stdout, "tags": dict(parent.data.tags), "metrics": dict(parent.data.metrics),
            "stats_keys": sorted({r.data.tags.get("stats_key") for r in cells}),
            "cell_eval_s": sum(r.data.metrics.get("time/eval_s", 0.0) for r in cells),
            "cell_fit_s": sum(r.data.metrics.get("time/fit_s", 0.0) for r in cells),
            "stats_sources": sorted(r.data.tags.get("stats_source", "") for r in cells)}


class GpuSampler:
    """nvidia-smi every 200 ms while a sweep runs: per GPU, the share of samples busy and the peak memory."""

    def __init__(self, path: Path):
        self.path, self.proc = path, None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.file = open(self.path, "w")
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,index,utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "200"], stdout=self.file)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.file.close()

    def summary(self) -> dict:
        """{gpu index: {samples, busy (share of samples with utilisation >= 10%), mean_util, peak_mem_mib}}."""
        out: dict[str, dict] = {}
        if not self.path.exists():
            return out
        for line in self.path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 4 or not parts[1].isdigit():
                continue
            g = out.setdefault(parts[1], {"samples": 0, "busy": 0, "util_sum": 0.0, "peak_mem_mib": 0.0})
            util, mem = float(parts[2] or 0), float(parts[3] or 0)
            g["samples"] += 1
            g["busy"] += util >= 10
            g["util_sum"] += util
            g["peak_mem_mib"] = max(g["peak_mem_mib"], mem)
        return {k: {"samples": g["samples"], "busy": g["busy"] / max(g["samples"], 1),
                    "mean_util": g["util_sum"] / max(g["samples"], 1), "peak_mem_mib": g["peak_mem_mib"]}
                for k, g in sorted(out.items())}


def random_llama(path: Path, hidden: int, layers: int, seed: int) -> str:
    """Save a random-weight Llama (bundled tokenizer) of the given width and depth; return its folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    for f in (REPO / "actsparse" / "assets" / "models" / "tiny-llama").iterdir():
        if "token" in f.name:
            shutil.copy(f, path / f.name)
    cfg = LlamaConfig(vocab_size=len(AutoTokenizer.from_pretrained(path)), hidden_size=hidden,
                      intermediate_size=hidden * 8 // 3 // 64 * 64, num_hidden_layers=layers,
                      num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 128, 1),
                      max_position_embeddings=2048)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def grid_overrides(a, store: Path, extra: list[str] = ()) -> list[str]:
    return [f"model={a.model}", f"method={METHODS}", f"sparsity={SPARSITIES}", f"launcher.store={store}",
            f"data.tokens={a.calib_tokens}", f"data.seq_len={a.seq_len}", f"eval.seq_len={a.seq_len}",
            f"eval.max_tokens={a.eval_tokens}", f"eval.batch_size={a.batch_size}", f"device={a.device}",
            *([f"eval.stride={a.stride}"] if a.stride else []),
            *(["launcher=gpu", f"model.dtype={a.dtype}"] if a.device != "cpu" else []), *extra]


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            return f"{n} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def commit() -> str:
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "actsparse", "conf"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="grid,rerun,affinity", help="grid,rerun,affinity,gpus (default: %(default)s)")
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--model2", default="tiny-gelu", help="second model of the affinity sweep")
    p.add_argument("--affinity-random", default=None, metavar="HIDDEN,LAYERS",
                   help="affinity sweep on two random Llamas of this size instead of --model/--model2 "
                        "(e.g. 1024,12: ~1 GB each in fp32, so loading costs what it does for real models)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", help="model dtype on GPU (default: %(default)s)")
    p.add_argument("--gpus", type=int, default=0, help="with part gpus: compare 1 GPU with this many")
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--stride", type=int, default=None,
                   help="evaluation stride (< seq-len: overlapping windows, more work per cell on the same text)")
    p.add_argument("--work", default=str(REPO / "build" / "sweep_bench"))
    p.add_argument("--out", default=None, help="where sweep_bench.json goes (default: --work)")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/BENCHMARKS.md")
    a = p.parse_args()
    parts = set(a.parts.split(","))
    work = Path(a.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    res: dict = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device_name(),
                 "commit": commit(), "model": a.model, "grid": f"{METHODS} x {SPARSITIES}", "args": vars(a)}
    rows: list[tuple[str, str, str]] = []
    out = Path(a.out or work)
    out.mkdir(parents=True, exist_ok=True)

    def save(r: dict) -> None:   # after every sweep: a time-out still leaves the figures so far
        (out / "sweep_bench.json").write_text(json.dumps(r, indent=1, default=str))

    if "grid" in parts or "rerun" in parts:
        g = sweep(work, "grid", grid_overrides(a, work / "store_grid"))
        res["grid_sweep"] = g
        save(res)
        n = g["finished"]
        rows += [(f"4 methods x 4 sparsities on {Path(a.model).name}: cells finished / failed",
                  f"{n} / {g['failed']}", "16 / 0"),
                 ("calibrations computed (parent tag; distinct stats_key over the cells)",
                  f"{g['tags'].get('calibrations_computed')} ({len(g['stats_keys'])})", "exactly 1"),
                 ("sweep wall time (process / time/sweep_s)",
                  f"{g['wall_s']:.1f} s / {g['metrics']['time/sweep_s']:.1f} s", "")]
    if "rerun" in parts:
        r = sweep(work, "grid", grid_overrides(a, work / "store_grid"))   # the same command, same stores
        res["rerun"] = r
        save(res)
        rows.append(("re-run of the finished sweep: wall (process), cells skipped, Ray started",
                     f"{r['wall_s']:.1f} s, {r['skipped']}, {'yes' if r['ray_started'] else 'no'}",
                     "< 30 s, 16, no"))
    if "affinity" in parts:
        aff = {}
        m1, m2 = a.model, a.model2
        if a.affinity_random:
            hidden, layers = (int(x) for x in a.affinity_random.split(","))
            m1, m2 = (random_llama(work / f"random_{i}", hidden, layers, seed=i) for i in (0, 1))
            res["affinity_models"] = f"2 random Llamas, hidden {hidden}, {layers} layers"
        for label, extra in (("actors", []), ("tasks_no_cache", ["launcher.affinity=false", "launcher.model_cache=0"]),
                             ("tasks_cache", ["launcher.affinity=false"])):
            # random models are slow on CPU: evaluate few tokens, so loading is what differs
            ct, et, sl = (1024, 512, 128) if a.affinity_random and a.device == "cpu" else \
                (a.calib_tokens, a.eval_tokens, a.seq_len)
            ov = [f"model={m1},{m2}", "method=teal", f"sparsity={SPARSITIES}", f"device={a.device}",
                  f"launcher.store={work / ('store_' + label)}", f"data.tokens={ct}", f"data.seq_len={sl}",
                  f"eval.seq_len={sl}", f"eval.max_tokens={et}",
                  *(["launcher=gpu", f"model.dtype={a.dtype}"] if a.device != "cpu" else []), *extra]
            aff[label] = sweep(work, f"affinity_{label}", ov)
        res["affinity"] = aff
        save(res)
        what = res.get("affinity_models", f"{Path(m1).name} + {Path(m2).name}")
        for label, text in (("actors", "model affinity (actors)"), ("tasks_no_cache", "plain tasks, no model cache"),
                            ("tasks_cache", "plain tasks, per-process cache of 1")):
            m = aff[label]["metrics"]
            rows.append((f"{what}, teal x 4 sparsities, {text}: model loads / s loading / sweep time",
                         f"{m['model/loads']:.0f} / {m['model/load_s']:.1f} s / {m['time/sweep_s']:.1f} s", ""))
        saved = aff["tasks_no_cache"]["metrics"]["model/load_s"] - aff["actors"]["metrics"]["model/load_s"]
        estimate = aff["actors"]["metrics"]["model/load_s_saved"]
        rows.append(("loading time affinity saves vs reloading per node (measured; the sweep's estimate "
                     f"model/load_s_saved = reuses x mean load: {estimate:.1f} s)", f"{saved:.1f} s", ""))
    if "gpus" in parts and a.gpus >= 2:
        scale = {}
        for n in (1, a.gpus):
            with GpuSampler(work / f"smi_{n}gpu.csv") as smp:
                s = sweep(work, f"gpus_{n}", grid_overrides(a, work / f"store_{n}gpu", [f"ray.num_gpus={n}"]))
            s["gpu_samples"] = smp.summary()
            scale[n] = s
            res["gpus"] = {str(k): v for k, v in scale.items()}
            save(res)
        t1, tn = scale[1]["metrics"]["time/sweep_s"], scale[a.gpus]["metrics"]["time/sweep_s"]
        busy = ", ".join(f"GPU{k} {v['busy']:.0%} busy, mean {v['mean_util']:.0f}%, peak {v['peak_mem_mib']:.0f} MiB"
                         for k, v in scale[a.gpus]["gpu_samples"].items())
        for n in (1, a.gpus):
            sc = scale[n]
            rows += [(f"grid on {n} GPU(s): cells finished / failed, calibrations computed, time/sweep_s "
                      "(process wall)",
                      f"{sc['finished']} / {sc['failed']}, {sc['tags'].get('calibrations_computed')}, "
                      f"{sc['metrics']['time/sweep_s']:.1f} s ({sc['wall_s']:.1f} s)", "16 / 0, 1"),
                     (f"grid on {n} GPU(s): sum over cells of time/eval_s, time/fit_s",
                      f"{sc['cell_eval_s']:.1f} s, {sc['cell_fit_s']:.1f} s", "")]
        rows += [(f"{a.gpus} GPUs / 1 GPU (time/sweep_s)", f"{tn / t1:.2f}", "<= 0.6"),
                 (f"nvidia-smi during the {a.gpus}-GPU sweep (200 ms samples)", busy or "no samples", "every GPU busy")]
        r = sweep(work, f"gpus_{a.gpus}", grid_overrides(a, work / f"store_{a.gpus}gpu", [f"ray.num_gpus={a.gpus}"]))
        res["gpus_rerun"] = r
        rows.append(("re-run of the finished GPU sweep: wall (process), cells skipped, Ray started",
                     f"{r['wall_s']:.1f} s, {r['skipped']}, {'yes' if r['ray_started'] else 'no'}", "< 30 s, 16, no"))

    save(res)
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"\nsweep benchmark — {res['date']}, {res['device']}, commit {res['commit']}")
    for r in rows:
        print(f"  {r[0]:<{width}}  {r[1]:>28}  {r[2]}")
    md = [f"\n## Sweeps: `benchmarks/sweep_bench.py --parts {a.parts}` ({res['date']}, {res['device']}, "
          f"commit {res['commit']})\n",
          f"Model `{a.model}`, calibration {a.calib_tokens} tokens, evaluation {a.eval_tokens} tokens in windows of "
          f"{a.seq_len}" + (f" moved by {a.stride}" if a.stride else "") + f", device {a.device}; each sweep is a fresh `actsparse sweep` process."
          + (f" Affinity part: {res['affinity_models']}, calibration 1024 tokens, evaluation 512 in windows of 128."
             if res.get("affinity_models") and a.device == "cpu" else "") + "\n",
          "| figure | value | target |", "|---|--:|---|"] + [f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows]
    (out / "sweep_bench.md").write_text("\n".join(md) + "\n")
    if not a.no_append:
        with open(REPO / "benchmarks" / "BENCHMARKS.md", "a") as f:
            f.write("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
