"""Pareto fronts, tables and the `actsparse report` command on synthetic run tables with hand-computed answers."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd

from actsparse.report.pareto import pareto_front
from actsparse.report.pareto import groups
from actsparse.report.quality import parse_quality
from actsparse.report.tables import sparsity_table

from .conftest import run_cli

DENSE_PPL = 10.0
# (model, method, requested sparsity, effective sparsity, ppl)
ROWS = [
    ("m1", "dense", 0.25, 0.00, 10.00),
    ("m1", "A", 0.2, 0.20, 10.10),
    ("m1", "A", 0.4, 0.40, 10.50),
    ("m1", "A", 0.6, 0.60, 12.00),
    ("m1", "B", 0.2, 0.25, 10.05),
    ("m1", "B", 0.4, 0.40, 10.80),
    ("m1", "B", 0.6, 0.55, 11.00),
    ("m2", "dense", 0.5, 0.00, 20.00),
    ("m2", "A", 0.5, 0.50, 21.00),
    ("m2", "B", 0.5, 0.50, 22.00),
    ("m2", "C", 0.3, 0.30, 20.50),
    ("m2", "C", 0.3, 0.30, 20.50),   # an exact duplicate: kept once
]
# By hand: m1, walking from the sparsest point down, a point is on the front iff its ppl beats every sparser one:
#   A.6 (12.0) yes, B.55 (11.0) yes, A.4 (10.5) yes, B.4 (10.8, same sparsity as A.4 but worse) no,
#   B.25 (10.05) yes, A.2 (10.1) no, dense (10.0) yes.
# m2: A.5 (21) yes, B.5 (22) no, C.3 (20.5) yes (once), dense (20) yes.
FRONT = {"m1": [("dense", 0.0), ("B", 0.25), ("A", 0.40), ("B", 0.55), ("A", 0.60)],
         "m2": [("dense", 0.0), ("C", 0.30), ("A", 0.50)]}


def _frame() -> pd.DataFrame:
    df = pd.DataFrame(ROWS, columns=["model", "method", "sparsity", "effective", "ppl"])
    df["ppl_dense"] = df["model"].map({"m1": DENSE_PPL, "m2": 20.0})
    df["ppl_ratio"] = df["ppl"] / df["ppl_dense"]
    df["target"] = np.where(df["method"] == "dense", 0.0, df["sparsity"])
    df["eval_data"], df["token_policy"], df["status"] = "bundled:eval", "all", "FINISHED"
    df["run_id"] = [f"r{i}" for i in range(len(df))]
    return df


def test_pareto_front_equals_the_hand_computation():
    front = pareto_front(_frame())
    for model, expected in FRONT.items():
        got = front[front["model"] == model]
        assert list(zip(got["method"], got["effective"].round(2))) == expected


def test_pareto_front_equals_brute_force_dominance_on_random_tables():
    rng = np.random.default_rng()
    for _ in range(20):
        n = int(rng.integers(1, 40))
        df = pd.DataFrame({"model": rng.choice(["a", "b"], n), "method": "x",
                           "effective": rng.choice(np.linspace(0, 0.9, 10), n),   # ties on x happen
                           "ppl": rng.choice(np.linspace(5, 9, 12), n)})          # and on y
        front = pareto_front(df, by=("model",))
        for model, g in df.groupby("model"):
            pts = list(zip(g["effective"], g["ppl"]))
            nondom = {p for p in pts if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in pts)}
            got = list(zip(front[front["model"] == model]["effective"], front[front["model"] == model]["ppl"]))
            assert set(got) == nondom and len(got) == len(nondom)  # each non-dominated point exactly once


def test_ppl_table_has_methods_by_sparsity_and_a_dense_row():
    ((key, g),) = list(groups(_frame()[lambda d: d["model"] == "m1"]))
    md = sparsity_table(g, key, parse_quality("ppl")).markdown()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("|") and "---" not in line}
    assert rows["method"] == ["0.2", "0.4", "0.6"]
    assert rows["dense"] == ["10.00"] * 3                        # the reference: never bold
    # best (lowest) ppl per column in bold: 0.2 -> B, 0.4 -> A, 0.6 -> B
    assert rows["A"] == ["10.10", "**10.50**", "12.00"] and rows["B"] == ["**10.05**", "10.80", "**11.00**"]


def _write_synthetic_sweep(uri: str, sweep_id: str, tmp) -> str:
    from actsparse.tracking.mlflow_runs import Tracker

    tr = Tracker(uri, "actsparse")
    parent = tr.start_sweep(sweep_id, "synthetic", {"name": "synthetic"}, {})
    cells = []
    for i, r in _frame().iterrows():
        params = {"method": {"name": r.method}, "sparsity": r.sparsity, "eval": {"data": r.eval_data}}
        metrics = {"ppl": r.ppl, "ppl_dense": r.ppl_dense, "ppl_ratio": r.ppl_ratio, "sparsity/effective": r.effective,
                   "sparsity/target": r.target}
        tags = {"model": r.model, "token_policy": "all", "cell_key": f"k{i}", "sweep_id": sweep_id}
        rid = tr.log_cell(parent, f"{r.model} {r.method}", params, metrics, tags, None)
        cells.append({"index": i, "cell_key": f"k{i}", "run_id": rid, "status": "finished"})
    (tmp / "cells.json").write_text(json.dumps(cells))
    tr.client.log_artifact(parent, str(tmp / "cells.json"))
    tr.end_run(parent)
    return parent


def test_report_command_reads_mlflow_and_writes_tables_plot_and_parent_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = _write_synthetic_sweep(uri, "synthetic-0001", tmp_path)
    proc = run_cli(["report", "--tracking-uri", uri, "--sweep-id", "synthetic-0001", "--out", str(tmp_path / "out")],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out" / "synthetic-0001"
    md = (out / "report.md").read_text()
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # the front tables in the report, per model, equal the hand computation
    sections = re.split(r"\*\*Pareto front, ppl vs effective sparsity \(model ", md)[1:]
    fronts = {}
    for sec in sections:
        model = sec.split(",", 1)[0]
        rows = [line.split("|")[1:-1] for line in sec.split("\n\n")[1].splitlines()[2:]]
        fronts[model] = [(r[0].strip(), round(float(r[2]), 2)) for r in rows]
    assert fronts == FRONT
    assert (out / "report.html").is_file() and (out / "tables" / "tables.tex").is_file()
    from mlflow import MlflowClient

    files = {a.path for a in MlflowClient(uri).list_artifacts(parent, "report")}
    assert {"report/report.md", "report/report.html", "report/pareto.png", "report/pareto.svg",
            "report/runs.csv"} <= files


def test_report_of_a_missing_store_or_sweep_says_so_and_creates_nothing(tmp_path, capsys):
    from actsparse.cli import main

    assert main(["report", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "actsparse: error: no MLflow store at sqlite:///" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _write_synthetic_sweep(uri, "synthetic-0002", tmp_path)
    assert main(["report", "--tracking-uri", uri, "--sweep-id", "nope-0000"]) == 2
    assert "actsparse: error: no sweep 'nope-0000'" in capsys.readouterr().err
