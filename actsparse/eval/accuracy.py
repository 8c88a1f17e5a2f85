"""Per-task accuracy with standard errors, sparse beside dense, and whether a difference is significant.

A sparse-vs-dense difference counts as significant only when it exceeds two standard errors of the
difference, 2 * sqrt(se_sparse^2 + se_dense^2) (the two evaluations treated as independent, which
overstates the error of paired items: the test is conservative). A figure from a `limit` run is said
to be subsampled, with the items scored out of the task's total.
"""
from __future__ import annotations

import math

Z = 2.0                    # standard errors a difference must exceed to be called significant


def significant(a: float, se_a: float | None, b: float, se_b: float | None) -> bool | None:
    """Whether a and b differ by more than Z standard errors of the difference; None without both errors."""
    if se_a is None or se_b is None or any(_nan(x) for x in (a, b, se_a, se_b)):
        return None
    return abs(a - b) > Z * math.sqrt(se_a ** 2 + se_b ** 2)


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(v: float | None, se: float | None = None) -> str:
    """`57.3 ± 2.1` (percent) or `57.3`, `–` when missing."""
    if _nan(v):
        return "–"
    return f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if not _nan(se) else "")


def task_rows(acc: dict, dense: dict | None) -> list[dict]:
    """One row per task (and acc_avg) of an lm-eval result: n, acc and acc_norm with ± stderr, dense beside, Δ
    in points with `n.s.` when within 2 stderr; `n` says `50/711` when `limit` subsampled the task."""
    dense = dense or {}
    tasks = sorted({k.split("/", 1)[1] for k in acc if k.startswith(("acc/", "acc_norm/"))})
    rows = []
    for t in tasks + (["acc_avg"] if "acc_avg" in acc else []):
        n, total = (acc.get("n_samples") or {}).get(t), (acc.get("n_total") or {}).get(t)
        row = {"task": t, "n": "" if n is None else f"{n}/{total}" if total and total > n else str(n)}
        for m in ("acc", "acc_norm"):
            key, se_key = (("acc_avg", "acc_avg_stderr") if t == "acc_avg" else (f"{m}/{t}", f"{m}_stderr/{t}"))
            if t == "acc_avg" and m == "acc_norm":
                continue
            v, se, d, dse = acc.get(key), acc.get(se_key), dense.get(key), dense.get(se_key)
            row[m] = pct(v, se)
            row[f"{m} dense"] = pct(d, dse)
            sig = significant(v, se, d, dse) if not _nan(v) and not _nan(d) else None
            row[f"Δ{m}"] = "–" if _nan(v) or _nan(d) else \
                f"{100 * (v - d):+.1f}" + (" (n.s.)" if sig is False else "")
        rows.append(row)
    return rows


def subsampled(acc: dict) -> str:
    """`subsampled: 20 of 711 items (actsparse_context), ...` when `limit` cut any task, else ''."""
    n, total = acc.get("n_samples") or {}, acc.get("n_total") or {}
    cut = [f"{n[t]} of {total[t]} items ({t})" for t in sorted(total) if t in n and n[t] < total[t]]
    return ("subsampled (eval.lm_eval.limit): " + ", ".join(cut)) if cut else ""
