"""Check the method library's claims on the reference models, with asp.* directly.

  python benchmarks/claims.py [--models tiny-llama tiny-gelu] [--claims 6 7 8] [--max-tokens 16384]
                              [--threads 1] [--plans DIR] [--no-append]

Per model: calibrate once on bundled:calib, fit each method on those stats, and measure perplexity
on bundled:eval (windows of --seq-len, at most --max-tokens tokens, token policy 'all'). The method
variants are the sweep presets' `claim` options: each cell fits the method and parameters of
conf/claim/<variant>_<family>.yaml (family `llama` for a gated MLP, `gelu` for a two-layer one), the
file sweeps/claims.yaml, claims_frontier.yaml and claims_protocols.yaml compose, so the sweeps and this script run the
same variants; the calibration and perplexity token counts default to sweeps/claims.yaml's. A variant that
pins a protocol (the paper presets' options set data.tokens / data.seq_len / eval.seq_len /
eval.token_policy, as the preset's sweep does) is calibrated and evaluated with it instead. Claims:
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
On the paper protocols (conf/method/<method>_paper.yaml with its sweep's calibration and evaluation), perplexity
at every target, and offline lm-eval accuracy (bundled tasks, +- standard error) at target --acc-at in claims
9, 11, 13-15 and 17 (one lm-eval run is ~3 min on one CPU thread):
  9. WINA (paper) beats TEAL (paper) at 0.25 / 0.4 / 0.5 / 0.65, both evaluated as WINA's scripts do (first 1%
     of positions dense); every model the WINA transform supports, its refusal recorded on the others.
 10. WINA beats TEAL at the same four targets, both at the library's defaults (uniform; every model).
 11. LaRoSA (paper) beats TEAL (paper) at the four targets, both evaluated as LaRoSA's script does (every
     position); every model LaRoSA supports, its refusal recorded on the others.
 12. LaRoSA beats TEAL (uniform) at the four targets at the library's defaults (every model).
 13-15, 17. TEAL, CATS, SCAP and R-Sparse in their paper presets stay near dense at 50%: accuracy at target 0.5
     within two standard errors of dense (perplexity at >= 3 targets beside it).
 16. M-COUNTDOWN (paper) beats CATS (paper) at 0.7 / 0.8 / 0.9, both evaluated as COUNTDOWN's scripts do.
 18. N:M in its paper preset (learnable scale and shift): 16:32 much closer to unstructured 50% than 2:4, 8:16
     between (claim 3's test).
Verdicts: holds, holds only partly (which targets say so), fails, or refused (the method's reason).
Prints the table (claim, model, method, target, effective sparsity planned/measured, ppl) and a
verdict per claim with its numbers, and appends both to benchmarks/BENCHMARKS.md with date, device
and commit. A claim that does not hold is reported as such: nothing here is tuned to make it hold.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import actsparse as asp  # noqa: E402
from actsparse.eval.accuracy import significant  # noqa: E402

LADDER = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
LEVELS = (0.25, 0.4, 0.5, 0.65)   # the sparsities of WINA's and TEAL's scripts
CLAIM_DIR = ROOT / "conf" / "claim"
METHOD_DIR = ROOT / "conf" / "method"
SWEEP = yaml.safe_load((ROOT / "sweeps" / "claims.yaml").read_text())


class NotMeasured(Exception):
    """A cell that --measured-only finds no saved measurement of."""


class Protocol(NamedTuple):
    """How a variant is calibrated and evaluated; None: the script's --calib-tokens / --seq-len."""
    calib_tokens: int | None = None
    calib_seq_len: int | None = None
    seq_len: int | None = None
    token_policy: str = "all"


class Variant(NamedTuple):
    model: str
    method: str
    params: dict
    protocol: Protocol


