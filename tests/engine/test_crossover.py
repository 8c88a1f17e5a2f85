"""The engine's choice among cuBLAS and the sparse kernels: the interpolation, the thresholds it measures at, and
the measurement on a GPU."""

import pytest
import torch

from actsparse.engine import TINY, Engine
from actsparse.engine.crossover import LEVELS, OPS, OpTimes, crossing, crossovers, op_times, union_threshold
from benchmarks.engine_thresholds import calibrate_thresholds


def test_crossing_interpolates_where_the_speedup_reaches_one():
    assert crossing([(0.0, 0.6), (0.4, 0.8), (0.6, 1.2)]) == pytest.approx(0.5)
    assert crossing([(0.6, 1.2), (0.0, 0.6), (0.4, 0.8)]) == pytest.approx(0.5)  # any order
    assert crossing([(0.0, 1.05), (0.5, 2.0)]) == 0.0  # wins everywhere: never cuBLAS
    assert crossing([(0.0, 0.3), (0.85, 0.9)]) == 1.0  # never wins: always cuBLAS
    assert crossing([]) == 0.0


def test_op_times_choose_the_fastest_at_the_expected_skip():
    # dense 10 ms; oneshot 12 -> 6 (flat fixed cost), gather 14 -> 2 (work proportional to the kept rows)
    t = OpTimes(10.0, (0.0, 0.5, 1.0), {"oneshot": (12.0, 8.0, 6.0), "gather": (14.0, 8.0, 2.0)})
    assert t.at("gather", 0.25) == pytest.approx(11.0) and t.at("oneshot", 0.75) == pytest.approx(7.0)
    assert t.at("gather", -1.0) == 14.0 and t.at("gather", 2.0) == 2.0  # clamped to the measured range
    assert t.choice(0.0) == "dense"  # 10 < 12
    assert t.choice(0.4) == "oneshot"  # dense 10, oneshot 8.8, gather 9.2
    assert t.choice(0.8) == "gather"  # oneshot 6.8, gather 4.4
    # the best kernel's speedup line: 10/12 at 0, 10/8 at 0.5, so it crosses 1 at 0.5 * (1 - 10/12) / (10/8 - 10/12)
    assert t.crossover() == pytest.approx(0.2, abs=1e-3)
    assert OpTimes(1.0, (0.0,), {}).choice(0.5) == "dense" and OpTimes(1.0, (0.0,), {}).crossover() == 1.0


@pytest.mark.parametrize("s", [0.25, 0.5, 0.8])
def test_union_threshold_skips_that_fraction_of_the_batch_union(s):
    v = torch.randn(3, 1000)
    t = union_threshold(v, s)
    skipped = float((v.abs().amax(dim=0) <= t).float().mean())
    assert skipped == pytest.approx(s, abs=2e-3)
    assert not (v.abs() == t).any()  # no input sits on the threshold
    assert union_threshold(v, 0.0) == 0.0


