"""Check the method library's claims on the reference models, with asp.* directly.

  python benchmarks/claims.py [--models tiny-llama tiny-gelu] [--claims 6 7 8] [--max-tokens 16384]
                              [--threads 1] [--no-append]

Per model: calibrate once on bundled:calib, fit each method on those stats, and measure perplexity
on bundled:eval (windows of --seq-len, at most --max-tokens tokens, token policy 'all'). The method
variants are the sweep presets' `claim` options: each cell fits the method and parameters of
conf/claim/<variant>_<family>.yaml (family `llama` for a gated MLP, `gelu` for a two-layer one), the
file sweeps/claims.yaml and sweeps/claims_frontier.yaml compose, so the sweep and this script run the
same variants; the calibration and perplexity token counts default to sweeps/claims.yaml's. Claims:
  1. TEAL greedy <= TEAL uniform in perplexity at equal effective sparsity (40-50%).
  2. SCAP with mode-centering beats zero-mode SCAP on tiny-gelu's down-projection input.
  3. N:M 16:32 is much closer to unstructured 50% than 2:4 is; 8:16 sits between.
  4. M-COUNTDOWN preserves perplexity better than CATS at equal intermediate sparsity.
  5. At iso quality (<= 2% perplexity increase), SCAP reaches higher effective sparsity than CATS
     (on the target ladder 0.1..0.9, and interpolated where ppl crosses +2%).
  6. WINA beats TEAL (both uniform) in perplexity at effective sparsity 0.4 and 0.5 (every model).
  7. LaRoSA beats TEAL (uniform) in perplexity at 0.4 and 0.5 (the first gated model).
  8. Sequential calibration keeps TEAL's and WINA's measured sparsity within +-0.01 of the target at
     0.5 and 0.8 on held-out text, where dense calibration drifts (the first gated model); its
     perplexity is reported beside the dense-calibrated one.
Prints the table (claim, model, method, target, effective sparsity planned/measured, ppl) and a
verdict per claim with its numbers, and appends both to benchmarks/BENCHMARKS.md with date, device
and commit. A claim that does not hold is reported as such: nothing here is tuned to make it hold.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import actsparse as asp  # noqa: E402

LADDER = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CLAIM_DIR = ROOT / "conf" / "claim"
SWEEP = yaml.safe_load((ROOT / "sweeps" / "claims.yaml").read_text())


def variant(name: str) -> tuple[str, str, dict]:
    """Return (model, method, params) that the Hydra option conf/claim/<name>.yaml pins."""
    conf = yaml.safe_load((CLAIM_DIR / f"{name}.yaml").read_text())
    # the defaults list reads `- override /model: tiny-llama`; the group is the last path component
    picks = {key.rsplit("/", 1)[-1]: value for entry in conf["defaults"] for key, value in entry.items()}
    return picks["model"], picks["method"], dict((conf.get("method") or {}).get("params") or {})


def label(method: str, params: dict) -> str:
    """`method(k=v, ...)` with the variant's parameters, lists joined by commas: `scap(roles=down, mode=kde)`."""
    fmt = lambda v: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
    return method + ("(" + ", ".join(f"{k}={fmt(v)}" for k, v in params.items()) + ")" if params else "")