def variant(name: str) -> Variant:
    """Return the model, method, parameters and protocol that the Hydra option conf/claim/<name>.yaml pins.

    A method pick that is a preset (`override /method: wina_paper`) contributes its method and parameters,
    and the option's own method.params override them; data.tokens / data.seq_len / eval.seq_len /
    eval.token_policy, where the option sets them, are its protocol.
    """
    conf = yaml.safe_load((CLAIM_DIR / f"{name}.yaml").read_text())
    # the defaults list reads `- override /model: tiny-llama`; the group is the last path component
    picks = {key.rsplit("/", 1)[-1]: value for entry in conf["defaults"] for key, value in entry.items()}
    method, params = picks["method"], {}
    preset = METHOD_DIR / f"{method}.yaml"
    if preset.exists():
        pre = yaml.safe_load(preset.read_text())
        method, params = pre["name"], dict(pre.get("params") or {})
    params |= dict((conf.get("method") or {}).get("params") or {})
    data, ev = conf.get("data") or {}, conf.get("eval") or {}
    protocol = Protocol(data.get("tokens"), data.get("seq_len"), ev.get("seq_len"), ev.get("token_policy", "all"))
    return Variant(picks["model"], method, params, protocol)


def label(method: str, params: dict) -> str:
    """`method(k=v, ...)` with the variant's parameters, lists joined by commas: `scap(roles=down, mode=kde)`."""
    fmt = lambda v: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
    return method + ("(" + ", ".join(f"{k}={fmt(v)}" for k, v in params.items()) + ")" if params else "")


