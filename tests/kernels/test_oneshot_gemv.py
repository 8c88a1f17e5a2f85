"""The one-shot tiles (one program per weight tile, fp32 atomic sums, the last program of a strip runs the
epilogue) against the torch references, fresh random inputs, outputs poisoned."""

import pytest
import torch

from actsparse.kernels import (GatherConfig, OneshotConfig, configs, override_config, poison_outputs, ref,
                               sparse_gemv)
from actsparse.kernels.configs import choose_impl

from .checks import (check_fused_qkv, check_gated_mlp, check_gelu_tanh, check_nm_and_nothing_kept, quantile_thresh,
                     rel_err)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Ragged shapes cut into several strips and several K tiles; a wide tile on the second.
CFGS = {"small": OneshotConfig(block_n=16, block_k=16), "wide": OneshotConfig(block_n=64, block_k=32, num_warps=4)}
# Adding into a given tensor (accumulate=, out=, gated=) runs on the one-shot tiles or the gather walk; the walk's
# "sliced" config splits K (partials meet by atomics), its "whole" one gives each program all of K (it owns its
# output elements: a plain store, or read-add-store); "fused" variants write the lists inside the walk's launch
# (the zeroing of a sliced tensor included).
ACC_CFGS = {"oneshot": CFGS, "gather": {"sliced": GatherConfig(block_n=16, seg_k=32, block_k=16),
                                        "whole": GatherConfig(block_n=32, seg_k=128, block_k=32, depth=2),
                                        "sliced-fused": GatherConfig(block_n=16, seg_k=32, block_k=16, fused=True),
                                        "whole-fused": GatherConfig(block_n=32, seg_k=128, block_k=32, depth=2,
                                                                    fused=True)}}


def run(fn, *args, cfg="small", **kw):
    with override_config(CFGS[cfg]), poison_outputs():
        return fn(*args, impl="oneshot", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.95])
def test_gemv_matches_reference(dtype, batch, sparsity):
    k, n = 100, 70  # ragged in K and N
    x = torch.randn(batch, k, device=DEVICE, dtype=dtype)
    wt = (torch.randn(k, n, device=DEVICE) / k**0.5).to(dtype)
    t = quantile_thresh(x, sparsity)
    res = torch.randn(batch, n, device=DEVICE, dtype=dtype)
    for cfg in CFGS:
        y = run(sparse_gemv, x, wt, torch.tensor([t], device=DEVICE), residual=res, act="silu", cfg=cfg)
        assert y.shape == (batch, n) and y.dtype == dtype
        assert rel_err(y, ref.sparse_gemv_ref(x, wt, t, residual=res, act="silu")) < TOL[dtype]


@pytest.mark.parametrize("batch", [1, 16])
def test_fused_qkv_norm_shift_bias_match_reference(batch):
    check_fused_qkv(run, CFGS, batch, DEVICE)


@pytest.mark.parametrize("batch", [1, 2])
def test_gated_mlp_matches_reference(batch):
    check_gated_mlp(run, CFGS, batch, 0.6, DEVICE)


@pytest.mark.parametrize("batch", [1, 16])
def test_gelu_tanh_epilogue_matches_the_formula(batch):
    check_gelu_tanh(run, CFGS, batch, DEVICE)


def test_nm_selection_and_all_skipped():
    """Every channel skipped: no tile adds anything."""
    check_nm_and_nothing_kept(run, DEVICE)


def test_repeated_launches_leave_accumulators_and_counters_zero():
    """The last program of a strip zeroes its sums and resets its counter: launches of different shapes in a
    row (the same device buffers) stay correct, and the buffers are zero between launches."""
    for k, n, b in ((96, 64, 1), (64, 48, 2), (96, 64, 1)):
        x = torch.randn(b, k, device=DEVICE)
        wt = torch.randn(k, n, device=DEVICE) / 10
        y = run(sparse_gemv, x, wt, torch.tensor([0.5], device=DEVICE))
        assert rel_err(y, ref.sparse_gemv_ref(x, wt, 0.5)) < 1e-5
        assert not configs.atomic_accumulator(x.device).any()
        assert not configs.tile_counters(x.device).any()