class Bench:
    """One model: its stats (calibrated once), dense ppl, and a cache of evaluated cells."""

    def __init__(self, name: str, args):
        self.name, self.args = name, args
        self.model, self.tok = asp.load_model(name)
        t0 = time.perf_counter()
        self.stats = asp.calibrate(self.model, self.tok, data="bundled:calib", tokens=args.calib_tokens,
                                   seq_len=args.seq_len, progress=False)
        self.calib_s = time.perf_counter() - t0
        self.gated = any(s.endswith(".gate") for s in self.stats.meta["sites"])
        self.dense = self.ppl()
        self.rows: dict[str, dict] = {}

    def ppl(self) -> float:
        return asp.perplexity(self.model, self.tok, data="bundled:eval", seq_len=self.args.seq_len,
                              max_tokens=self.args.max_tokens)

    def cell(self, claim: str, stem: str, target: float) -> dict:
        """Fit variant conf/claim/<stem>_<family>.yaml at `target` and measure it (once per method, params, target)."""
        _, method, params = variant(f"{stem}_{'llama' if self.gated else 'gelu'}")
        if self.args.seq_calib_tokens and params.get("sequential"):
            params["calib_tokens"] = self.args.seq_calib_tokens
        key = json.dumps([method, target, params], sort_keys=True)
        if key not in self.rows:
            self.rows[key] = self.measure(method, target, params)
        row = self.rows[key]
        if claim not in row["claims"]:
            row["claims"].append(claim)
        return row

    def measure(self, method: str, target: float, params: dict) -> dict:
        t0 = time.perf_counter()
        plan = asp.fit(method, self.stats, target, model=self.model, **params)
        fit_s = time.perf_counter() - t0
        with asp.sparsify(self.model, plan, token_policy="all") as h:
            ppl = self.ppl()
            measured = h.measured_sparsity()
        print(f"  {self.name:<10} {label(method, params):<48} target {target:4.2f} "
              f"eff {plan.effective_sparsity:6.3f} meas {measured['effective']:6.3f} ppl {ppl:8.3f} "
              f"({fit_s:.1f}s fit)", flush=True)
        return {"claims": [], "model": self.name, "method": label(method, params), "target": target,
                "effective": plan.effective_sparsity, "measured": measured["effective"],
                "act_mean": measured["mean"], "ppl": ppl, "ratio": ppl / self.dense, "fit_s": fit_s}


def claim1(b: Bench) -> tuple[bool, str]:
    out, ok = [], True
    for s in (0.4, 0.5):
        u = b.cell("1", "teal_uniform", s)
        g = b.cell("1", "teal_greedy", s)
        ok &= g["ppl"] <= u["ppl"]
        out.append(f"{s:.0%}: greedy {g['ppl']:.3f} (eff {g['effective']:.3f}) vs uniform {u['ppl']:.3f} "
                   f"(eff {u['effective']:.3f})")
    return ok, f"{b.name}: " + "; ".join(out)


def claim2(b: Bench) -> tuple[bool, str]:
    out, ok = [], True
    for s in (0.5, 0.7):
        z = b.cell("2", "scap_zero_down", s)
        med = b.cell("2", "scap_median_down", s)
        kde = b.cell("2", "scap_kde_down", s)
        ok &= kde["ppl"] < z["ppl"]          # SCAP's proposed centring (kde); median is reported alongside
        out.append(f"{s:.0%}: zero {z['ppl']:.3f}, median {med['ppl']:.3f}, kde {kde['ppl']:.3f}")
    return ok, f"{b.name} down input: " + "; ".join(out)


def claim3(b: Bench) -> tuple[bool, str]:
    un = b.cell("3", "nm_unstructured", 0.0)["ppl"]
    p = {f"{n}:{m}": b.cell("3", f"nm_{n}_{m}", 0.0)["ppl"] for n, m in ((2, 4), (8, 16), (16, 32))}
    gap = {k: v - un for k, v in p.items()}
    ok = gap["16:32"] <= 0.5 * gap["2:4"] and gap["2:4"] >= gap["8:16"] >= gap["16:32"]
    return ok, (f"{b.name}: ppl gap to unstructured 50% ({un:.3f}): 2:4 +{gap['2:4']:.3f}, 8:16 +{gap['8:16']:.3f}, "
                f"16:32 +{gap['16:32']:.3f} (holds if 16:32's gap <= half of 2:4's and 8:16 sits between)")


def claim4(b: Bench) -> tuple[bool, str]:
    out, ok = [], True
    for s in (0.5, 0.7, 0.9):
        c = b.cell("4", "cats", s)
        m = b.cell("4", "countdown_m", s)
        ok &= m["ppl"] <= c["ppl"]
        out.append(f"{s:.0%}: M-COUNTDOWN {m['ppl']:.3f} (eff {m['effective']:.3f}) vs CATS {c['ppl']:.3f} "
                   f"(eff {c['effective']:.3f})")
    return ok, f"{b.name}: " + "; ".join(out)


