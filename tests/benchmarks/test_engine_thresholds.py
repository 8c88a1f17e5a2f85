"""benchmarks/engine_thresholds.py: the decode benchmark's thresholds from the engine's own activations."""

import pytest
import torch

from actsparse.engine import TINY, Engine
from benchmarks.engine_thresholds import calibrate_thresholds, measure_sparsity, record
from tests.engine.test_engine import _hf_tiny


@pytest.mark.parametrize("union", [False, True])
def test_thresholds_are_the_kth_smallest_input_magnitude(union):
    eng = Engine.random(TINY, device="cpu", dtype=torch.float32, kernels="torch", max_batch=2, max_seq_len=16,
                        seed=int(torch.randint(0, 2**31, ())))
    th = calibrate_thresholds(eng, 0.3, n_tokens=5, batch=2, union=union)
    a = record(eng, 5, 2, 0, sparse=False)["layers.1.gu"].abs()  # [T, B, K]
    v = (a.amax(dim=1) if union else a).flatten()
    k = int(0.3 * v.numel())
    assert th["layers.1.up"] == float(v.sort().values[k - 1])
    assert int((v <= th["layers.1.up"]).sum()) == k  # zeroes exactly floor(target * n) of the calibration inputs


def test_calibrated_sparsity_is_measured_close_to_target():
    model = _hf_tiny(seed=7)
    eng = Engine.from_hf(model, kernels="torch", max_batch=2, max_seq_len=64)
    calibrate_thresholds(eng, 0.5, n_tokens=32)
    m = measure_sparsity(eng, n_tokens=16, batch=1)
    for role in ("q", "o", "gate", "down"):
        assert 0.35 < m[role] < 0.65, m
    calibrate_thresholds(eng, 0.5, n_tokens=16, batch=2, union=True)
    mu = measure_sparsity(eng, n_tokens=16, batch=2)
    assert 0.3 < mu["union"] < 0.7 and mu["mean"] > mu["union"], mu


def test_a_target_of_one_is_rejected():
    eng = Engine.random(TINY, device="cpu", dtype=torch.float32, kernels="torch", max_batch=1, max_seq_len=8)
    with pytest.raises(ValueError, match="target sparsity"):
        calibrate_thresholds(eng, 1.0)