class Bench:
    """One model: its stats (one calibration per protocol), dense figures, and a cache of evaluated cells."""

    def __init__(self, name: str, args):
        self.name, self.args = name, args
        self.model, self.tok = asp.load_model(name)
        self._stats: dict[tuple, object] = {}
        self._dense: dict[int, float] = {}
        self._plans: dict[str, tuple] = {}
        self._acc_dense: dict | None = None
        self._saved = self.load_saved()
        t0 = time.perf_counter()
        stats = self.stats((args.calib_tokens, args.seq_len))
        self.calib_s = time.perf_counter() - t0
        self.gated = any(s.endswith(".gate") for s in stats.meta["sites"])
        self.dense = self.dense_ppl(args.seq_len)
        self.rows: dict[str, dict] = {}

    @property
    def saved_path(self) -> Path | None:
        return Path(self.args.plans) / f"{self.name}-cells.json" if self.args.plans else None

    def load_saved(self) -> dict:
        """The cells (and dense figures) a run with the same --plans folder measured before."""
        path = self.saved_path
        saved = json.loads(path.read_text()) if path is not None and path.exists() else {}
        self._dense = {int(k): v for k, v in saved.get("dense_ppl", {}).items()}
        self._acc_dense = saved.get("dense_acc")
        return saved.get("rows", {})

    def save(self) -> None:
        """Write every measured cell beside the plans, so an interrupted run resumes without measuring again."""
        if self.saved_path is None:
            return
        rows = self._saved | {k: {**r, "claims": []} for k, r in self.rows.items()}
        tmp = self.saved_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": rows, "dense_ppl": self._dense, "dense_acc": self._acc_dense}))
        tmp.replace(self.saved_path)

    def stats(self, calib: tuple[int, int]):
        """The stats of `calib` = (tokens, seq_len) of bundled:calib, calibrated once."""
        if calib not in self._stats:
            self._stats[calib] = asp.calibrate(self.model, self.tok, data="bundled:calib", tokens=calib[0],
                                               seq_len=calib[1], progress=False)
        return self._stats[calib]

    def ppl(self, seq_len: int | None = None) -> float:
        return asp.perplexity(self.model, self.tok, data="bundled:eval", seq_len=seq_len or self.args.seq_len,
                              max_tokens=self.args.max_tokens)

    def dense_ppl(self, seq_len: int) -> float:
        """Dense perplexity in windows of seq_len (the token policy only says which positions are sparse)."""
        if seq_len not in self._dense:
            self._dense[seq_len] = self.ppl(seq_len)
        return self._dense[seq_len]

    def accuracy(self) -> dict:
        """acc_avg and its standard error on the --tasks, with whatever plan is installed."""
        from actsparse.eval.lm_eval import lm_eval_accuracy

        r = lm_eval_accuracy(self.model, self.tok, self.args.tasks)
        return {"acc": r["acc_avg"], "acc_se": r.get("acc_avg_stderr")}

    def dense_acc(self) -> dict:
        if self._acc_dense is None:
            self._acc_dense = self.accuracy()
        return self._acc_dense

    @property
    def family(self) -> str:
        return "llama" if self.gated else "gelu"

    def cell(self, claim: str, stem: str, target: float, acc: bool = False) -> dict:
        """Fit variant conf/claim/<stem>_<family>.yaml at `target` and measure it (once per fit and evaluation);
        `acc`: with offline lm-eval accuracy too."""
        v = variant(f"{stem}_{self.family}")
        params, p = dict(v.params), v.protocol
        if self.args.seq_calib_tokens and params.get("sequential") and p.calib_tokens is None:
            params["calib_tokens"] = self.args.seq_calib_tokens
        calib = (p.calib_tokens or self.args.calib_tokens, p.calib_seq_len or self.args.seq_len)
        ev = (p.seq_len or self.args.seq_len, p.token_policy)
        fit_key = json.dumps([v.method, target, params, calib], sort_keys=True)
        key = json.dumps([fit_key, ev])
        if key not in self.rows and key in self._saved:   # measured by an earlier run; accuracy added below
            self.rows[key] = dict(self._saved[key], claims=[])
        if key not in self.rows:
            if self.args.measured_only:
                raise NotMeasured(f"{label(v.method, params)} at {target:g}")
            self.rows[key] = self.measure(v.method, target, params, calib, ev, fit_key)
            self.save()
        row = self.rows[key]
        if acc and "acc" not in row and "error" not in row and not self.args.measured_only:
            row.update(self.measure_acc(fit_key, ev[1]))
            self.save()
        if claim not in row["claims"]:
            row["claims"].append(claim)
        return row

    def measure_acc(self, fit_key: str, token_policy: str) -> dict:
        """Accuracy of the fitted plan under the token policy, dense beside (`acc`, `acc_se`, `acc_dense`, ...)."""
        if fit_key not in self._plans:      # a cell measured by an earlier run: reload (or refit) its plan
            method, target, params, calib = json.loads(fit_key)
            self.plan(method, target, params, tuple(calib), fit_key)
        plan, _ = self._plans[fit_key]
        with asp.sparsify(self.model, plan, token_policy=token_policy):
            out = self.accuracy()
        out |= {f"{k}_dense": v for k, v in self.dense_acc().items()}
        print(f"  {self.name:<10} {plan.method:<10} target {plan.target:4.2f} acc {out['acc']:.4f} "
              f"+- {out['acc_se']:.4f} (dense {out['acc_dense']:.4f})", flush=True)
        return out

    def plan(self, method: str, target: float, params: dict, calib: tuple, fit_key: str):
        """(plan, fit seconds), fitted once per fit key; with --plans, saved there and reloaded on a re-run."""
        if fit_key in self._plans:
            return self._plans[fit_key]
        path = None
        if self.args.plans:
            digest = hashlib.sha256(json.dumps([self.name, fit_key]).encode()).hexdigest()[:16]
            path = Path(self.args.plans) / f"{self.name}-{method}-{target}-{digest}"
            if (path / "done").exists():
                meta = json.loads((path / "done").read_text())
                self._plans[fit_key] = (asp.SparsityPlan.load(path / "plan"), meta["fit_s"])
                return self._plans[fit_key]
        stats = self.stats(calib)           # calibrated first: the fit time is the fit's alone
        t0 = time.perf_counter()
        plan = asp.fit(method, stats, target, model=self.model, **params)
        self._plans[fit_key] = (plan, time.perf_counter() - t0)
        if path is not None:
            plan.save(path / "plan")
            (path / "done").write_text(json.dumps({"fit_s": self._plans[fit_key][1]}))
        return self._plans[fit_key]

    def measure(self, method: str, target: float, params: dict, calib: tuple, ev: tuple, fit_key: str) -> dict:
        row = {"claims": [], "model": self.name, "method": label(method, params), "target": target,
               "protocol": protocol_label(calib, ev, self.args)}
        try:
            plan, fit_s = self.plan(method, target, params, calib, fit_key)
        except asp.ActsparseError as e:   # the method refuses this model: the refusal is the cell's result
            print(f"  {self.name:<10} {row['method'][:48]:<48} target {target:4.2f} refused: {e}", flush=True)
            return row | {"error": str(e)}
        with asp.sparsify(self.model, plan, token_policy=ev[1]) as h:
            ppl = self.ppl(ev[0])
            measured = h.measured_sparsity()
        print(f"  {self.name:<10} {row['method'][:48]:<48} target {target:4.2f} "
              f"eff {plan.effective_sparsity:6.3f} meas {measured['effective']:6.3f} ppl {ppl:8.3f} "
              f"({fit_s:.1f}s fit)", flush=True)
        return row | {"effective": plan.effective_sparsity, "measured": measured["effective"],
                      "act_mean": measured["mean"], "ppl": ppl, "ppl_dense": self.dense_ppl(ev[0]), "ratio": ppl / self.dense_ppl(ev[0]),
                      "fit_s": fit_s}


