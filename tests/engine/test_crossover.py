"""The engine's cuBLAS crossovers: the interpolation, the thresholds it measures at, and the measurement on a GPU."""

import pytest
import torch

from actsparse.engine import TINY, Engine
from actsparse.engine.crossover import LEVELS, OPS, crossing, crossovers, union_threshold
from benchmarks.engine_thresholds import calibrate_thresholds


def test_crossing_interpolates_where_the_speedup_reaches_one():
    assert crossing([(0.0, 0.6), (0.4, 0.8), (0.6, 1.2)]) == pytest.approx(0.5)
    assert crossing([(0.6, 1.2), (0.0, 0.6), (0.4, 0.8)]) == pytest.approx(0.5)  # any order
    assert crossing([(0.0, 1.05), (0.5, 2.0)]) == 0.0  # wins everywhere: never cuBLAS
    assert crossing([(0.0, 0.3), (0.85, 0.9)]) == 1.0  # never wins: always cuBLAS
    assert crossing([]) == 0.0


@pytest.mark.parametrize("s", [0.25, 0.5, 0.8])
def test_union_threshold_skips_that_fraction_of_the_batch_union(s):
    v = torch.randn(3, 1000)
    t = union_threshold(v, s)
    skipped = float((v.abs().amax(dim=0) <= t).float().mean())
    assert skipped == pytest.approx(s, abs=2e-3)
    assert not (v.abs() == t).any()  # no input sits on the threshold
    assert union_threshold(v, 0.0) == 0.0


def test_engine_without_a_gpu_never_falls_back():
    eng = Engine.random(TINY, device="cpu", dtype=torch.float32, kernels="torch")
    assert eng.fallback_below == 0.0


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
    assert crossovers(eng, batch) is got
    calibrate_thresholds(eng, 0.5, n_tokens=4, batch=batch)
    assert eng.decode(None, 4, batch=batch) > 0