def test_what_oneshot_cannot_run_is_refused():
    x = torch.randn(17, 32, device=DEVICE)
    wt = torch.randn(32, 16, device=DEVICE)
    with pytest.raises(ValueError, match="the oneshot kernel runs batches of at most 16 rows, got 17"):
        sparse_gemv(x, wt, torch.zeros(1, device=DEVICE), impl="oneshot")
    with pytest.raises(ValueError, match=r"the oneshot kernel cannot take an already-selected input \(thresh=None\)"):
        sparse_gemv(x[:1], wt, None, impl="oneshot")
    with pytest.raises(ValueError, match="the oneshot kernel reads \\[K, N\\] weights, not packed ones"):
        sparse_gemv(x[:1], torch.randn(1, 32, 16, device=DEVICE), torch.zeros(1, device=DEVICE), impl="oneshot")
    with override_config(OneshotConfig(block_n=8, block_k=8)), pytest.raises(ValueError, match="tensor cores"):
        sparse_gemv(x[:2], wt, torch.zeros(1, device=DEVICE), impl="oneshot")


def test_auto_follows_the_measured_preference(monkeypatch):
    """impl="auto": the op's measured kernel where it can run, else gather, else masked."""
    key = ("gemv", 32, 16, 1)
    assert choose_impl("gemv", 32, 16, 1)[0] == "gather"
    monkeypatch.setitem(configs.PREFERRED, key, "oneshot")
    assert choose_impl("gemv", 32, 16, 1) == ("oneshot", OneshotConfig())
    assert choose_impl("gemv", 32, 16, 1, presel=True)[0] == "masked"
    with override_config(CFGS["wide"]):
        assert choose_impl("gemv", 32, 16, 8) == ("oneshot", CFGS["wide"])  # the override's kernel first
        assert choose_impl("gemv", 32, 16, 20)[0] == "masked"  # ... where it can run
    x = torch.randn(1, 32, device=DEVICE)
    wt = torch.randn(32, 16, device=DEVICE)
    y = sparse_gemv(x, wt, torch.tensor([0.3], device=DEVICE))  # runs the preferred one-shot tiles
    assert rel_err(y, ref.sparse_gemv_ref(x, wt, 0.3)) < 1e-5


