"""Pareto fronts and per-method curves on the synthetic table, against fronts worked out by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from actsparse.errors import ActsparseError
from actsparse.report.pareto import fronts
from actsparse.report.quality import default_qualities, direction_of, parse_quality

from .conftest import frame


def _pairs(fr: pd.DataFrame, flag: str) -> list[tuple[str, float]]:
    f = fr[fr[flag]].sort_values(["x", "method"])
    return [(m, round(float(x), 3)) for m, x in zip(f["method"], f["x"])]


def test_ppl_front_over_effective_sparsity_matches_the_hand_computation():
    # Walk from the sparsest point down; a point is on the front iff its ppl beats every sparser one:
    # A.6 12 yes; B.55 11 yes; A.4 10.5 yes; B.4 10.8 no (same x, worse); D.3 10.15 yes; B.25 10.05 yes;
    # A.2 and C.2 10.1 no (B.25 is sparser and better); C.1 10.02 yes; dense 10 yes.
    fr = fronts(frame(), parse_quality("ppl"), "effective")
    assert _pairs(fr, "on_front") == [("dense", 0.0), ("C", 0.1), ("B", 0.25), ("D", 0.3), ("A", 0.4),
                                      ("B", 0.55), ("A", 0.6)]
    # every ppl point of every method is on its own curve: each method's ppl rises with its sparsity
    assert fr["on_curve"].all()


def test_accuracy_front_is_maximised_and_a_dominated_point_leaves_its_method_curve():
    # acc: higher is better. Sparsest first: A.6 .50 yes; B.55 .57 yes; B.4 .596 yes; A.4 .58 no (B.4 better at
    # the same x); B.25 .595 no (B.4 is sparser and better); A.2 .598 yes; dense .60 yes. C and D have no acc.
    fr = fronts(frame(), parse_quality("acc_avg"), "effective")
    assert _pairs(fr, "on_front") == [("dense", 0.0), ("A", 0.2), ("B", 0.4), ("B", 0.55), ("A", 0.6)]
    # within B alone, .25 (.595) is dominated by .40 (.596); every other acc point is on its method's curve
    off = fr[~fr["on_curve"]]
    assert list(zip(off["method"], off["x"])) == [("B", 0.25)]
    assert set(fr["method"]) == {"dense", "A", "B"}


def test_ppl_front_over_decode_speedup_has_dense_at_speedup_one():
    # x = speedup (dense: 1.0). Fastest first: A 1.9 (12) yes; B 1.8 (11) yes; A 1.5 (10.5) yes; B 1.4 (10.8) no;
    # B 1.25 (10.05) yes; A 1.2 (10.1) no; C 1.1 (10.1) no; C 1.05 (10.02) yes; dense 1.0 (10) yes. D: no speedup.
    fr = fronts(frame(), parse_quality("ppl"), "speedup")
    assert _pairs(fr, "on_front") == [("dense", 1.0), ("C", 1.05), ("B", 1.25), ("A", 1.5), ("B", 1.8), ("A", 1.9)]
    assert "D" not in set(fr["method"])


def test_fronts_are_per_model_and_never_mix_models():
    a, b = frame(model="m"), frame(model="n")
    b["ppl"] = b["ppl"] - 5.0   # model n is better everywhere; it must not knock m's points off m's front
    fr = fronts(pd.concat([a, b], ignore_index=True), parse_quality("ppl"), "effective")
    for model in ("m", "n"):
        assert len(fr[(fr["model"] == model) & fr["on_front"]]) == 7


def test_front_is_brute_force_dominance_on_random_tables_for_both_directions():
    rng = np.random.default_rng()
    for higher in (False, True):
        q = parse_quality("acc_avg" if higher else "ppl")
        for _ in range(15):
            n = int(rng.integers(2, 30))
            df = pd.DataFrame({"method": rng.choice(["A", "B", "C"], n), "model": "m",
                               "effective": rng.choice(np.linspace(0.05, 0.9, 8), n),
                               q.name: rng.choice(np.linspace(0.3, 0.9, 9), n)})
            fr = fronts(df, q, "effective")
            pts = list(zip(df["effective"], df[q.name]))
            better = (lambda a, b: a >= b) if higher else (lambda a, b: a <= b)
            nondom = {p for p in pts if not any(o[0] >= p[0] and better(o[1], p[1]) and o != p for o in pts)}
            got = list(zip(fr.loc[fr["on_front"], "x"], fr.loc[fr["on_front"], "q"]))
            assert set(got) == nondom and len(got) == len(nondom)


@pytest.mark.parametrize("name,higher", [("ppl", False), ("ppl_ratio", False), ("loss", False), ("eval/loss", False),
                                         ("acc/arc_easy", True), ("acc_norm/hellaswag", True), ("acc_avg", True),
                                         ("fidelity/cos", True)])
def test_direction_is_read_from_the_metric_name(name, higher):
    assert direction_of(name) is higher and parse_quality(name).higher_is_better is higher


def test_unknown_metric_direction_asks_for_min_or_max():
    with pytest.raises(ActsparseError, match=r"cannot tell whether higher or lower is better for quality metric "
                                             r"'bleu'.*bleu:min or bleu:max"):
        parse_quality("bleu")
    assert parse_quality("bleu:max").higher_is_better and not parse_quality("fidelity/relerr:min").higher_is_better


def test_default_qualities_are_the_recorded_headline_metrics():
    df = frame()
    assert [q.name for q in default_qualities(df)] == ["ppl", "acc_avg"]
    df["acc/arc_easy"] = 0.5
    assert [q.name for q in default_qualities(df.drop(columns=["ppl", "acc_avg"]))] == ["acc/arc_easy"]