def test_the_mlp_runs_the_fastest_of_its_three_ways(monkeypatch):
    """`_mlp_raw` from measured times (stand-ins here): the whole MLP in two launches where it beats both the raw
    pair + gated down and gate|up + down apart (read at the bytes' mean skip), else the faster of those two; never
    fused for a rule it cannot run (a low-rank path, a Top-K level on down, two N:M patterns)."""
    from actsparse.engine import engine as eng_mod

    eng = Engine.random(TINY, device="cpu", dtype=torch.float32, kernels="torch", max_batch=1, max_seq_len=16,
                        fallback_below=0.0)
    eng.residual_fp32, eng.fallback_below = True, "measured"
    eng.set_thresholds({f"layers.{i}.{r}": 0.3 for i in range(TINY.n_layers)
                        for r in ("q", "k", "v", "o", "gate", "up", "down")},
                       expected_sparsity={f"layers.0.{r}": s for r, s in (("gate", 0.5), ("up", 0.5), ("down", 0.2))})
    r = eng.rules[0]
    levels = (0.0, 1.0)

    def times(mlp_ms):  # gate|up + down apart: 10 + 5 at any skip; pair + gated: 8 + 4; fused: linear in the skip
        flat = {"oneshot": (10.0, 10.0)}
        return {"gu": OpTimes(99.0, levels, flat), "down": OpTimes(99.0, levels, {"oneshot": (5.0, 5.0)}),
                "qkv": OpTimes(99.0, levels, flat), "o": OpTimes(99.0, levels, flat),
                "pair": OpTimes(float("inf"), levels, {"gather": (8.0, 8.0)}),
                "gated": OpTimes(float("inf"), levels, {"gather": (4.0, 4.0)}),
                "mlp": OpTimes(float("inf"), levels, {"fused": mlp_ms})}
    x = torch.zeros(1, TINY.hidden_size)

    def pick(mlp_ms, rule=r):
        monkeypatch.setattr(eng_mod, "op_times", lambda e, b: times(mlp_ms))
        return eng._mlp_raw(rule, x, 1, None, None)
    # at the bytes' mean skip (2·0.5 + 0.2) / 3 = 0.4: 20 - 10·0.4 = 16 > 12, 14 - 10·0.4 = 10 < 12
    assert r.gu.expected == 0.5 and r.down.expected == 0.2
    assert pick((20.0, 10.0)) == ("gather", "gather")
    assert pick((14.0, 4.0)) == eng_mod.FUSED_MLP
    topk_down = eng_mod._LayerRule(r.qkv, r.o, r.gu, eng_mod._OpRule(thresh=r.down.thresh, expected=0.2,
                                                                      topk=torch.zeros(1, dtype=torch.int32)))
    two_nm = eng_mod._LayerRule(r.qkv, r.o, eng_mod._OpRule(thresh=r.gu.thresh, expected=0.5, nm=(2, 4)), r.down)
    lowrank = eng_mod._LayerRule(r.qkv, r.o, eng_mod._OpRule(thresh=r.gu.thresh, expected=0.5, lowrank=(1, 2, 3)),
                                 r.down)
    assert pick((14.0, 4.0), topk_down) == pick((14.0, 4.0), two_nm) == pick((14.0, 4.0), lowrank) == (
        "gather", "gather")


@pytest.mark.parametrize("lists", [None, True, False])
def test_the_mlp_takes_downs_lists_where_they_are_fastest_or_forced(monkeypatch, lists):
    """`_mlp_raw` on the Triton kernels with measured times (stand-ins): at batch 1 the raw pair writing down's lists
    + down walking them ("pair-listing" + "gated-listed") where they beat the other ways (producer_lists None), and
    wherever they can run with True (the fused MLP still where they cannot: batch 2); never with False."""
    from actsparse.engine import engine as eng_mod

    eng = Engine.random(TINY, device="cpu", dtype=torch.float32, kernels="triton", max_batch=2, max_seq_len=16,
                        fallback_below=0.0, producer_lists=lists)
    eng.residual_fp32, eng.fallback_below = True, "measured"
    eng.set_thresholds({f"layers.{i}.{r}": 0.3 for i in range(TINY.n_layers)
                        for r in ("q", "k", "v", "o", "gate", "up", "down")})
    r, levels = eng.rules[0], (0.0, 1.0)

    def times(listed_ms, fused_ms):  # apart 15, pair + gated 12
        flat = {"oneshot": (10.0, 10.0)}
        return {"gu": OpTimes(99.0, levels, flat), "down": OpTimes(99.0, levels, {"oneshot": (5.0, 5.0)}),
                "qkv": OpTimes(99.0, levels, flat), "o": OpTimes(99.0, levels, flat),
                "pair": OpTimes(float("inf"), levels, {"gather": (8.0, 8.0)}),
                "gated": OpTimes(float("inf"), levels, {"gather": (4.0, 4.0)}),
                "mlp": OpTimes(float("inf"), levels, {"fused": (fused_ms, fused_ms)}),
                "pair-listing": OpTimes(float("inf"), levels, {"gather": (listed_ms - 3, listed_ms - 3)}),
                "gated-listed": OpTimes(float("inf"), levels, {"gather": (3.0, 3.0)})}

    def pick(listed_ms, fused_ms, b=1):
        monkeypatch.setattr(eng_mod, "op_times", lambda e, bb: times(listed_ms, fused_ms))
        return eng._mlp_raw(r, torch.zeros(b, TINY.hidden_size), b, None, None)
    fastest = {None: eng_mod.LISTED_MLP, True: eng_mod.LISTED_MLP, False: eng_mod.FUSED_MLP}[lists]
    assert pick(10.0, 11.0) == fastest  # lists 10 < fused 11 < pair + gated 12
    assert pick(13.0, 11.0) == {None: eng_mod.FUSED_MLP, True: eng_mod.LISTED_MLP, False: eng_mod.FUSED_MLP}[lists]
    assert pick(10.0, 11.0, b=2) == eng_mod.FUSED_MLP  # batch 2: no lists; True does not turn the fused MLP off
    assert pick(13.0, 20.0) == {None: ("gather", "gather"), True: eng_mod.LISTED_MLP,
                                False: ("gather", "gather")}[lists]


