"""Calibration statistics against independent computations on the same activations."""
import numpy as np
import pytest
import torch

import actsparse as asp
from actsparse.calibration.stats import ProbeCollector
from actsparse.models import hook_points


def _capture(model, tok, data, tokens, seq_len):
    """Every probe's activations, captured with our own hooks (independent of the collector)."""
    from actsparse.data.text import token_stream, token_windows

    acts, hooks = {}, []
    for name, (mod, where) in hook_points(model).items():
        if name.endswith(".mlp"):
            continue
        if where == "input":
            hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: acts.setdefault(n, []).append(a[0].detach())))
        else:
            hooks.append(mod.register_forward_hook(lambda m, a, o, n=name: acts.setdefault(n, []).append(o.detach())))
    windows = token_windows(token_stream(tok, asp.text_data(data), tokens), seq_len)
    with torch.no_grad():
        for i in range(0, len(windows), 4):
            model(windows[i:i + 4], use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) for n, v in acts.items()}


def test_stats_match_numpy_when_sample_holds_everything(tiny, text_file):
    model, tok = tiny
    stats = asp.calibrate(model, tok, str(text_file), tokens=1024, seq_len=128, sample_size=1 << 20, progress=False)
    acts = _capture(model, tok, str(text_file), 1024, 128)
    assert set(acts) == set(stats.probes)
    for name, x in acts.items():
        ps = stats[name]
        xn = x.double().numpy()
        assert ps.n == xn.size and ps.n_tokens == xn.shape[0]
        np.testing.assert_allclose(np.sort(ps.sample.numpy()), np.sort(xn.ravel().astype(np.float32)))
        for q in (0.1, 0.5, 0.83):
            assert ps.abs_quantile(q) == pytest.approx(np.quantile(np.abs(xn), q), rel=1e-5, abs=1e-7)
        np.testing.assert_allclose(ps.ch_mean.numpy(), xn.mean(0), rtol=1e-5, atol=1e-6)  # float32 batch sums
        np.testing.assert_allclose(ps.ch_abs_mean.numpy(), np.abs(xn).mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ps.ch_l2.numpy(), np.sqrt((xn ** 2).sum(0)), rtol=1e-5)
        # the streaming histogram's quantile is within one bin (0.01 decade) of the exact one
        exact = np.quantile(np.abs(xn), 0.5)
        assert abs(np.log10(ps.hist_abs_quantile(0.5)) - np.log10(exact)) <= 0.011


def test_bounded_sample_is_uniform_without_replacement():
    gen_vals = torch.randperm(200_000).float()  # distinct values: duplicates would show replacement
    col = ProbeCollector(sample_size=4096, seed=int(torch.randint(0, 10**6, (1,))))
    for chunk in gen_vals.split(7_777):
        col.update(chunk.view(-1, 1))
    s = col.result().sample
    assert s.numel() == 4096 and s.unique().numel() == 4096
    # uniform over 0..199999: mean 1e5 (sd of the mean ~ 57735/sqrt(4096) = 902), deciles close
    assert abs(float(s.mean()) - 99_999.5) < 5 * 902
    for q in (0.1, 0.5, 0.9):
        assert abs(float(torch.quantile(s, q)) - q * 200_000) < 0.03 * 200_000


def test_inter_probe_aliases_down_input(tiny, text_file):
    model, tok = tiny
    stats = asp.calibrate(model, tok, str(text_file), tokens=512, seq_len=128, progress=False)
    assert stats["layers.1.inter"] is stats["layers.1.down"]
    assert "layers.0.gate_act" in stats and "layers.0.up_out" in stats


