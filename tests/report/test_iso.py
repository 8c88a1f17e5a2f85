"""Iso-quality and iso-sparsity interpolation on the synthetic table, against hand-computed values."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from actsparse.errors import ActsparseError
from actsparse.report.iso import (EXTRAPOLATED, INTERPOLATED, LOWER_BOUND, MEASURED, NOT_REACHED, iso_quality,
                                  iso_sparsity, ratios, reach)
from actsparse.report.quality import Budget, Quality, parse_budget, parse_quality

from .conftest import frame

PPL, ACC = parse_quality("ppl"), parse_quality("acc_avg")


def _by_method(iso: pd.DataFrame) -> dict[str, tuple]:
    return {r.method: (r.effective, r.effective_status, r.speedup, r.speedup_status) for r in iso.itertuples()}


def test_iso_quality_ppl_within_2_percent_of_dense():
    iso = iso_quality(frame(), PPL, parse_budget("1.02x", PPL))
    assert iso["threshold"].tolist() == pytest.approx([10.2] * 4) and (iso["dense"] == 10.0).all()
    got = _by_method(iso)
    # A: 10.1 at .20 is inside, 10.5 at .40 outside: .20 + (10.2-10.1)/(10.5-10.1) * .20 = .25
    #    speedup: 1.2 + (10.2-10.1)/(10.5-10.1) * (1.5-1.2) = 1.275
    assert got["A"][0] == pytest.approx(0.25) and got["A"][1] == INTERPOLATED
    assert got["A"][2] == pytest.approx(1.275) and got["A"][3] == INTERPOLATED
    # B: .25 + (10.2-10.05)/(10.8-10.05) * .15 = .28 ; speedup 1.25 + (.15/.75) * .15 = 1.28
    assert got["B"][0] == pytest.approx(0.28) and got["B"][2] == pytest.approx(1.28)
    # C never leaves the budget: extend its last segment (.1, 10.02)-(.2, 10.1): .2 + (10.2-10.1)/(10.1-10.02)*.1
    #   = .325 ; speedup 1.1 + (.1/.08) * .05 = 1.1625, both flagged as extrapolated
    assert got["C"][0] == pytest.approx(0.325) and got["C"][1] == EXTRAPOLATED
    assert got["C"][2] == pytest.approx(1.1625) and got["C"][3] == EXTRAPOLATED
    # D: one point (.3, 10.15); its curve starts at dense (0, 10): .3 + (10.2-10.15)/(10.15-10) * .3 = .4
    assert got["D"][0] == pytest.approx(0.4) and got["D"][1] == EXTRAPOLATED
    assert math.isnan(got["D"][2]) and got["D"][3] == "no data"


def test_iso_quality_accuracy_drop_of_one_point_skips_dominated_points():
    iso = iso_quality(frame(), ACC, parse_budget("1pt", ACC))
    assert iso["threshold"].iloc[0] == pytest.approx(0.59)   # fractions: 1 point = 0.01
    got = _by_method(iso)
    # A: .598 at .2 inside, .58 at .4 outside: .2 + (.59-.598)/(.58-.598) * .2 = .2 + .2 * 8/18
    assert got["A"][0] == pytest.approx(0.2 + 0.2 * 8 / 18)
    # B: .25 (.595) is dominated by .4 (.596), so the curve is dense -> .4 -> .55:
    #    .4 + (.59-.596)/(.57-.596) * .15 = .4 + .15 * 6/26
    assert got["B"][0] == pytest.approx(0.4 + 0.15 * 6 / 26) and got["B"][1] == INTERPOLATED
    assert set(got) == {"A", "B"}                             # C and D have no accuracy


def test_ratio_and_absolute_budgets_and_a_budget_met_exactly_at_a_point():
    # 0.5abs on ppl: threshold 10.5, met exactly by A at .4; the next point (12 at .6) is outside -> .4, measured
    got = _by_method(iso_quality(frame(), PPL, parse_budget("0.5abs", PPL)))
    assert got["A"][0] == pytest.approx(0.4) and got["A"][1] == MEASURED
    # 0.99x on accuracy: threshold .594; A: .2 + (.594-.598)/(.58-.598) * .2 = .2 + .2 * 4/18
    got = _by_method(iso_quality(frame(), ACC, parse_budget("0.99x", ACC)))
    assert got["A"][0] == pytest.approx(0.2 + 0.2 * 4 / 18)


def test_ratios_between_methods_and_their_extrapolation_flag():
    iso = iso_quality(frame(), PPL, parse_budget("1.02x", PPL))
    r = ratios(iso, "effective")
    ba = r[(r["method"] == "B") & (r["vs"] == "A")].iloc[0]
    assert ba["ratio"] == pytest.approx(0.28 / 0.25) and not ba["extrapolated"]
    ca = r[(r["method"] == "C") & (r["vs"] == "A")].iloc[0]
    assert ca["ratio"] == pytest.approx(0.325 / 0.25) and ca["extrapolated"]
    s = ratios(iso, "speedup")
    assert s[(s["method"] == "B") & (s["vs"] == "A")]["ratio"].iloc[0] == pytest.approx(1.28 / 1.275)
    assert math.isnan(s[(s["method"] == "D") & (s["vs"] == "A")]["ratio"].iloc[0])
    assert len(r) == 4 * 3                                   # every ordered pair of the 4 methods


def test_iso_sparsity_reads_quality_off_each_curve():
    iso = iso_sparsity(frame(), PPL, [0.3, 0.5])
    v = {(r.method, r.level): (r.value, r.status) for r in iso.itertuples()}
    # at .3: A between (.2, 10.1) and (.4, 10.5) -> 10.3; B between (.25, 10.05) and (.4, 10.8) -> 10.3;
    #        C past (.2, 10.1) along slope .08/.1 -> 10.18 (extrapolated); D measured 10.15
    assert v[("A", 0.3)] == (pytest.approx(10.3), INTERPOLATED)
    assert v[("B", 0.3)] == (pytest.approx(10.3), INTERPOLATED)
    assert v[("C", 0.3)] == (pytest.approx(10.18), EXTRAPOLATED)
    assert v[("D", 0.3)] == (pytest.approx(10.15), MEASURED)
    # at .5: A 10.5 + 1.5 * .1/.2 = 11.25; B 10.8 + .2 * .1/.15 = 10.9333; D past .3: 10.15 + .15 * .2/.3 = 10.25
    assert v[("A", 0.5)][0] == pytest.approx(11.25) and v[("B", 0.5)][0] == pytest.approx(10.8 + 0.2 / 1.5)
    assert v[("D", 0.5)] == (pytest.approx(10.25), EXTRAPOLATED)


def test_reach_edge_cases_on_bare_curves():
    c = pd.DataFrame({"x": [0.2, 0.4], "q": [10.3, 10.5]})
    r = reach(c, PPL, 10.2)                                   # no dense anchor and the first point misses
    assert math.isnan(r.value) and r.status == NOT_REACHED
    one = pd.DataFrame({"x": [0.3], "q": [10.1]})
    assert reach(one, PPL, 10.2) == type(r)(0.3, LOWER_BOUND)  # nothing to extend from: at least .3
    steep = pd.DataFrame({"x": [0.0, 0.5], "q": [10.0, 10.05]})
    assert reach(steep, PPL, 10.2, x_max=1.0).value == 1.0    # extrapolated past 1: capped at all weights skipped
    assert reach(c.iloc[:0], PPL, 10.2).status == "no data"


@pytest.mark.parametrize("spec,q,message", [
    ("0.98x", PPL, "would ask for better than dense; the ratio must be at least 1"),
    ("1.01x", ACC, "would ask for better than dense; the ratio must be at most 1"),
    ("1pt", PPL, "points are for accuracies, and ppl is not one"),
    ("two percent", PPL, "bad quality budget 'two percent' for ppl; expected RATIOx"),
])
def test_bad_budgets_say_what_to_write(spec, q, message):
    with pytest.raises(ActsparseError, match=message.replace("(", r"\(")):
        parse_budget(spec, q).threshold(q, 10.0)


def test_default_budgets_and_their_wording():
    assert parse_budget(None, PPL) == Budget("ratio", 1.02)
    assert parse_budget(None, ACC) == Budget("points", 1.0)
    assert parse_budget(None, Quality("fidelity/cos", True)) == Budget("ratio", 0.99)
    assert parse_budget("1.02x", PPL).describe(PPL) == "ppl ≤ 1.02 × dense"
    assert parse_budget("1pt", ACC).describe(ACC) == "acc_avg drop ≤ 1 point"
    # accuracies logged in percent: a point is 1.0, not 0.01
    assert parse_budget("1pt", ACC).threshold(ACC, 60.0, [60.0, 58.0]) == pytest.approx(59.0)


def test_headline_compares_interpolated_reaches_and_skips_extrapolated_ones():
    from actsparse.report.iso import headline

    iso = iso_quality(frame(), PPL, parse_budget("1.02x", PPL))
    # C (.325) and D (.400) are extrapolated; of the interpolated A (.25) and B (.28), B wins: .28/.25 = 1.12,
    # speedups 1.28 / 1.275 = 1.0039
    assert headline(iso) == ["B reaches 1.12× the effective sparsity of A (0.280 vs 0.250) and 1.00× its decode "
                             "speedup (1.28× vs 1.27×) at ppl ≤ 1.02 × dense on m."]