def test_engine_without_a_gpu_never_falls_back():
    eng = Engine.random(TINY, device="cpu", dtype=torch.float32, kernels="torch")
    assert eng.fallback_below == 0.0


def test_every_measured_launch_runs_and_the_choice_covers_each_op(monkeypatch):
    """The measurement's every launch (cuBLAS and each kernel per op: q|k|v, o (with its producer's lists too), gate|up,
    down, the raw pair and gated down (and at batch 1 the pair writing down's lists, down walking them), the fused
    MLP, CATS's gate alone and its up rows) runs (on the CPU: the interpreted kernels); only the
    clock is a stand-in here (CUDA graphs need a GPU; the GPU test below times them), counting each timed call."""
    from actsparse.engine import crossover

    timed = []
    monkeypatch.setattr(crossover, "graph_ms", lambda fn, reps=5, warmup=1: (fn(), timed.append(1), 1.0)[-1])
    monkeypatch.setattr(crossover, "LEVELS", LEVELS[::2])  # every launch, at half the levels (the interpreter)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels compile for the GPU where there is one
    eng = Engine.random(TINY, device=dev, dtype=torch.float32, kernels="triton", max_batch=1, max_seq_len=16,
                        fallback_below=0.0, residual_fp32=True)
    out = crossover.measure(eng, 1)
    assert set(out) == {"qkv", "o", "gu", "down", "pair", "gated", "mlp", "gate", "up", "pair-listing", "gated-listed"}
    assert set(out["mlp"].kernel_ms) == {"fused"}  # the whole MLP in two launches (sparse_mlp)
    assert "gather-listed" in out["o"].kernel_ms  # batch 1: o over the lists the attention kernel writes
    assert set(out["pair-listing"].kernel_ms) == set(out["gated-listed"].kernel_ms) == {"gather"}
    assert all(len(ts) == len(LEVELS[::2]) for t in out.values() for ts in t.kernel_ms.values())
    assert set(out["up"].kernel_ms) == {"walk", "oneshot", "rows"}  # batch 1: the kept-rows walk too
    assert out["gate"].choice(0.5) in {"dense", "oneshot", "gather"} and len(timed) > 50


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_measured_crossovers_are_levels_and_cached(batch):
    eng = Engine.random(TINY, device="cuda", dtype=torch.bfloat16, kernels="triton")
    assert eng.fallback_below == "measured"
    got = crossovers(eng, batch)
    assert set(got) == set(OPS)
    assert all(v == 0.0 or v == 1.0 or LEVELS[0] <= v <= LEVELS[-1] for v in got.values())
    times = op_times(eng, batch)
    assert op_times(eng, batch) is times  # measured once
    # o and down also add into the fp32 stream (the engine's default on a GPU), q|k|v writes raw fp32 sums
    assert eng.residual_fp32
    adding = {"accumulate", "gather-accumulate"} if batch <= 4 else {"accumulate"}
    assert all(set(times[op].kernel_ms) == {"oneshot", "gather"} | (adding if op != "gu" else set())
               and len(times[op].kernel_ms["gather"]) == len(LEVELS) for op in OPS)
    # gate|up's raw sums and down forming act(gate)·up from them, each on both kernels
    assert set(times["pair"].kernel_ms) == set(times["gated"].kernel_ms) == {"oneshot", "gather"}
    assert times["pair"].best(0.5)[0] in ("oneshot", "gather") and times["gated"].best(0.5)[1] > 0
    ups = {"walk", "oneshot", "rows"} if batch == 1 else {"walk", "oneshot"}  # the kept-rows walk: batch 1
    assert set(times["up"].kernel_ms) == ups and times["up"].choice(0.5) in ups
    assert set(times["mlp"].kernel_ms) == {"fused"} and times["mlp"].at("fused", 0.5) > 0
    calibrate_thresholds(eng, 0.5, n_tokens=4, batch=batch)
    assert eng.decode(None, 4, batch=batch) > 0