def test_stats_save_load_roundtrip_and_corruption(tiny, text_file, tmp_path):
    model, tok = tiny
    stats = asp.calibrate(model, tok, str(text_file), tokens=512, seq_len=128, progress=False)
    stats.save(tmp_path / "s")
    back = asp.Stats.load(tmp_path / "s")
    assert back.key == stats.key and torch.equal(back.tokens, stats.tokens)
    assert torch.equal(back["layers.0.q"].sample, stats["layers.0.q"].sample)
    with open(tmp_path / "s" / "tensors.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(asp.ActsparseError, match="corrupt"):
        asp.Stats.load(tmp_path / "s")


def test_stats_key_depends_on_data_and_params(tiny, text_file, tmp_path):
    model, tok = tiny
    a = asp.calibrate(model, tok, str(text_file), tokens=512, seq_len=128, progress=False)
    b = asp.calibrate(model, tok, str(text_file), tokens=512, seq_len=128, progress=False)
    c = asp.calibrate(model, tok, str(text_file), tokens=512, seq_len=64, progress=False)
    assert a.key == b.key != c.key


def test_calibrate_rejects_bad_arguments(tiny, text_file):
    model, tok = tiny
    with pytest.raises(asp.ActsparseError, match="at least seq_len"):
        asp.calibrate(model, tok, str(text_file), tokens=100, seq_len=128)
    with pytest.raises(asp.ActsparseError, match="unknown probes"):
        asp.calibrate(model, tok, str(text_file), tokens=256, seq_len=128, probes=["layers.9.q"])


def test_calibration_is_deterministic_and_aliases_only_shared_inputs():
    import actsparse as asp

    model, tok = asp.load_model("tiny-llama")
    a = asp.calibrate(model, tok, "bundled:calib", tokens=1024, seq_len=256, progress=False)
    b = asp.calibrate(model, tok, "bundled:calib", tokens=1024, seq_len=256, progress=False)
    for name in a.probes:
        assert torch.equal(a[name].sample, b[name].sample), name
    for i in range(6):  # q/k/v read one tensor, gate/up another; nothing crosses layers or roles
        assert a[f"layers.{i}.q"] is a[f"layers.{i}.k"] is a[f"layers.{i}.v"]
        assert a[f"layers.{i}.gate"] is a[f"layers.{i}.up"]
        assert a[f"layers.{i}.o"] is not a[f"layers.{i}.q"]
        if i:
            assert a[f"layers.{i}.q"] is not a[f"layers.{i - 1}.q"]
            assert a[f"layers.{i}.down"] is not a[f"layers.{i - 1}.down"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_abs_thresholds_match_numpy_in_every_dtype(dtype):
    """The calibrator sorts narrow inputs in float32: its answers equal numpy's float64 linear quantile."""
    from actsparse.calibration.quantile import AbsThresholds

    v = (torch.randn(997, 13) * torch.rand(13) * 3).to(dtype)
    ref = np.abs(v.double().numpy()).ravel()
    q = AbsThresholds(v, device="cpu")
    for p in [0.0, 0.013, 0.25, 0.5, 0.77, 0.999, 1.0]:
        want = 0.0 if p == 0.0 else float(np.quantile(ref, p))
        assert q(p) == pytest.approx(want, rel=1e-12, abs=0)


@pytest.mark.parametrize("n", [1, 2, 10, 1001, 4096])
def test_quantile_ranks_are_numpys_linear_and_nearest_and_the_kth_smallest(n):
    from actsparse.calibration.quantile import quantile

    v = torch.randn(n, dtype=torch.float64)
    s = np.sort(v.numpy())
    for q in [0.0, 0.1, 0.25, 0.5, 0.55, 0.75, 0.9, 1.0]:
        assert quantile(v, q) == pytest.approx(float(np.quantile(s, q)), rel=1e-12, abs=1e-300)
        assert quantile(v, q, "nearest") == float(np.quantile(s, q, method="nearest"))
        k = min(max(int(q * n), 1), n)
        assert quantile(v, q, "kth") == float(s[k - 1])
        if 0 < q and k == int(q * n):   # zeroes exactly k values with keep |x| > t: never more than q
            assert (v <= quantile(v, q, "kth")).sum() == k
    with pytest.raises(asp.ActsparseError, match="rank"):
        quantile(v, 0.5, "midpoint")
    with pytest.raises(asp.ActsparseError, match="empty"):
        quantile(v[:0], 0.5)
