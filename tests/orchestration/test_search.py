"""Search mode (`actsparse sweep --search BUDGET`): budgets are parsed or refused before anything runs, and a
real search on tiny-llama (real Ray, real MLflow) lands within its tolerance of the crossing a dense grid finds."""
from __future__ import annotations

import json
import re

import pytest

from actsparse.errors import ActsparseError
from actsparse.sweep.search import parse_search

from .conftest import mlflow_runs, summary, sweep_in_process


@pytest.mark.parametrize("text, metric, kind, value", [
    ("ppl<=1.02x", "ppl", "ratio", 1.02),
    ("ppl <= 1.05x dense", "ppl", "ratio", 1.05),
    ("ppl<=1.02*dense", "ppl", "ratio", 1.02),
    ("ppl=1.1x", "ppl", "ratio", 1.1),
    ("acc_avg>=dense-1", "acc_avg", "points", 1.0),
    ("acc_avg >= dense - 2pt", "acc_avg", "points", 2.0),
    ("acc_avg=1pt", "acc_avg", "points", 1.0),
    ("fidelity/cos>=0.99x", "fidelity/cos", "ratio", 0.99),
    ("ppl<=dense+0.5abs", "ppl", "abs", 0.5),
])
def test_budget_forms_parse_to_the_report_budget(text, metric, kind, value):
    spec = parse_search(text)
    assert (spec.quality.name, spec.budget.kind, spec.budget.value) == (metric, kind, value)
    assert spec.max_probes == 7                       # 0.9 / 2^7 < 0.01 <= 0.9 / 2^6


@pytest.mark.parametrize("text, why", [
    ("ppl", "accepted forms"),
    ("ppl<=fast", "accepted forms"),
    ("ppl>=1.02x", "cannot be met"),                   # lower is better: a floor on ppl is no budget
    ("acc_avg<=dense-1", "cannot be met"),
    ("acc_avg>=dense+1", "better than dense"),
    ("ppl<=0.9x", "better than dense"),
    ("ppl<=1x", "only dense meets it"),
    ("speed<=2x", "cannot tell whether higher or lower is better"),
])
def test_malformed_or_unsatisfiable_budgets_are_refused_naming_the_forms(text, why):
    with pytest.raises(ActsparseError, match=re.escape(why)):
        parse_search(text)


def test_a_self_referenced_metric_compares_with_the_dense_models_own_score():
    """fidelity compares with the dense model itself: dense's cos is 1 and its rel_err 0, whatever a probe logs."""
    from actsparse.sweep.search import _threshold, _value

    spec = parse_search("fidelity/rel_err<=dense+0.05abs")
    value, dense = _value(spec, {"fidelity/rel_err": 0.08, "fidelity/cos": 0.99})
    assert (value, dense) == (0.08, 0.0) and _threshold(spec, dense, value) == pytest.approx(0.05)
    assert _value(parse_search("fidelity/cos>=0.99x"), {"fidelity/cos": 0.995}) == (0.995, 1.0)


def test_search_resolution_must_be_sane():
    with pytest.raises(ActsparseError, match=r"--tol must be in \(0, 0.5\)"):
        parse_search("ppl<=1.02x", tol=0)
    with pytest.raises(ActsparseError, match=r"--max-sparsity must be in \(0, 1\)"):
        parse_search("ppl<=1.02x", max_sparsity=1.0)


def test_a_probe_over_its_budget_is_marked_with_a_cross_naming_the_limit(tiny_dir):
    from rich.text import Text

    from actsparse.sweep.compose import compose_grid
    from actsparse.sweep.runner import finished_line, plan_sweep
    from actsparse.sweep.search import probe_verdict

    (cell,), _, _ = plan_sweep(compose_grid([f"model={tiny_dir}", "method=teal", "sparsity=0.45"]))
    spec = parse_search("ppl<=1.05x")

    def verdict(c, result):
        return probe_verdict(spec, {"ppl": result["ppl"], "ppl_dense": result["dense"]["ppl"]})

    dense = 22.368
    for ppl, mark, word in ((25.723, "✗", "over"), (23.40, "✓", "within"), (dense * 1.05, "✓", "within")):
        line = Text.from_markup(finished_line(cell, {"ppl": ppl, "dense": {"ppl": dense}, "effective": 0.4},
                                              verdict)).plain
        assert line == (f"{mark} {cell.label}  ppl {ppl:.3f} (x{ppl / dense:.3f} dense)  effective sparsity 0.400  "
                        f"{word} ppl<=1.05x (limit {1.05 * dense:.2f})  [{cell.key}]"), line   # the report's digits
    plain = Text.from_markup(finished_line(cell, {"ppl": 25.723, "dense": {"ppl": dense}, "effective": 0.4})).plain
    assert plain.startswith("✓ ") and "limit" not in plain      # an ordinary sweep cell: finished is all it says