def claim5(b: Bench) -> tuple[bool, str]:
    best, cross = {}, {}
    for name, stem in (("SCAP", "scap"), ("CATS", "cats")):
        rows = [b.cell("5", stem, s) for s in LADDER]
        ok_rows = [r for r in rows if r["ratio"] <= 1.02]
        best[name] = max(ok_rows, key=lambda r: r["effective"]) if ok_rows else None
        cross[name] = iso_crossing(rows, 1.02)
    eff = {k: (v["effective"] if v else 0.0) for k, v in best.items()}
    desc = ", ".join(f"{k} {eff[k]:.3f} (target {v['target']:.1f}, ppl x{v['ratio']:.4f})" if v else f"{k} none"
                     for k, v in best.items())
    inter = ", ".join(f"{k} {v:.3f}" for k, v in cross.items())
    ok = eff["SCAP"] > eff["CATS"] and cross["SCAP"] > cross["CATS"]
    return ok, (f"{b.name}: highest effective sparsity within +2% ppl on the target ladder: {desc}; "
                f"interpolated where ppl crosses +2%: {inter}")


def beats_teal(b: Bench, claim: str, stem: str, name: str) -> tuple[bool, str]:
    """Variant `stem` has lower perplexity than uniform TEAL at targets 0.4 and 0.5."""
    out, ok = [], True
    for s in (0.4, 0.5):
        t = b.cell(claim, "teal_uniform", s)
        r = b.cell(claim, stem, s)
        ok &= r["ppl"] < t["ppl"]
        out.append(f"{s:.0%}: {name} {r['ppl']:.3f} (eff {r['measured']:.3f}) vs TEAL {t['ppl']:.3f} "
                   f"(eff {t['measured']:.3f})")
    return ok, f"{b.name}: " + "; ".join(out)


def claim6(b: Bench) -> tuple[bool, str]:
    return beats_teal(b, "6", "wina_uniform", "WINA")


def claim7(b: Bench) -> tuple[bool, str]:
    return beats_teal(b, "7", "larosa", "LaRoSA")


def claim8(b: Bench) -> tuple[bool, str]:
    out, ok = [], True
    for method in ("teal", "wina"):
        for s in (0.5, 0.8):
            d = b.cell("8", f"{method}_uniform", s)
            q = b.cell("8", f"{method}_sequential", s)
            drift_d, drift_q = d["act_mean"] - s, q["act_mean"] - s
            ok &= abs(drift_q) <= 0.01 and abs(drift_q) < abs(drift_d)
            out.append(f"{method} {s:.0%}: measured {q['act_mean']:.4f} sequential vs {d['act_mean']:.4f} dense "
                       f"(drift {drift_q:+.4f} vs {drift_d:+.4f}), ppl {q['ppl']:.3f} vs {d['ppl']:.3f}")
    return ok, f"{b.name}, mean activation sparsity on bundled:eval: " + "; ".join(out)


# claim -> (its check, the models it runs on: every model, the ungated ones, or the first gated one)
CLAIMS = {"1": (claim1, "every"), "2": (claim2, "ungated"), "3": (claim3, "first gated"),
          "4": (claim4, "first gated"), "5": (claim5, "first gated"), "6": (claim6, "every"),
          "7": (claim7, "first gated"), "8": (claim8, "first gated")}


def models_for(on: str, benches: list) -> list:
    """The benches a claim runs on (`on` as in CLAIMS)."""
    gated = [b for b in benches if b.gated]
    return {"every": benches, "ungated": [b for b in benches if not b.gated], "first gated": gated[:1]}[on]