def protocol_label(calib: tuple, ev: tuple, args) -> str:
    """'' for the script's own protocol, else `calib 20480x1024, eval 1024 last_fraction=0.99`."""
    if calib == (args.calib_tokens, args.seq_len) and ev == (args.seq_len, "all"):
        return ""
    return f"calib {calib[0]}x{calib[1]}, eval {ev[0]} {ev[1]}"


def tally(wins: dict[float, bool]) -> str:
    """'holds' when the claim holds at every target, 'fails' at none, else 'holds only partly (at ...)'."""
    good = [t for t, ok in wins.items() if ok]
    if len(good) == len(wins):
        return "holds"
    if not good:
        return "fails"
    return "holds only partly (at " + ", ".join(f"{t:g}" for t in good) + ")"


def acc_text(r: dict) -> str:
    """` acc 31.2 +- 1.0` (percent) where the cell measured accuracy, else ''."""
    return f", acc {100 * r['acc']:.1f} +- {100 * r['acc_se']:.1f}" if "acc" in r else ""


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
    return nm_gaps(b, "3", "nm")


def nm_gaps(b: Bench, claim: str, stem: str) -> tuple[bool, str]:
    """16:32's perplexity gap to unstructured 50% is at most half of 2:4's, and 8:16's sits between."""
    rows = {k: b.cell(claim, f"{stem}_{k.replace(':', '_')}", 0.0)
            for k in ("unstructured", "2:4", "8:16", "16:32")}
    un = rows.pop("unstructured")
    gap = {k: r["ppl"] - un["ppl"] for k, r in rows.items()}
    ok = gap["16:32"] <= 0.5 * gap["2:4"] and gap["2:4"] >= gap["8:16"] >= gap["16:32"]
    return ok, (f"{b.name}: ppl gap to unstructured 50% ({un['ppl']:.3f}): "
                + ", ".join(f"{k} +{gap[k]:.3f}" for k in rows)
                + " (holds if 16:32's gap <= half of 2:4's and 8:16 sits between)")


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


def beats(b: Bench, claim: str, stem: str, base: str, names: tuple[str, str], targets=(0.4, 0.5),
          acc: bool = False) -> tuple[str, str]:
    """Variant `stem` has lower perplexity than variant `base` at every target (`acc`: accuracy beside at --acc-at)."""
    out, wins, missing = [], {}, []
    for s in targets:
        try:
            r = b.cell(claim, stem, s, acc=acc and s == b.args.acc_at)
            if "error" in r:
                return "refused", f"{b.name}: {names[0]} refuses this model: {r['error']}"
            t = b.cell(claim, base, s, acc=acc and s == b.args.acc_at)
        except NotMeasured:
            missing.append(f"{s:g}")
            continue
        wins[s] = r["ppl"] < t["ppl"]
        sig = significant(r["acc"], r["acc_se"], t["acc"], t["acc_se"]) if "acc" in r and "acc" in t else None
        out.append(f"{s:g}: {names[0]} {r['ppl']:.3f} (eff {r['measured']:.3f}{acc_text(r)}) vs {names[1]} "
                   f"{t['ppl']:.3f} (eff {t['measured']:.3f}{acc_text(t)})"
                   + ("" if sig is None else ", accuracy difference " + ("significant" if sig else "within 2 se")))
    if not wins:
        raise NotMeasured(f"{names[0]} vs {names[1]} at every target")
    gap = f" (not measured at {', '.join(missing)})" if missing else ""
    return tally(wins) + gap, f"{b.name}: " + "; ".join(out) + gap


def claim6(b: Bench) -> tuple[str, str]:
    return beats(b, "6", "wina_uniform", "teal_uniform", ("WINA", "TEAL"))


def claim7(b: Bench) -> tuple[str, str]:
    return beats(b, "7", "larosa", "teal_uniform", ("LaRoSA", "TEAL"))


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


