"""A cell's MLflow child run, written whole once its cell has a result: tags, metrics, artifacts, status.

The metrics beside the quality figures have fixed names (DESIGN.md): `sparsity/effective`,
`sparsity/effective_expected`, `sparsity/target`, `sparsity/act_mean`, `sparsity/act/<role>`,
`time/calibrate_s`, `time/fit_s`, `time/eval_s`, `time/model_load_s`. The measured figures (ppl, acc/*,
fidelity/*, decode/*, stability/*), and each measure's own tags and files, come from the measure registry
(eval/measures.py).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .mlflow_runs import Tracker

_MAX_TAG = 4900      # under the smallest limit on a tag value among MLflow versions and stores (5000)


def cell_tags(cell, sweep_id: str, device: str) -> dict:
    """The tags every child run has, finished or failed (cell: a sweep.cells.Cell): its keys, sweep, device, model
    and method."""
    return {"cell_key": cell.key, "stats_key": cell.stats.key, "plan_key": cell.plan.key, "sweep_id": sweep_id,
            "token_policy": cell.eval.token_policy, "device": device, "model": cell.config["model"]["name"],
            "method": cell.plan.method, "method_label": cell.method_label or cell.plan.method}


def cell_metrics(r: dict) -> dict:
    """A cell result's sparsity/* and time/* figures under their fixed names."""
    m = {"sparsity/effective": r["effective"], "sparsity/effective_expected": r["expected_effective"],
         "sparsity/target": r["target"], "sparsity/act_mean": r["act_mean"],
         "time/calibrate_s": r["calibrate_s"], "time/fit_s": r["fit_s"], "time/eval_s": r["eval_s"]}
    m.update({f"sparsity/act/{role}": v for role, v in r["per_role"].items()})
    return m


def log_finished(tracker: Tracker, parent: str, sweep_id: str, cell, r: dict, extra: dict | None = None) -> str:
    """Write a FINISHED child run of cell result r; return its id."""
    from ..eval.measures import measures, quality_metrics

    metrics = {**cell_metrics(r), **quality_metrics(r)}
    model, worker = r.get("model", {}), r.get("worker", {})
    metrics["time/model_load_s"] = model.get("load_s", 0.0)
    tags = {**cell_tags(cell, sweep_id, r["device"]), "stats_source": r["stats_source"], "host": r["host"],
            "model_cache": "miss" if model.get("loads") else "hit" if model.get("hits") else "none",
            "ray_node": worker.get("node", "")[:16], "worker_pid": worker.get("pid", ""),
            "eval_batch_size": r.get("eval_batch_size", cell.eval.batch_size), "oom_retries": r.get("oom_retries", 0),
            **(extra or {})}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _write_config(cell, d)
        (d / "plan_summary.txt").write_text(r["plan_summary"] + "\n")
        (d / "measured_sparsity.json").write_text(json.dumps(r["per_point"], indent=1, sort_keys=True))
        for m in measures().values():   # each measure's own tags and files (lm-eval: versions, per-task json)
            if m.key in r:
                mtags, files = m.record(r[m.key], r.get("dense", {}).get(m.key))
                tags.update({k: str(v)[:_MAX_TAG] for k, v in mtags.items()})
                for name, text in files.items():
                    (d / name).write_text(text)
            if f"{m.name}_skipped" in r:
                tags[f"{m.name}_skipped"] = r[f"{m.name}_skipped"][:_MAX_TAG]
        if r["per_point"]:
            layer_sparsity_plot(r["per_point"], r["target"], d / "sparsity_per_layer.png", title=cell.label)
        return tracker.log_cell(parent, cell.label, cell.config, metrics, tags, d, "FINISHED",
                                r["t_start"], r["t_end"])


def log_failed(tracker: Tracker, parent: str, sweep_id: str, cell, msg: str, tb: str,
               extra: dict | None = None) -> str:
    """Write a FAILED child run: tag `error` = msg (the stage that failed and why), error.txt = tb; return its id."""
    tags = {**cell_tags(cell, sweep_id, cell.device), "error": msg[:_MAX_TAG], **(extra or {})}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _write_config(cell, d)
        (d / "error.txt").write_text(tb)
        return tracker.log_cell(parent, cell.label, cell.config, {}, tags, d, "FAILED")


def _write_config(cell, d: Path) -> None:
    from omegaconf import OmegaConf

    (d / "config.yaml").write_text(f"# overrides: {' '.join(cell.overrides)}\n" + OmegaConf.to_yaml(cell.config))


def layer_sparsity_plot(per_point: dict[str, float], target: float, path: str | Path, title: str = "") -> Path:
    """Write measured activation sparsity per layer, one line per role, with the target; return the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    roles: dict[str, dict[int, float]] = {}
    for point, s in per_point.items():
        _, layer, role = point.split(".", 2)
        roles.setdefault(role, {})[int(layer)] = s
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for role, by_layer in roles.items():
        layers = sorted(by_layer)
        ax.plot(layers, [by_layer[i] for i in layers], "o-", ms=3, label=role)
    ax.axhline(target, color="black", ls="--", lw=1, label=f"target {target:g}")
    ax.set_xlabel("layer")
    ax.set_ylabel("measured activation sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
