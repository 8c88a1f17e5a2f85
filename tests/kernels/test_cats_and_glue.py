"""cats_up (output-sparse up rows), rmsnorm, add_rmsnorm, add_normed and silu_mul against the torch references."""

import pytest
import torch

from actsparse.kernels import MaskedConfig, add_normed, add_rmsnorm, cats_up, override_config, poison_outputs, rmsnorm, silu_mul
from actsparse.kernels import ref

from .checks import gelu_tanh, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _zeros_where_off(h, a, t) -> bool:
    """h is exactly 0 wherever the mask is off (|a| ≤ t: the down GEMV skips those rows); where it is on, a value
    may still round to 0 in a 16-bit dtype, which the reference's own rounding need not repeat."""
    off = a.float().abs() <= torch.as_tensor(t, dtype=torch.float32, device=a.device)
    return bool((h[off] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("use_dot", [True, False])
@pytest.mark.parametrize("split_k", [1, 2])
def test_cats_up_matches_reference(dtype, batch, sparsity, use_dot, split_k):
    k, n = 64, 72
    x = torch.randn(batch, k, device=DEVICE, dtype=dtype)
    w_up = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    a = torch.nn.functional.silu(torch.randn(batch, n, device=DEVICE)).to(dtype)
    g = (torch.rand(k, device=DEVICE) + 0.5).to(dtype)
    t = float(torch.quantile(a.abs().float().flatten(), sparsity)) if sparsity else 0.0
    with override_config(MaskedConfig(32, 32, 4, 1, use_dot, split_k=split_k)), poison_outputs():
        h = cats_up(x, w_up, a, torch.tensor(t, device=DEVICE), norm_weight=g)
    want = ref.cats_up_ref(x, w_up, a, t, norm_weight=g)
    assert rel_err(h, want) < TOL[dtype]
    assert _zeros_where_off(h, a, t)


@pytest.mark.parametrize("batch", [1, 3])
def test_cats_up_oneshot_tiles_match_reference(batch):
    """The one-shot tiles of W_u (fp32 atomic sums, the last program of a strip writes h), several strips and
    K tiles, ragged; back-to-back launches reuse the self-zeroing accumulators."""
    from actsparse.kernels import cats as kc

    k, n = 100, 72
    for sparsity in (0.0, 0.6, 1.0):
        x = torch.randn(batch, k, device=DEVICE)
        w_up = torch.randn(n, k, device=DEVICE) / k**0.5
        a = torch.nn.functional.silu(torch.randn(batch, n, device=DEVICE))
        g = torch.rand(k, device=DEVICE) + 0.5
        t = float(torch.quantile(a.abs().flatten(), sparsity)) if sparsity else 0.0
        with poison_outputs():
            h = kc._launch_oneshot_up(x, w_up, a, torch.full((n,), t, device=DEVICE), g, 1e-6,
                                      kc.OneshotConfig(block_n=16, block_k=32))
        want = ref.cats_up_ref(x, w_up, a, t, norm_weight=g, eps=1e-6)
        assert _zeros_where_off(h, a, t) and (sparsity < 1.0 or not h.any())
        if sparsity < 1.0:
            assert rel_err(h, want) < 1e-5
    y = cats_up(x, w_up, a, torch.tensor(0.3, device=DEVICE), impl="oneshot")  # the public op, default tile
    assert rel_err(y, ref.cats_up_ref(x, w_up, a, 0.3)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cats_up_kept_rows_walk_matches_reference(dtype):
    """The kept-rows walk (batch 1): each program ranks its kept channels and reads whole rows a step; ragged N
    and K (a last program with fewer channels, a last step with a partial group of rows and of columns),
    per-channel thresholds, every level from all rows kept to none, and h's zeros exactly where the mask is off."""
    from actsparse.kernels import cats as kc

    k, n = 100, 75
    g = (torch.rand(k, device=DEVICE) + 0.5).to(dtype)
    for cfg in (kc.RowsConfig(block_n=32, rows=8, block_k=32), kc.RowsConfig(block_n=16, rows=16, block_k=64,
                                                                              num_stages=1)):
        for sparsity in (0.0, 0.3, 0.7, 1.0):
            x = torch.randn(1, k, device=DEVICE, dtype=dtype)
            w_up = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
            a = torch.nn.functional.silu(torch.randn(1, n, device=DEVICE)).to(dtype)
            t = torch.quantile(a.abs().float().flatten(), sparsity) * (0.5 + torch.rand(n, device=DEVICE))
            with poison_outputs():
                h = kc._launch_rows_up(x, w_up, a, t, g, 1e-6, cfg)
            want = ref.cats_up_ref(x, w_up, a, t, norm_weight=g, eps=1e-6)
            assert _zeros_where_off(h, a, t), (cfg, sparsity)
            if (want != 0).any():  # the reference rounds x̂ to fp16, the kernel keeps it fp32: few kept rows
                assert rel_err(h, want) < (1e-5 if dtype == torch.float32 else 1e-2), (cfg, sparsity)
    y = cats_up(x, w_up, a, torch.tensor(0.2, device=DEVICE), impl="rows")  # the public op, default tile
    assert rel_err(y, ref.cats_up_ref(x, w_up, a, 0.2)) < TOL[dtype]


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("impl, batch", [("walk", 1), ("walk", 3), ("oneshot", 1), ("oneshot", 3), ("rows", 1)])
def test_countdown_gathers_gate_rows_by_the_up_mask_and_activates_them(act, impl, batch):
    """M-COUNTDOWN: a = W_u·x̂ (the up outputs) selects the rows of the gate projection, whose products take the
    activation: h = where(|a| > t, a ⊙ act(W_g·x̂), 0), against the formula written out."""
    k, n = 96, 80
    x = torch.randn(batch, k, device=DEVICE)
    w_gate = torch.randn(n, k, device=DEVICE) / k**0.5
    g = torch.rand(k, device=DEVICE) + 0.5
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g
    a = xn @ (torch.randn(n, k, device=DEVICE) / k**0.5).t()
    t = float(torch.quantile(a.abs().flatten(), 0.6))
    z = xn @ w_gate.t()
    act_z = z * torch.sigmoid(z) if act == "silu" else gelu_tanh(z)
    want = torch.where(a.abs() > t, a * act_z, torch.zeros_like(z))
    with poison_outputs():
        h = cats_up(x, w_gate, a, torch.tensor(t, device=DEVICE), norm_weight=g, impl=impl, act=act)
    assert _zeros_where_off(h, a, t)
    assert rel_err(h, want) < 1e-5
    with pytest.raises(ValueError, match="act must be one of"):
        cats_up(x, w_gate, a, torch.tensor(t, device=DEVICE), act="relu")


def test_cats_up_rejects_bad_arguments():
    x = torch.randn(1, 32, device=DEVICE)
    w = torch.randn(16, 32, device=DEVICE)
    a = torch.randn(1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="natural"):
        cats_up(x, w.t().contiguous(), a, torch.tensor(0.0, device=DEVICE))
    with pytest.raises(ValueError, match="a must have shape"):
        cats_up(x, w, a[:, :8], torch.tensor(0.0, device=DEVICE))
    with pytest.raises(ValueError, match="float32"):
        cats_up(x, w, a, torch.tensor(0.0, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="impl must be one of"):
        cats_up(x, w, a, torch.tensor(0.0, device=DEVICE), impl="gather")
    with pytest.raises(ValueError, match="kept-rows walk runs batch 1 only, got 2; use impl='walk' or 'oneshot'"):
        cats_up(x.expand(2, -1).contiguous(), w, a.expand(2, -1).contiguous(), torch.tensor(0.0, device=DEVICE),
                impl="rows")
    with pytest.raises(ValueError, match="one-shot tiles run batches of at most 16 rows, got 17"):
        cats_up(x.expand(17, -1).contiguous(), w, a.expand(17, -1).contiguous(), torch.tensor(0.0, device=DEVICE),
                impl="oneshot")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rmsnorm_add_rmsnorm_silu_mul_match_reference(dtype):
    x = torch.randn(3, 200, device=DEVICE, dtype=dtype)
    d = torch.randn(3, 200, device=DEVICE, dtype=dtype)
    g = (torch.rand(200, device=DEVICE) + 0.5).to(dtype)
    with poison_outputs():
        y = rmsnorm(x, g, 1e-5)
        r, yn = add_rmsnorm(x, d, g, 1e-5)
        h = silu_mul(torch.cat([x, d], dim=1))
    assert rel_err(y, ref.hf_rmsnorm_ref(x, g, 1e-5)) < TOL[dtype]
    rr, ryn = ref.add_rmsnorm_ref(x, d, g, 1e-5)
    assert rel_err(r, rr) < TOL[dtype] and rel_err(yn, ryn) < TOL[dtype]
    assert rel_err(h, ref.silu_mul_ref(torch.cat([x, d], dim=1))) < TOL[dtype]
    with pytest.raises(ValueError, match="g must have shape"):
        rmsnorm(x, g[:10])
    with pytest.raises(ValueError, match="act must be"):
        silu_mul(torch.cat([x, d], dim=1), act="relu")
    with pytest.raises(ValueError, match="2I"):
        silu_mul(x[:, :199])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemma_glue_geglu_and_norm_scaled_in_float32(dtype):
    """Gemma's glue: gelu-tanh(gate)·up against the formula written out, and its RMSNorm (normalised and scaled
    by a float32 1 + w, one cast) against the reference, which differs from Llama's rounding in fp16."""
    x = torch.randn(3, 200, device=DEVICE, dtype=dtype)
    u = torch.randn(3, 200, device=DEVICE, dtype=dtype)
    g = torch.rand(200, device=DEVICE) + 0.5  # float32, as the engine keeps Gemma's 1 + w
    with poison_outputs():
        h = silu_mul(torch.cat([x, u], dim=1), act="gelu_tanh")
        y = rmsnorm(x, g, 1e-6, scale_in_f32=True)
    assert rel_err(h, (gelu_tanh(x.float()) * u.float()).to(dtype)) < TOL[dtype]
    want = ref.hf_rmsnorm_ref(x, g, 1e-6, scale_in_f32=True)
    assert rel_err(y, want) < TOL[dtype]
    assert torch.equal(want, ref.rmsnorm_ref(x, g, 1e-6).to(dtype))  # one rounding


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scale_in_f32", [False, True])
def test_add_normed_adds_the_post_norm_of_raw_sums_into_the_stream_and_zeroes_them(out_dtype, scale_in_f32):
    """A post-norm between an op and the residual add (Gemma): the fp32 stream x gains rmsnorm(y)·g rounded to the
    model's dtype, written out here as the formula, and the raw sums y are zero afterwards."""
    x = torch.randn(3, 200, device=DEVICE)
    y = torch.randn(3, 200, device=DEVICE) * 5
    g = torch.rand(200, device=DEVICE) + 0.5
    x0, y0 = x.clone(), y.clone()
    n = y0 * torch.rsqrt(y0.pow(2).mean(-1, keepdim=True) + 1e-6)
    want = x0 + (n * g).to(out_dtype).float()
    got = add_normed(x, y, g, 1e-6, scale_in_f32, out_dtype=out_dtype)
    assert got is x and torch.equal(y, torch.zeros_like(y))
    assert rel_err(x, want) < TOL[out_dtype]
    xr, yr = x0.clone(), y0.clone()
    ref.add_normed_ref(xr, yr, g, 1e-6, scale_in_f32, out_dtype)
    assert rel_err(x, xr) < TOL[out_dtype] and torch.equal(yr, torch.zeros_like(yr))
    with pytest.raises(ValueError, match="g must have shape"):
        add_normed(x, torch.zeros_like(y), g[:10])
    with pytest.raises(ValueError, match="x must match y's shape"):
        add_normed(x[:2], torch.zeros_like(y), g)
    with pytest.raises(ValueError, match="out_dtype must be"):
        add_normed(x, torch.zeros_like(y), g, out_dtype=torch.int32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, impl", [(1, "walk"), (4, "walk"), (1, "oneshot"), (1, "rows")])
def test_gpu_cats_up_llama_shapes(dtype, batch, impl):
    k, n = 4096, 2048
    x = torch.randn(batch, k, device="cuda", dtype=dtype)
    w_up = (torch.randn(n, k, device="cuda") / 64).to(dtype)
    a = torch.nn.functional.silu(torch.randn(batch, n, device="cuda")).to(dtype)
    t = float(torch.quantile(a.abs().float().flatten(), 0.5))
    with poison_outputs():
        h = cats_up(x, w_up, a, torch.tensor(t, device="cuda"), impl=impl)
    want = ref.cats_up_ref(x, w_up, a, t)
    assert rel_err(h, want) < TOL[dtype] and _zeros_where_off(h, a, t)