def claim9(b: Bench) -> tuple[str, str]:
    return beats(b, "9", "wina_paper", "teal_paper_wina_eval", ("WINA (paper)", "TEAL (paper)"), LEVELS, acc=True)


def claim10(b: Bench) -> tuple[str, str]:
    return beats(b, "10", "wina_uniform", "teal_uniform", ("WINA", "TEAL"), LEVELS)


def claim11(b: Bench) -> tuple[str, str]:
    return beats(b, "11", "larosa_paper", "teal_paper_larosa_eval", ("LaRoSA (paper)", "TEAL (paper)"), LEVELS,
                 acc=True)


def claim12(b: Bench) -> tuple[str, str]:
    return beats(b, "12", "larosa", "teal_uniform", ("LaRoSA", "TEAL"), LEVELS)


def near_dense(b: Bench, claim: str, stem: str, name: str, targets: tuple) -> tuple[str, str]:
    """The preset's accuracy at --acc-at is within two standard errors of dense; perplexity at every target."""
    rows = [b.cell(claim, stem, s, acc=s == b.args.acc_at) for s in targets]
    if "error" in rows[0]:
        return "refused", f"{b.name}: {name} refuses this model: {rows[0]['error']}"
    r = next(r for r in rows if "acc" in r)
    sig = significant(r["acc"], r["acc_se"], r["acc_dense"], r["acc_se_dense"])
    below = sig and r["acc"] < r["acc_dense"]
    ppl = ", ".join(f"{x['target']:g}: {x['ppl']:.3f} (x{x['ratio']:.3f}, eff {x['measured']:.3f})" for x in rows)
    return ("fails" if below else "holds"), (
        f"{b.name}: {name} at {r['target']:g}: acc {100 * r['acc']:.1f} +- {100 * r['acc_se']:.1f} vs dense "
        f"{100 * r['acc_dense']:.1f} +- {100 * r['acc_se_dense']:.1f} ("
        + ("significantly below" if below else "within 2 se" if not sig else "significantly above")
        + f"); ppl {ppl} (dense {r['ppl_dense']:.3f})")


def claim13(b: Bench) -> tuple[str, str]:
    return near_dense(b, "13", "teal_paper", "TEAL (paper)", LEVELS)


def claim14(b: Bench) -> tuple[str, str]:
    return near_dense(b, "14", "cats_paper", "CATS (paper)", (0.5, 0.7, 0.9))


def claim15(b: Bench) -> tuple[str, str]:
    return near_dense(b, "15", "scap_paper", "SCAP (paper)", (0.25, 0.4, 0.5))


def claim16(b: Bench) -> tuple[str, str]:
    return beats(b, "16", "countdown_paper", "cats_paper_countdown_eval", ("M-COUNTDOWN (paper)", "CATS (paper)"),
                 (0.7, 0.8, 0.9))


def claim17(b: Bench) -> tuple[str, str]:
    return near_dense(b, "17", "rsparse_paper", "R-Sparse (paper)", (0.4, 0.5, 0.6))


def claim18(b: Bench) -> tuple[bool, str]:
    return nm_gaps(b, "18", "nm_paper")


# claim -> (its check, the models it runs on: every model, the ungated ones, or the first gated one)
CLAIMS = {"1": (claim1, "every"), "2": (claim2, "ungated"), "3": (claim3, "first gated"),
          "4": (claim4, "first gated"), "5": (claim5, "first gated"), "6": (claim6, "every"),
          "7": (claim7, "first gated"), "8": (claim8, "first gated"), "9": (claim9, "every"),
          "10": (claim10, "every"), "11": (claim11, "every"), "12": (claim12, "every"),
          "13": (claim13, "every"), "14": (claim14, "first gated"), "15": (claim15, "every"),
          "16": (claim16, "first gated"), "17": (claim17, "first gated"), "18": (claim18, "first gated")}


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


def check(benches: list, wanted: list[str]) -> list[tuple[str, "bool | str", str]]:
    """(claim, verdict, text) per claim in `wanted` and model it runs on; a KeyboardInterrupt stops the checks
    and marks the claim in progress and those after it 'not finished'."""
    verdicts = []
    todo = [c for c in CLAIMS if c in wanted]
    for i, c in enumerate(todo):
        fn, on = CLAIMS[c]
        run_on = models_for(on, benches)
        for b in run_on:
            try:
                verdicts.append((c, *fn(b)))
            except KeyboardInterrupt:
                verdicts.append((c, "not finished", f"{b.name}: the run was stopped before this claim finished"))
                return verdicts + [(k, "not finished", "the run was stopped before this claim started")
                                   for k in todo[i + 1:]]
            except NotMeasured as e:
                verdicts.append((c, "not measured", f"{b.name}: no saved measurement of {e}"))
        if not run_on:
            verdicts.append((c, "not checked", "no " + ("two-layer (ungated) MLP" if c == "2" else
                                                        "gated (Llama-like)") + " model given"))
    return verdicts


