"""The masked walk's producer/consumer options and packed weights, against the torch references, outputs poisoned:
thresh=None (the input arrives already selected, e.g. from a producer's out_thresh), out_thresh/out_shift (the
output selected for the next GEMV) and weights packed in column strips (`pack_weight`)."""

import pytest
import torch

from actsparse.kernels import (MaskedConfig, override_config, pack_weight, poison_outputs, ref, sparse_gated_mlp,
                               sparse_gemv)
from actsparse.kernels.configs import choose_impl

from .checks import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
CFGS = {"split": MaskedConfig(block_n=16, block_k=16, split_k=3), "whole": MaskedConfig(block_n=32, block_k=64, split_k=1),
        "dot": MaskedConfig(block_n=32, block_k=32, use_dot=True, num_stages=2, split_k=2)}


def run(fn, *args, cfg="split", **kw):
    with override_config(CFGS[cfg]), poison_outputs():
        return fn(*args, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cfg", list(CFGS))
def test_preselected_input_and_selected_output(cfg, batch, dtype):
    k, n = 96, 80
    x = ref.sparsify_ref(torch.randn(batch, k, device=DEVICE, dtype=dtype), 0.8)  # already selected: ~58% zeros
    wt = (torch.randn(k, n, device=DEVICE) / k**0.5).to(dtype)
    kw = dict(bias=torch.randn(n, device=DEVICE), residual=torch.randn(batch, n, device=DEVICE, dtype=dtype),
              out_thresh=torch.rand(n, device=DEVICE) * 2, out_shift=torch.randn(n, device=DEVICE) * 0.1)
    y = run(sparse_gemv, x, wt, None, cfg=cfg, **kw)
    want = ref.sparse_gemv_ref(x, wt, None, **kw)
    assert rel_err(y, want) < TOL[dtype]
    # The output selection zeroes exactly the entries whose |y − m| is at most the threshold (in fp32, where
    # kernel and reference agree to the last bits; fp16 inputs round differently near the threshold).
    assert 0.05 < (want == 0).float().mean() < 0.95  # |y − m| has std ≈ 1.5: about 40% fall under U(0, 2)
    if dtype == torch.float32:
        assert torch.equal(y == 0, want == 0)
    # A scalar output threshold broadcasts over the columns.
    y = run(sparse_gemv, x, wt, None, cfg=cfg, out_thresh=torch.tensor([0.3], device=DEVICE))
    assert rel_err(y, ref.sparse_gemv_ref(x, wt, None, out_thresh=0.3)) < TOL[dtype]


@pytest.mark.parametrize("batch", [1, 4])
def test_gated_mlp_selects_h_for_down_and_down_reads_it_as_is(batch):
    """The engine's flow: gate|up writes h⊙1[|h| > t_down]; down with thresh=None equals down with t_down on h."""
    k, inter, d = 64, 96, 48
    x = torch.randn(batch, k, device=DEVICE) * 2
    g = torch.rand(k, device=DEVICE) + 0.5
    wg, wu = torch.randn(k, inter, device=DEVICE) / 8, torch.randn(k, inter, device=DEVICE) / 8
    wd = torch.randn(inter, d, device=DEVICE) / inter**0.5
    thresh = torch.tensor([0.4, 0.6], device=DEVICE)
    h_full = ref.sparse_gated_mlp_ref(x, wg, wu, thresh, norm_weight=g)
    # Midway between two neighbouring |h| values: no entry sits at the threshold, where the kernel's and the
    # reference's last-bit rounding could disagree about it.
    u = h_full.abs().flatten().sort().values
    i = int(0.6 * u.numel())
    t_down = float((u[i - 1] + u[i]) / 2)
    kw = dict(norm_weight=g, out_thresh=torch.tensor([t_down], device=DEVICE))
    h_s = run(sparse_gated_mlp, x, wg, wu, thresh, **kw)
    assert rel_err(h_s, ref.sparse_gated_mlp_ref(x, wg, wu, thresh, **kw)) < 1e-5
    y = run(sparse_gemv, h_s, wd, None, residual=x[:, :d])
    assert rel_err(y, ref.sparse_gemv_ref(h_full, wd, t_down, residual=x[:, :d])) < 1e-5
    # A preselected pair input: gate and up both read x as is.
    xs = ref.sparsify_ref(x, 1.0)
    assert rel_err(run(sparse_gated_mlp, xs, wg, wu, None),
                   ref.sparse_gated_mlp_ref(xs, wg, wu, None)) < 1e-5


@pytest.mark.parametrize("width", [16, 32, 64])
def test_packed_weights_match_the_row_major_ones(width):
    k, nq, nkv = 72, 64, 32
    n = nq + 2 * nkv
    x = torch.randn(2, k, device=DEVICE)
    wt = torch.randn(k, n, device=DEVICE) / k**0.5
    packed = pack_weight(wt, width)
    assert packed.shape == (n // width, k, width) and torch.equal(packed[1, 5], wt[5, width:2 * width])
    kw = dict(norm_weight=torch.rand(k, device=DEVICE) + 0.5, segments=(nq, nq + nkv), bias=torch.randn(n, device=DEVICE))
    thresh = torch.rand(3, k, device=DEVICE)
    for cfg in CFGS:
        y = run(sparse_gemv, x, packed, thresh, cfg=cfg, **kw)
        assert y.shape == (2, n)
        assert rel_err(y, ref.sparse_gemv_ref(x, wt, thresh, **kw)) < 1e-5
    wg, wu = torch.randn(k, n, device=DEVICE) / 8, torch.randn(k, n, device=DEVICE) / 8
    t2 = torch.tensor([0.3, 0.5], device=DEVICE)
    h = run(sparse_gated_mlp, x, pack_weight(wg, width), pack_weight(wu, width), t2)
    assert rel_err(h, ref.sparse_gated_mlp_ref(x, wg, wu, t2)) < 1e-5


def test_bad_arguments_are_rejected():
    x = torch.randn(1, 32, device=DEVICE)
    wt = torch.randn(32, 64, device=DEVICE)
    t = torch.zeros(1, device=DEVICE)
    with pytest.raises(ValueError, match="thresh=None means x is already selected.*shift, norm_weight"):
        sparse_gemv(x, wt, None, shift=torch.zeros(1, 32, device=DEVICE), norm_weight=torch.ones(32, device=DEVICE))
    with pytest.raises(ValueError, match="thresh=None means x is already selected.*nm"):
        sparse_gated_mlp(x, wt, wt, None, nm=(2, 4))
    with pytest.raises(ValueError, match="out_shift needs out_thresh"):
        sparse_gemv(x, wt, t, out_shift=torch.zeros(64, device=DEVICE))
    with pytest.raises(ValueError, match=r"out_thresh must have shape \[1\] or \[1, 64\]"):
        sparse_gemv(x, wt, t, out_thresh=torch.zeros(5, device=DEVICE))
    with pytest.raises(ValueError, match="out_thresh must be float32"):
        sparse_gemv(x, wt, t, out_thresh=torch.zeros(64, device=DEVICE, dtype=torch.float64))
    with pytest.raises(ValueError, match="the gather kernel cannot take an already-selected input"):
        sparse_gemv(x, wt, None, impl="gather")
    with pytest.raises(ValueError, match="the gather kernel cannot .* select its output"):
        sparse_gemv(x, wt, t, out_thresh=t, impl="gather")
    with pytest.raises(ValueError, match="the gather kernel reads \\[K, N\\] weights, not packed ones"):
        sparse_gemv(x, pack_weight(wt, 16), t, impl="gather")
    # auto never picks a kernel that cannot serve the call
    assert choose_impl("gemv", 32, 64, 1, presel=True)[0] == "masked"
    assert choose_impl("gemv", 32, 64, 1, out_sel=True)[0] == "masked"
    assert choose_impl("gemv", 32, 64, 1, packed=True)[0] == "masked"
    with pytest.raises(ValueError, match="width must be a power of two ≥ 16 dividing out_features=64"):
        pack_weight(wt, 24)
    with pytest.raises(ValueError, match="width must be a power of two ≥ 16 dividing out_features=48"):
        pack_weight(torch.randn(32, 48, device=DEVICE), 32)
    with pytest.raises(ValueError, match="a packed wt must be contiguous"):
        sparse_gemv(x, pack_weight(wt, 16).transpose(0, 1), t)
    with pytest.raises(ValueError, match="override_config takes a MaskedConfig, a GatherConfig or a OneshotConfig"):
        with override_config("masked"):
            pass