@pytest.mark.parametrize("impl", ["oneshot", "gather"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_accumulate_adds_into_the_given_fp32_tensor(batch, dtype, impl):
    """accumulate=h: h ← h + W·x_s + bias in place (RMSNorm and q/k/v segments too), the same h returned; a tile
    with nothing kept adds nothing, the bias still lands once; the shared accumulators stay untouched."""
    k, n = 100, 96
    x = torch.randn(batch, k, device=DEVICE, dtype=dtype)
    wt = (torch.randn(k, n, device=DEVICE) / k**0.5).to(dtype)
    g = (1 + 0.1 * torch.randn(k, device=DEVICE)).to(dtype)
    bias = torch.randn(n, device=DEVICE, dtype=dtype)
    t = torch.rand(3, k, device=DEVICE) * 0.8
    for cfg in ACC_CFGS[impl].values():
        h = torch.randn(batch, n, device=DEVICE)
        want = h.double() + ref.sparse_gemv_ref(x, wt, t, bias=bias, norm_weight=g, segments=(32, 64)).double()
        with override_config(cfg):
            got = sparse_gemv(x, wt, t, bias=bias, norm_weight=g, segments=(32, 64), accumulate=h, impl=impl)
        assert got is h and h.dtype == torch.float32
        assert rel_err(h, want) < TOL[dtype]
        assert not configs.atomic_accumulator(x.device).any() and not configs.tile_counters(x.device).any()
        h = torch.randn(batch, n, device=DEVICE)
        want = h + bias.float()
        with override_config(cfg):  # nothing kept
            sparse_gemv(x, wt, torch.full((1,), 1e9, device=DEVICE), bias=bias, accumulate=h, impl=impl)
        assert torch.equal(h, want)


def test_accumulate_refuses_what_it_cannot_take():
    x = torch.randn(2, 32, device=DEVICE)
    wt = torch.randn(32, 16, device=DEVICE)
    t = torch.zeros(1, device=DEVICE)
    h = torch.zeros(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"accumulate must be a float32 \[2, 16\] tensor"):
        sparse_gemv(x, wt, t, accumulate=h.half())
    with pytest.raises(ValueError, match=r"accumulate must be a float32 \[2, 16\] tensor"):
        sparse_gemv(x, wt, t, accumulate=torch.zeros(1, 16, device=DEVICE))
    with pytest.raises(ValueError, match=r"accumulate must be a float32 \[2, 16\] tensor .* strides"):
        sparse_gemv(x, wt, t, accumulate=torch.zeros(16, 2, device=DEVICE).t())
    with pytest.raises(ValueError, match="cannot take act, residual"):
        sparse_gemv(x, wt, t, act="silu", residual=h, accumulate=h)
    with pytest.raises(ValueError, match="cannot take thresh=None"):
        sparse_gemv(x, wt, None, accumulate=h)
    with pytest.raises(ValueError, match="the masked kernel cannot add into a given fp32 tensor .* impl='oneshot'"):
        sparse_gemv(x, wt, t, impl="masked", accumulate=h)
    with pytest.raises(ValueError, match="the oneshot kernel runs batches of at most 16 rows"):
        sparse_gemv(torch.randn(17, 32, device=DEVICE), wt, t, accumulate=torch.zeros(17, 16, device=DEVICE))
    with pytest.raises(ValueError, match="the gather kernel runs batches of at most 4 rows"):
        sparse_gemv(torch.randn(5, 32, device=DEVICE), wt, t, impl="gather", accumulate=torch.zeros(5, 16,
                                                                                                  device=DEVICE))


@pytest.mark.parametrize("batch", [1, 2])
def test_pair_accumulates_both_raw_sums(batch):
    """A gate/up pair into a [2, B, N] fp32 tensor: the raw sums W_g·x_s (+ b_g) and W_u·x_s (+ b_u), no act."""
    from actsparse.kernels.oneshot_gemv import launch_oneshot

    k, n = 80, 48
    x = torch.randn(batch, k, device=DEVICE)
    wg, wu = (torch.randn(k, n, device=DEVICE) / k**0.5 for _ in range(2))
    g = 1 + 0.1 * torch.randn(k, device=DEVICE)
    bias = torch.randn(2, n, device=DEVICE)
    t = torch.rand(2, k, device=DEVICE)
    acc = torch.randn(2, batch, n, device=DEVICE)
    want = [acc[j].double() + ref.sparse_gemv_ref(x, w, t[j:j + 1], bias=bias[j], norm_weight=g).double()
            for j, w in enumerate((wg, wu))]
    got = launch_oneshot(x, wg, wu, t, None, bias, None, g, 1e-6, 0, [], 0, 0, CFGS["small"], accumulate=acc)
    assert got is acc
    assert rel_err(acc[0], want[0]) < 1e-5 and rel_err(acc[1], want[1]) < 1e-5


@pytest.mark.parametrize("impl", ["oneshot", "gather"])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_out_receives_the_raw_fp32_sums_whatever_it_held(batch, norm, impl):
    """out=: W·x_s + bias in fp32 (q/k/v segments, RMSNorm fused or not), the tensor zeroed first (NaN before:
    every element written), twice in a row (the second launch does not add onto the first)."""
    k, n = 100, 96
    x = torch.randn(batch, k, device=DEVICE, dtype=torch.float16)
    wt = (torch.randn(k, n, device=DEVICE) / k**0.5).half()
    g = (1 + 0.1 * torch.randn(k, device=DEVICE)).half() if norm else None
    bias = torch.randn(n, device=DEVICE, dtype=torch.float16)
    t = torch.rand(3, k, device=DEVICE) * 0.8
    want = ref.sparse_gemv_ref(x, wt.float(), t, bias=bias.float(), norm_weight=g, segments=(32, 64))
    for cfg in ACC_CFGS[impl].values():
        buf = torch.full((batch, n), float("nan"), device=DEVICE)
        for _ in range(2):
            with override_config(cfg):
                got = sparse_gemv(x, wt, t, bias=bias, norm_weight=g, segments=(32, 64), out=buf, impl=impl)
            assert got is buf and rel_err(buf, want) < 2e-3
    t1 = t[0, :1]
    with pytest.raises(ValueError, match="give out= .* or accumulate= .*, not both"):
        sparse_gemv(x, wt, t1, out=buf, accumulate=buf)
    if batch > 1:  # a one-row view is contiguous whatever its row stride
        with pytest.raises(ValueError, match="out must be contiguous"):
            sparse_gemv(x, wt, t1, out=torch.zeros(batch, 2 * n, device=DEVICE)[:, :n])
    with pytest.raises(ValueError, match="out= takes the raw sum .* cannot take act"):
        sparse_gemv(x, wt, t1, act="silu", out=buf)


@pytest.mark.parametrize("impl", ["oneshot", "gather"])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("batch", [1, 2])
def test_pair_raw_sums_then_down_forms_act_gate_times_up(batch, act, impl):
    """sparse_gated_mlp(out=): both raw sums (+ biases) in fp32, whatever the tensor held; sparse_gemv(gated=act)
    on them: down(x_s) with x = act(gate)·up formed in the prologue, thresholded, added into the stream. Together:
    the fused gate/up + down of the references, in fp32."""
    from actsparse.kernels import sparse_gated_mlp

    k, i, n = 64, 80, 48
    x = torch.randn(batch, k, device=DEVICE)
    wg, wu = (torch.randn(k, i, device=DEVICE) / k**0.5 for _ in range(2))
    wd = torch.randn(i, n, device=DEVICE) / i**0.5
    g = 1 + 0.1 * torch.randn(k, device=DEVICE)
    bias = torch.randn(2, i, device=DEVICE)
    t = torch.rand(2, k, device=DEVICE) * 0.8
    h = ref.sparse_gated_mlp_ref(x, wg, wu, t, bias=bias, norm_weight=g, act=act)
    u = h.abs().amax(0).sort().values
    td = ((u[i // 2 - 1] + u[i // 2]) / 2).reshape(1)  # midway between two values: no input sits on it
    for cfg in ACC_CFGS[impl].values():
        sums = torch.full((2, batch, i), float("nan"), device=DEVICE)
        with override_config(cfg):
            got = sparse_gated_mlp(x, wg, wu, t, bias=bias, norm_weight=g, out=sums, impl=impl)
        assert got is sums
        for j, w in enumerate((wg, wu)):
            want = ref.sparse_gemv_ref(x, w, t[j:j + 1], bias=bias[j], norm_weight=g)
            assert rel_err(sums[j], want) < 1e-5
        stream = torch.randn(batch, n, device=DEVICE)
        want = stream + ref.sparse_gemv_ref(h, wd, td)
        with override_config(cfg):
            out = sparse_gemv(sums, wd, td, gated=act, accumulate=stream, impl=impl)
        assert out is stream and rel_err(stream, want) < 1e-5


def test_raw_pair_sums_and_gated_input_refuse_what_they_cannot_take():
    from actsparse.kernels import sparse_gated_mlp

    x = torch.randn(1, 32, device=DEVICE)
    w = torch.randn(32, 16, device=DEVICE)
    t = torch.zeros(2, device=DEVICE)
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 \[2, 1, 16\]"):
        sparse_gated_mlp(x, w, w, t, out=torch.zeros(1, 16, device=DEVICE))
    with pytest.raises(ValueError, match="the masked kernel cannot .* raw sums"):
        sparse_gated_mlp(x, w, w, t, impl="masked", out=torch.zeros(2, 1, 16, device=DEVICE))
    sums = torch.zeros(2, 1, 32, device=DEVICE)
    wd = torch.randn(32, 8, device=DEVICE)
    h = torch.zeros(1, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must be a contiguous float32 \[2, B, K\]"):
        sparse_gemv(x, wd, t[:1], gated="silu", accumulate=h)
    with pytest.raises(ValueError, match="takes no norm_weight and needs accumulate= or out="):
        sparse_gemv(sums, wd, t[:1], gated="silu")
    with pytest.raises(ValueError, match="gated must be 'none', 'silu' or 'gelu_tanh'"):
        sparse_gemv(sums, wd, t[:1], gated="relu", accumulate=h)