def word(ok: "bool | str") -> str:
    """A claim's verdict: the word a check returned, or holds / fails for a yes-no check."""
    return ok if isinstance(ok, str) else "holds" if ok else "fails"


def render(benches: list, verdicts: list) -> tuple[str, str]:
    """The Markdown table of every measured cell (dense first per model) and the verdict lines."""
    lines = ["| claim | model | method | protocol | target | effective (plan) | effective (measured) | ppl | "
             "ppl / dense | acc ± se (%) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in benches:
        acc = b._acc_dense
        lines.append(f"| - | {b.name} | dense | | 0 | 0 | 0 | {b.dense:.3f} | 1.000 | "
                     + (f"{100 * acc['acc']:.1f} ± {100 * acc['acc_se']:.1f}" if acc else "") + " |")
        lines += [f"| - | {b.name} | dense | eval seq_len {n} | 0 | 0 | 0 | {v:.3f} | 1.000 | |"
                  for n, v in b._dense.items() if n != b.args.seq_len]
        for r in b.rows.values():
            head = f"| {','.join(r['claims'])} | {r['model']} | {r['method']} | {r['protocol']} | {r['target']:.2f} |"
            if "error" in r:
                lines.append(f"{head} refused: {r['error']} | | | | |")
                continue
            a = f"{100 * r['acc']:.1f} ± {100 * r['acc_se']:.1f}" if "acc" in r else ""
            lines.append(f"{head} {r['effective']:.3f} | {r['measured']:.3f} | {r['ppl']:.3f} | {r['ratio']:.3f} | {a} |")
    verdict = "\n".join(f"- claim {c}: **{word(ok)}** - {txt}" for c, ok, txt in verdicts)
    return "\n".join(lines), verdict


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
    ap.add_argument("--acc-at", type=float, default=0.5,
                    help="the target whose cells of claims 9, 11, 13-15 and 17 also get offline lm-eval accuracy "
                         "(one run of the bundled tasks per cell, ~3 min on one CPU thread; the other targets and "
                         "claims measure perplexity only)")
    ap.add_argument("--tasks", default="actsparse_offline", help="lm-eval tasks for the accuracy (offline: bundled)")
    ap.add_argument("--plans", default=None,
                    help="a folder to save each fitted plan in and reload it from on a re-run (fits are the cost)")
    ap.add_argument("--measured-only", action="store_true",
                    help="measure nothing: table and judge the cells saved in --plans (runs split over processes "
                         "merge their folders and finish with this); a claim missing a cell says so")
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
    # SIGTERM (kill) stops like Ctrl-C: the cells measured so far are tabled, the unfinished claims listed
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    verdicts = check(benches, args.claims)
    table, verdict = render(benches, verdicts)
    print("\n" + table + "\n\n" + verdict)
    wall = time.perf_counter() - t0
    if not args.no_append:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        block = (f"\n## Method claims {' '.join(args.claims)}: {stamp}, {device()}, commit {git_commit()}\n\n"
                 f"`python benchmarks/claims.py --models {' '.join(args.models)} --claims {' '.join(args.claims)} "
                 f"--seq-len {args.seq_len} --max-tokens {args.max_tokens} --calib-tokens {args.calib_tokens}"
                 + (f" --seq-calib-tokens {args.seq_calib_tokens}" if args.seq_calib_tokens else "")
                 + "`: calibration on bundled:calib, "
                 f"perplexity on bundled:eval (token policy `all` and --seq-len windows unless the protocol column "
                 f"says otherwise: the paper presets' calibration and evaluation), offline lm-eval accuracy "
                 f"({args.tasks}, ± one standard error) at target {args.acc_at:g} in claims 9, 11, 13-15 and 17, "
                 f"{wall / 60:.1f} min. Effective sparsity = "
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
