"""The gather walk on tensor cores (GatherConfig(use_dot=True): the gathered [16 (batch padded), BLOCK_K] x
[BLOCK_K, BLOCK_N] products through tl.dot) against the torch references: fresh random inputs, outputs
poisoned, every batch the walk runs (1-4), ragged shapes, split and whole K slices."""

import pytest
import torch

from actsparse.kernels import GatherConfig, override_config, poison_outputs, ref, sparse_gated_mlp, sparse_gemv

from .checks import check_gelu_tanh, quantile_thresh, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CFGS = {"split": GatherConfig(block_n=32, seg_k=32, block_k=16, use_dot=True),
        "whole": GatherConfig(block_n=16, seg_k=128, block_k=32, use_dot=True, depth=2)}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(fn, *args, cfg, **kw):
    with override_config(cfg), poison_outputs():
        return fn(*args, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 2, 3, 4])
@pytest.mark.parametrize("sparsity", [0.0, 0.6])
@pytest.mark.parametrize("cfg", list(CFGS))
def test_gemv_matches_reference(dtype, batch, sparsity, cfg):
    k, n = 100, 80  # ragged K and last slice
    x = torch.randn(batch, k, device=DEVICE, dtype=dtype)
    wt = (torch.randn(k, n, device=DEVICE) / k**0.5).to(dtype)
    t = quantile_thresh(x, sparsity)
    res = torch.randn(batch, n, device=DEVICE, dtype=dtype)
    y = run(sparse_gemv, x, wt, torch.tensor([t], device=DEVICE), residual=res, act="silu", cfg=CFGS[cfg])
    assert y.shape == (batch, n) and y.dtype == dtype
    assert rel_err(y, ref.sparse_gemv_ref(x, wt, t, residual=res, act="silu")) < TOL[dtype]


@pytest.mark.parametrize("batch", [2, 4])
def test_fused_qkv_and_gated_mlp_with_norm_shift_bias(batch):
    k, nq, nkv = 96, 64, 32
    n = nq + 2 * nkv
    x = torch.randn(batch, k, device=DEVICE) * 3
    g = torch.rand(k, device=DEVICE) + 0.5
    wt = torch.randn(k, n, device=DEVICE) / k**0.5
    kw = dict(shift=torch.randn(3, k, device=DEVICE) * 0.2, bias=torch.randn(n, device=DEVICE),
              residual=torch.randn(batch, n, device=DEVICE), norm_weight=g, eps=1e-5, segments=(nq, nq + nkv))
    thresh = torch.rand(3, k, device=DEVICE)  # per channel, one row per segment
    wg, wu = torch.randn(k, 48, device=DEVICE) / 8, torch.randn(k, 48, device=DEVICE) / 8
    tg = torch.tensor([0.4, 0.7], device=DEVICE)  # gate and up select different rows
    gkw = dict(norm_weight=g, shift=torch.randn(2, k, device=DEVICE) * 0.1, bias=torch.randn(2, 48, device=DEVICE))
    for cfg in CFGS.values():
        assert rel_err(run(sparse_gemv, x, wt, thresh, cfg=cfg, **kw), ref.sparse_gemv_ref(x, wt, thresh, **kw)) < 1e-5
        assert rel_err(run(sparse_gated_mlp, x, wg, wu, tg, cfg=cfg, **gkw),
                       ref.sparse_gated_mlp_ref(x, wg, wu, tg, **gkw)) < 1e-5


def test_gelu_tanh_epilogue_matches_the_formula():
    check_gelu_tanh(run, CFGS.values(), 2, DEVICE)


def test_all_channels_skipped_gives_the_bias():
    x = torch.randn(3, 64, device=DEVICE)
    wt = torch.randn(64, 32, device=DEVICE)
    bias = torch.randn(32, device=DEVICE)
    y = run(sparse_gemv, x, wt, torch.full((1,), 1e9, device=DEVICE), bias=bias, cfg=CFGS["split"])
    assert torch.equal(y, bias.expand(3, 32))


def test_tiles_under_16_are_rejected():
    x = torch.randn(2, 64, device=DEVICE)
    wt = torch.randn(64, 32, device=DEVICE)
    with pytest.raises(ValueError, match="use_dot.*needs block_k and block_n ≥ 16, got 8 and 32"):
        run(sparse_gemv, x, wt, torch.zeros(1, device=DEVICE), cfg=GatherConfig(block_n=32, seg_k=64, block_k=8,
                                                                              use_dot=True))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [2, 4])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(4096, 6144), (14336, 4096)])
def test_gpu_decode_shapes(dtype, batch, sparsity, shape):
    k, n = shape
    x = torch.randn(batch, k, device="cuda", dtype=dtype)
    wt = (torch.randn(k, n, device="cuda") / k**0.5).to(dtype)
    t = quantile_thresh(x, sparsity)
    res = torch.randn(batch, n, device="cuda", dtype=dtype)
    for cfg in (GatherConfig(block_n=32, seg_k=1024, block_k=128, use_dot=True),
                GatherConfig(block_n=64, seg_k=4096, block_k=64, use_dot=True, num_stages=2)):
        y = run(sparse_gemv, x, wt, torch.tensor([t], device="cuda"), residual=res, cfg=cfg)
        assert rel_err(y, ref.sparse_gemv_ref(x, wt, t, residual=res)) < TOL[dtype]


@pytest.mark.gpu
@gpu
def test_gpu_gated_mlp_under_graph_replay():
    d, inter, batch = 4096, 14336, 4
    dt = torch.bfloat16
    x = torch.randn(batch, d, device="cuda", dtype=dt)
    g = (torch.rand(d, device="cuda") + 0.5).to(dt)
    wg = (torch.randn(d, inter, device="cuda") / 64).to(dt)
    wu = (torch.randn(d, inter, device="cuda") / 64).to(dt)
    t = torch.tensor([0.7, 0.5], device="cuda")
    cfg = GatherConfig(block_n=32, seg_k=2048, block_k=128, use_dot=True)

    def step():
        with override_config(cfg):
            return sparse_gated_mlp(x, wg, wu, t, norm_weight=g)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h = step()
    for _ in range(3):  # fresh inputs each replay
        x.copy_(torch.randn_like(x))
        h.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(h, ref.sparse_gated_mlp_ref(x, wg, wu, t, norm_weight=g)) < 1e-2
