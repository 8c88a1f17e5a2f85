"""benchmarks/union_sparsity.py: the batch-union arithmetic against hand-computable cases, and one real run."""

import importlib.util
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("union_sparsity", ROOT / "benchmarks" / "union_sparsity.py")
us = importlib.util.module_from_spec(spec)
spec.loader.exec_module(us)


def test_batch_max_groups_windows_position_by_position():
    a = torch.rand(7, 5, 3)
    m = us.batch_max(a, 3)  # 7 windows -> 2 batches of 3 (the 7th is dropped)
    assert m.shape == (2, 5, 3)
    assert torch.equal(m[1], torch.maximum(torch.maximum(a[3], a[4]), a[5]))


def rows(calib, evals, params):
    return {(r["sparsity"], r["batch"]): r for r in us.measure(calib, evals, params)}


def test_independent_masks_give_target_to_the_power_of_the_batch():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    calib = {"a": torch.rand(64, 32, 256, generator=g)}
    evals = {"a": torch.rand(64, 32, 256, generator=g)}
    got = rows(calib, evals, {"a": 1})
    for (s, b), r in got.items():
        assert r["token_sparsity"] == pytest.approx(s, abs=0.01)
        assert r["rows_skipped"] == pytest.approx(s ** b, abs=0.01)
        assert r["independent"] == pytest.approx(s ** b)
        # union calibration to s: each token must be below the threshold with probability s^(1/b)
        assert r["union_calibrated_token_sparsity"] == pytest.approx(s ** (1 / b), abs=0.02)


def test_identical_tokens_share_their_masks_and_sites_weigh_by_parameters():
    base = torch.rand(1, 16, 128)
    same = base.expand(32, 16, 128).clone()  # every window identical: the union is the token mask
    zero = torch.zeros(32, 16, 64)  # a site whose inputs are all zero: every row skipped at any batch
    got = rows({"a": same, "z": zero}, {"a": same, "z": zero}, {"a": 3, "z": 1})
    for (s, b), r in got.items():
        assert r["rows_skipped"] == pytest.approx(0.75 * s + 0.25, abs=0.02)
        assert r["token_sparsity"] == pytest.approx(r["rows_skipped"], abs=1e-6)


def test_recorded_inputs_of_a_bundled_model():
    from actsparse.models.load import load_model

    model, tok = load_model("tiny-llama", dtype="float32", device="cpu")
    acts, params = us.record_inputs(model, tok, "bundled:eval", 512, 64)
    assert len(acts) == 6 * 7 and set(acts) == set(params)
    q, down = acts["layers.0.q"], acts["layers.0.down"]
    assert q.shape == (8, 64, 256) and down.shape == (8, 64, 512) and (q >= 0).all()  # |input|, 8 windows of 64
    assert params["layers.0.q"] == 256 * 256 and params["layers.0.down"] == 512 * 256
