"""The kernels beside v2 against the torch references, fresh random inputs, outputs poisoned: v3 (compacted
active rows), v4 (slice-stationary selection, streamed columns), v5 (a selection pass, then the v2 walk over
the selected input) and v6 (a compaction pass, then the v3 walk). v2 has its own file."""

import pytest
import torch

from actsparse.kernels import (GemvConfig, V3Config, V4Config, override_config, poison_outputs, ref, sparse_gated_mlp,
                               sparse_gemv)
from actsparse.kernels.configs import MAX_BATCH, choose_impl
from actsparse.kernels.sparse_gemv_v4 import plan_v4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Several K slices with several steps each (split-K reduction), and one slice holding all of K.
# v4 "split": 16-column steps, 2 ranges of several steps each (a ragged last range and slice, the
# last-arriver sum); "whole": one slice, one range per program's epilogue.
CFGS = {
    "v3": {"split": V3Config(block_n=32, seg_k=32, block_k=8), "whole": V3Config(block_n=64, seg_k=128, block_k=32)},
    "v4": {"split": V4Config(block_n=16, seg_k=32, ranges=2), "whole": V4Config(block_n=32, seg_k=128, ranges=3)},
    "v5": {"split": GemvConfig(block_n=16, block_k=16, split_k=3), "whole": GemvConfig(block_n=32, block_k=128)},
    # v6 "whole": two gathered tiles in flight (depth 2) over several steps.
    "v6": {"split": V3Config(block_n=32, seg_k=32, block_k=8),
           "whole": V3Config(block_n=64, seg_k=128, block_k=32, depth=2)},
}
OVERRIDE_AS = {"v5": "v5", "v6": "v6"}  # override_config's impl for a config class shared by two kernels
IMPLS = list(CFGS)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "output has NaNs: some elements were never written"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def run(fn, *args, impl, cfg="split", **kw):
    with override_config(CFGS[impl][cfg], impl=OVERRIDE_AS.get(impl, "v2")), poison_outputs():
        return fn(*args, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("cfg", ["split", "whole"])
@pytest.mark.parametrize("impl", IMPLS)
def test_gemv_matches_reference(impl, dtype, batch, sparsity, cfg):
    k, n = 100, 70  # ragged in K, N and the last K slice
    x = torch.randn(batch, k, device=DEVICE, dtype=dtype)
    wt = (torch.randn(k, n, device=DEVICE) / k**0.5).to(dtype)
    t = float(torch.quantile(x.abs().float().flatten(), sparsity)) if sparsity > 0 else 0.0
    res = torch.randn(batch, n, device=DEVICE, dtype=dtype)
    y = run(sparse_gemv, x, wt, torch.tensor([t], device=DEVICE), residual=res, act="silu", impl=impl, cfg=cfg)
    assert y.shape == (batch, n) and y.dtype == dtype
    want = ref.sparse_gemv_ref(x, wt, t, residual=res, act="silu")
    assert rel_err(y, want) < TOL[dtype]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_qkv_norm_shift_bias_match_reference(impl, batch):
    k, nq, nkv = 96, 64, 32
    n = nq + 2 * nkv
    x = torch.randn(batch, k, device=DEVICE) * 3
    wt = torch.randn(k, n, device=DEVICE) / k**0.5
    kw = dict(shift=torch.randn(3, k, device=DEVICE) * 0.2, bias=torch.randn(n, device=DEVICE),
              residual=torch.randn(batch, n, device=DEVICE), norm_weight=torch.rand(k, device=DEVICE) + 0.5,
              eps=1e-5, segments=(nq, nq + nkv))
    thresh = torch.rand(3, k, device=DEVICE)  # per channel, one row per segment
    for cfg in CFGS[impl]:
        y = run(sparse_gemv, x, wt, thresh, impl=impl, cfg=cfg, **kw)
        assert rel_err(y, ref.sparse_gemv_ref(x, wt, thresh, **kw)) < 1e-5


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("sparsity", [0.0, 0.7])
@pytest.mark.parametrize("impl", IMPLS)
def test_gated_mlp_matches_reference(impl, batch, sparsity):
    k, n = 64, 80
    x = torch.randn(batch, k, device=DEVICE) * 2
    wg, wu = torch.randn(k, n, device=DEVICE) / 8, torch.randn(k, n, device=DEVICE) / 8
    g = torch.rand(k, device=DEVICE) + 0.5
    t = float(torch.quantile(ref.rmsnorm_ref(x, g).abs().flatten(), sparsity)) if sparsity else 0.0
    thresh = torch.tensor([t, t * 1.3], device=DEVICE)  # gate and up select different rows
    kw = dict(norm_weight=g, shift=torch.randn(2, k, device=DEVICE) * 0.1, bias=torch.randn(2, n, device=DEVICE))
    want = ref.sparse_gated_mlp_ref(x, wg, wu, thresh, **kw)
    for cfg in CFGS[impl]:
        assert rel_err(run(sparse_gated_mlp, x, wg, wu, thresh, impl=impl, cfg=cfg, **kw), want) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_nm_selection_and_empty_slices(impl):
    k, n = 64, 32
    x = torch.randn(1, k, device=DEVICE)
    wt = torch.randn(k, n, device=DEVICE) / 8
    y = run(sparse_gemv, x, wt, torch.zeros(1, device=DEVICE), nm=(2, 4), impl=impl)
    assert rel_err(y, ref.sparse_gemv_ref(x, wt, 0.0, nm=(2, 4))) < 1e-5
    # Every channel skipped: each slice's list is empty and the output is exactly the bias.
    bias = torch.randn(n, device=DEVICE)
    y = run(sparse_gemv, x, wt, torch.full((1,), 1e9, device=DEVICE), bias=bias, impl=impl)
    assert torch.equal(y[0], bias)


@pytest.mark.parametrize("impl", IMPLS)
def test_repeated_launches_reuse_their_counters(impl):
    """The last program of a strip resets its counter: back-to-back launches stay correct."""
    x = torch.randn(1, 96, device=DEVICE)
    wt = torch.randn(96, 64, device=DEVICE) / 10
    for _ in range(3):
        x = torch.randn_like(x)
        y = run(sparse_gemv, x, wt, torch.tensor([0.5], device=DEVICE), impl=impl)
        assert rel_err(y, ref.sparse_gemv_ref(x, wt, 0.5)) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_impl_choice_and_errors(impl):
    x = torch.randn(6, 32, device=DEVICE)
    wt = torch.randn(32, 16, device=DEVICE)
    capped = MAX_BATCH[impl] is not None
    if capped:
        with pytest.raises(ValueError, match=f"the {impl} kernel runs batches of at most 4 rows, got 6"):
            sparse_gemv(x, wt, torch.zeros(1, device=DEVICE), impl=impl)
    with pytest.raises(ValueError, match="impl must be"):
        sparse_gemv(x, wt, torch.zeros(1, device=DEVICE), impl="v9")
    assert choose_impl("gemv", 32, 16, 6)[0] == "v2"  # batch > 4: the measured table says v2
    with override_config(CFGS[impl]["split"], impl=OVERRIDE_AS.get(impl, "v2")):
        assert choose_impl("gemv", 32, 16, 2)[0] == impl
        # a forced batch-≤4 kernel still falls back
        assert choose_impl("gemv", 32, 16, 6)[0] == ("v2" if capped else impl)
    y2 = sparse_gemv(x[:1], wt, torch.zeros(1, device=DEVICE), impl="v2")
    y = sparse_gemv(x[:1], wt, torch.zeros(1, device=DEVICE), impl=impl)
    assert rel_err(y, y2) < 1e-5


def test_v4_ranges_stay_inside_segments_and_results_do_not_depend_on_the_launch_shape():
    # Llama-3-8B q|k|v: ranges must divide the q/k and k/v boundaries, whatever per_sm asks for.
    for per_sm in (1, 3, 4, 8):
        seg_k, block_n, range_n, slices = plan_v4(4096, 6144, [4096, 5120], V4Config(per_sm=per_sm), 0,
                                                  torch.device("cpu"))
        assert 4096 % range_n == 0 and 5120 % range_n == 0 and range_n % block_n == 0 and slices == 8
    assert plan_v4(14336, 4096, [], V4Config(seg_k=512, per_sm=4), 0, torch.device("cpu"))[3] == 28
    # Another split of K and of the columns sums the same products in another order: fp32-close, and
    # a repeated launch of one shape is bitwise identical (fixed-order reduction, no atomics on data).
    k, n = 200, 96
    x = torch.randn(2, k, device=DEVICE)
    wt = torch.randn(k, n, device=DEVICE) / k**0.5
    t = torch.tensor([0.6], device=DEVICE)
    outs = []
    for cfg in (V4Config(block_n=16, seg_k=32, ranges=4), V4Config(block_n=32, seg_k=64, ranges=1),
                V4Config(block_n=16, seg_k=256)):
        with override_config(cfg), poison_outputs():
            outs.append(sparse_gemv(x, wt, t))
            assert torch.equal(sparse_gemv(x, wt, t), outs[-1])
    want = ref.sparse_gemv_ref(x, wt, t)
    for y in outs:
        assert rel_err(y, want) < 1e-5


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(4096, 6144), (14336, 4096), (4096, 1024)])
@pytest.mark.parametrize("impl", IMPLS)
def test_gpu_decode_shapes(impl, dtype, batch, sparsity, shape):
    k, n = shape
    x = torch.randn(batch, k, device="cuda", dtype=dtype)
    wt = (torch.randn(k, n, device="cuda") / k**0.5).to(dtype)
    t = float(torch.quantile(x.abs().float().flatten(), sparsity)) if sparsity > 0 else 0.0
    res = torch.randn(batch, n, device="cuda", dtype=dtype)
    with poison_outputs():
        y = sparse_gemv(x, wt, torch.tensor([t], device="cuda"), residual=res, impl=impl)
    assert rel_err(y, ref.sparse_gemv_ref(x, wt, t, residual=res)) < TOL[dtype]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("impl", IMPLS)