def test_cli_refuses_before_loading_anything(workspace, monkeypatch):
    ws, base = workspace
    monkeypatch.chdir(ws)   # in-process (the console script's error path is tested in test_cli_errors)
    for args, msg in (
        (["--search", "ppl=>1.02x"], "accepted forms"),
        (["--search", "acc_avg>=dense-1", "method=teal"], "measures only ppl; choose eval=lm_eval"),
        (["--search", "ppl<=1.02x", "method=nm"], "does not take a target sparsity"),
        (["--search", "loss<=1.02x", "method=teal"], "budget on 'loss', but cell"),   # no measure records it
    ):
        rc, out, err = sweep_in_process([*args, "+sweep=smoke", *base])
        assert rc == 2, out + err
        assert msg in err and err.startswith("actsparse: error:")
        assert not (ws / "mlflow.db").exists() and not (ws / "store").exists()


def test_search_converges_to_the_crossing_of_a_dense_grid(ray_cluster, workspace):
    ws, base = workspace
    base = [o for o in base if not o.startswith("model=")] + ["model=tiny-llama"]   # a trained model: ppl bends
    uri = f"sqlite:///{ws}/mlflow.db"
    budget = "ppl<=1.05x"
    rc, out, err = sweep_in_process(["--search", budget, "+sweep=smoke", *base, "method=teal"])
    assert rc == 0, out + err
    (res,) = json.loads(next((ws / "results").glob("search-*/search.json")).read_text())["groups"]
    assert res["status"] == "measured" and res["n_probes"] <= 7
    lo, hi = res["bracket"]
    assert 0 < lo < hi and hi - lo <= 0.01 + 1e-9 and res["found_target"] == lo
    probes = mlflow_runs(uri, "cell")
    assert len(probes) == res["n_probes"] and all(r.data.tags["search_budget"] == budget for r in probes)
    assert sorted(int(r.data.tags["search_probe"]) for r in probes) == list(range(len(probes)))
    for r in probes:     # each probe's verdict is the budget applied to its own measured numbers
        assert r.data.tags["search_pass"] == str(int(r.data.metrics["ppl"] <= 1.05 * r.data.metrics["ppl_dense"]))
    for r in probes:     # the console marks each probe by that verdict: ✓ within the budget, ✗ over it
        ok = r.data.tags["search_pass"] == "1"
        (line,) = [x for x in out.splitlines() if f"teal s={float(r.data.params['sparsity']):g}  ppl " in x]
        verdict = f"{'within' if ok else 'over'} {budget} (limit "
        assert line.startswith("✓" if ok else "✗") and verdict in line, line
    found = [r for r in probes if float(r.data.params["sparsity"]) == lo]
    assert found and found[0].data.metrics["sparsity/effective"] == pytest.approx(res["found_effective"])

    # the crossing a grid finds: the first grid point outside the budget, 0.02 apart around the answer
    grid = [round(lo + d, 4) for d in (-0.06, -0.04, -0.02, 0.0, 0.02, 0.04, 0.06) if 0 < lo + d < 1]
    rc, out, err = sweep_in_process(["+sweep=smoke", *base, "method=teal", "sparsity=" + ",".join(map(str, grid))])
    assert rc == 0 and summary(out)[2] == 0, out + err
    cells = {float(r.data.params["sparsity"]): r for r in mlflow_runs(uri, "cell") if "search_id" not in r.data.tags}
    outside = [t for t in sorted(cells)
               if cells[t].data.metrics["ppl"] > 1.05 * cells[t].data.metrics["ppl_dense"]]
    assert outside, "the grid never leaves the budget"
    crossing = outside[0]
    assert abs(crossing - hi) <= 0.01 + 0.02 + 1e-9          # the search's tolerance + the grid's spacing

    # the report reads the answer as measured, and plots the probes
    md = next((ws / "results").glob("search-*/report.md")).read_text()
    assert "Searched (teal)" in md
    assert any((ws / "results").glob("search-*/plots/search_ppl.png"))