def iso_crossing(rows: list[dict], limit: float) -> float:
    """Effective sparsity where ppl/dense first crosses `limit`, linearly interpolated between ladder points."""
    rows = sorted(rows, key=lambda r: r["effective"])
    prev = {"effective": 0.0, "ratio": 1.0}
    for r in rows:
        if r["ratio"] > limit:
            span = r["ratio"] - prev["ratio"]
            frac = (limit - prev["ratio"]) / span if span > 0 else 0.0
            return prev["effective"] + frac * (r["effective"] - prev["effective"])
        prev = r
    return prev["effective"]


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def parser() -> argparse.ArgumentParser:
    """The command line (its defaults are what the sweep presets are checked against)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "tiny-gelu"],
                    help="bundled names or local dirs; the first Llama-like (gated) model is used for claims 3-5, 7, 8")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=SWEEP["eval"]["max_tokens"],
                    help="perplexity tokens (default: sweeps/claims.yaml's eval.max_tokens)")
    ap.add_argument("--calib-tokens", type=int, default=SWEEP["data"]["tokens"],
                    help="calibration tokens (default: sweeps/claims.yaml's data.tokens)")
    ap.add_argument("--seq-calib-tokens", type=int, default=None,
                    help="calibration tokens replayed layer by layer by sequential calibration (claim 8; "
                         "default: the sequential variants' calib_tokens in conf/claim)")
    ap.add_argument("--claims", nargs="+", default=list(CLAIMS), choices=list(CLAIMS),
                    help="which claims to check")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "BENCHMARKS.md"))
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 on a busy machine")
    return ap


def main() -> int:
    args = parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    benches = []
    for name in args.models:
        print(f"{name}: calibrating and measuring dense perplexity", flush=True)
        b = Bench(name, args)
        print(f"  dense ppl {b.dense:.3f} (calibration {b.calib_s:.1f}s)", flush=True)
        benches.append(b)
    verdicts = []
    for c, (fn, on) in CLAIMS.items():
        if c not in args.claims:
            continue
        run_on = models_for(on, benches)
        for b in run_on:
            verdicts.append((c, *fn(b)))
        if not run_on:
            verdicts.append((c, False, "not checked: no " + ("two-layer (ungated) MLP" if c == "2" else
                                                             "gated (Llama-like)") + " model given"))

    head = ("| claim | model | method | target | effective (plan) | effective (measured) | ppl | ppl / dense |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for b in benches:
        lines.append(f"| - | {b.name} | dense | 0 | 0 | 0 | {b.dense:.3f} | 1.000 |")
        for r in b.rows.values():
            lines.append(f"| {','.join(r['claims'])} | {r['model']} | {r['method']} | {r['target']:.2f} | "
                         f"{r['effective']:.3f} | {r['measured']:.3f} | {r['ppl']:.3f} | {r['ratio']:.3f} |")
    verdict_lines = [f"- claim {c}: **{'holds' if ok else 'does not hold'}** - {txt}" for c, ok, txt in verdicts]
    table, verdict = "\n".join(lines), "\n".join(verdict_lines)
    print("\n" + table + "\n\n" + verdict)
    wall = time.perf_counter() - t0
    if not args.no_append:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        block = (f"\n## Method claims {' '.join(args.claims)}: {stamp}, {device()}, commit {git_commit()}\n\n"
                 f"`python benchmarks/claims.py --models {' '.join(args.models)} --claims {' '.join(args.claims)} "
                 f"--seq-len {args.seq_len} --max-tokens {args.max_tokens} --calib-tokens {args.calib_tokens}"
                 + (f" --seq-calib-tokens {args.seq_calib_tokens}" if args.seq_calib_tokens else "")
                 + "`: calibration on bundled:calib, "
                 f"perplexity on bundled:eval (token policy `all`), {wall / 60:.1f} min. Effective sparsity = "
                 "share of site weight reads skipped net of extra reads (predictors, low-rank factors, row sums).\n\n"
                 f"{table}\n\n{verdict}\n")
        out = Path(args.out)
        if not out.exists():
            out.write_text("# Benchmarks\n")
        with out.open("a") as f:
            f.write(block)
        print(f"\nappended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
