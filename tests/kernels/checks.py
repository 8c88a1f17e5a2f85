"""What every kernel test checks an output with, and the threshold it draws inputs against."""

import math

import torch


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64, after checking that every element was written (outputs are poisoned)."""
    assert not torch.isnan(got).any(), "output has NaNs: some elements were never written"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def quantile_thresh(x: torch.Tensor, sparsity: float) -> float:
    """The |x| level under which a `sparsity` fraction of x lies."""
    return float(torch.quantile(x.abs().float().flatten(), sparsity)) if sparsity > 0 else 0.0


def check_gated_mlp(run, cfgs, batch: int, sparsity: float, device) -> None:
    """`run(fn, *args, cfg=name, **kw)` under each config name computes sparse_gated_mlp as the reference does:
    fused norm, gate and up selecting different rows, shifts and biases."""
    from actsparse.kernels import ref, sparse_gated_mlp

    k, n = 64, 80
    x = torch.randn(batch, k, device=device) * 2
    wg, wu = torch.randn(k, n, device=device) / 8, torch.randn(k, n, device=device) / 8
    g = torch.rand(k, device=device) + 0.5
    t = quantile_thresh(ref.rmsnorm_ref(x, g), sparsity)
    thresh = torch.tensor([t, t * 1.3], device=device)  # gate and up select different rows
    kw = dict(norm_weight=g, shift=torch.randn(2, k, device=device) * 0.1, bias=torch.randn(2, n, device=device))
    want = ref.sparse_gated_mlp_ref(x, wg, wu, thresh, **kw)
    for cfg in cfgs:
        assert rel_err(run(sparse_gated_mlp, x, wg, wu, thresh, cfg=cfg, **kw), want) < 1e-5


def check_nm_and_nothing_kept(run, device) -> None:
    """N:M selection matches the reference, and with every channel skipped the output is exactly the bias."""
    from actsparse.kernels import ref, sparse_gemv

    k, n = 64, 32
    x = torch.randn(1, k, device=device)
    wt = torch.randn(k, n, device=device) / 8
    y = run(sparse_gemv, x, wt, torch.zeros(1, device=device), nm=(2, 4))
    assert rel_err(y, ref.sparse_gemv_ref(x, wt, 0.0, nm=(2, 4))) < 1e-5
    bias = torch.randn(n, device=device)
    y = run(sparse_gemv, x, wt, torch.full((1,), 1e9, device=device), bias=bias)
    assert torch.equal(y[0], bias)


def check_fused_qkv(run, cfgs, batch: int, device) -> None:
    """q|k|v as one op: fused RMSNorm, a per-channel threshold and shift row per segment, bias and residual."""
    from actsparse.kernels import ref, sparse_gemv

    k, nq, nkv = 96, 64, 32
    n = nq + 2 * nkv
    x = torch.randn(batch, k, device=device) * 3
    wt = torch.randn(k, n, device=device) / k**0.5
    kw = dict(shift=torch.randn(3, k, device=device) * 0.2, bias=torch.randn(n, device=device),
              residual=torch.randn(batch, n, device=device), norm_weight=torch.rand(k, device=device) + 0.5,
              eps=1e-5, segments=(nq, nq + nkv))
    thresh = torch.rand(3, k, device=device)  # per channel, one row per segment
    want = ref.sparse_gemv_ref(x, wt, thresh, **kw)
    for cfg in cfgs:
        assert rel_err(run(sparse_gemv, x, wt, thresh, cfg=cfg, **kw), want) < 1e-5


def gelu_tanh(y: torch.Tensor) -> torch.Tensor:
    """Gemma's gelu_pytorch_tanh written out: 0.5·y·(1 + tanh(√(2/π)·(y + 0.044715·y³)))."""
    return 0.5 * y * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y**3)))


def check_gelu_tanh(run, cfgs, batch: int, device) -> None:
    """The gelu-tanh epilogue, on a GEMV's output (sparse_gemv, + residual) and on the gate of a gate/up pair
    (sparse_gated_mlp, GeGLU), equals the formula written out on the selected, normalised input."""
    from actsparse.kernels import ref, sparse_gated_mlp, sparse_gemv

    k, n = 64, 80
    x = torch.randn(batch, k, device=device) * 2
    wg, wu = torch.randn(k, n, device=device) / 4, torch.randn(k, n, device=device) / 4
    g = torch.rand(k, device=device) + 0.5
    res = torch.randn(batch, n, device=device)
    xn = ref.rmsnorm_ref(x, g)
    t = quantile_thresh(xn, 0.5)
    xs = torch.where(xn.abs() > t, xn, 0.0)
    thresh = torch.tensor([t], device=device)
    for cfg in cfgs:
        y = run(sparse_gemv, x, wg, thresh, norm_weight=g, residual=res, act="gelu_tanh", cfg=cfg)
        assert rel_err(y, gelu_tanh(xs @ wg) + res) < 1e-5
        h = run(sparse_gated_mlp, x, wg, wu, thresh.expand(2), norm_weight=g, act="gelu_tanh", cfg=cfg)
        assert rel_err(h, gelu_tanh(xs @ wg) * (xs @ wu)) < 1e-5