def test_gpu_qkv_and_gated_mlp_llama_shapes_under_graph_replay(impl, batch):
    d, nq, nkv, inter = 4096, 4096, 1024, 14336
    dt = torch.bfloat16
    x = torch.randn(batch, d, device="cuda", dtype=dt)
    g = (torch.rand(d, device="cuda") + 0.5).to(dt)
    wqkv = (torch.randn(d, nq + 2 * nkv, device="cuda") / 64).to(dt)
    wg = (torch.randn(d, inter, device="cuda") / 64).to(dt)
    wu = (torch.randn(d, inter, device="cuda") / 64).to(dt)
    t = torch.tensor([0.7, 0.5, 0.9], device="cuda")
    kw = dict(norm_weight=g, segments=(nq, nq + nkv))

    def step():
        return (sparse_gemv(x, wqkv, t, impl=impl, **kw),
                sparse_gated_mlp(x, wg, wu, t[:2], norm_weight=g, impl=impl))

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        qkv, h = step()
    for _ in range(3):  # fresh inputs each replay: counters and lists must be reset / rebuilt
        x.copy_(torch.randn_like(x))
        qkv.fill_(float("nan"))
        h.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(qkv, ref.sparse_gemv_ref(x, wqkv, t, **kw)) < 1e-2
        assert rel_err(h, ref.sparse_gated_mlp_ref(x, wg, wu, t[:2], norm_weight=g)) < 1e-2
