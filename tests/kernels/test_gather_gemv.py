"""The gather walk (a compaction pass, then a walk over the active weight rows) against the torch references,
fresh random inputs, outputs poisoned. The masked walk has its own file (test_sparse_gemv.py)."""

import contextlib

import pytest
import torch

from actsparse.kernels import (GatherConfig, MaskedConfig, configs, override_config, poison_outputs, ref,
                               sparse_gated_mlp, sparse_gemv)
from actsparse.kernels.configs import choose_impl

from .checks import (check_fused_qkv, check_gated_mlp, check_gelu_tanh, check_nm_and_nothing_kept, quantile_thresh,
                     rel_err)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Several K slices with several steps each (split-K reduction), and one slice holding all of K with two
# gathered tiles in flight (depth 2) over several steps.
CFGS = {"split": GatherConfig(block_n=32, seg_k=32, block_k=8),
        "whole": GatherConfig(block_n=64, seg_k=128, block_k=32, depth=2),
        # the first indices loaded beside the count: the stale entries past it must not reach the sums
        "eager": GatherConfig(block_n=32, seg_k=64, block_k=16, depth=2, eager=True),
        # no compaction launch: the walk's first programs write the lists, the others wait for them
        "fused": GatherConfig(block_n=32, seg_k=32, block_k=8, fused=True)}


def run(fn, *args, cfg="split", **kw):
    with override_config(CFGS[cfg]), poison_outputs():
        return fn(*args, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("cfg", ["split", "whole", "eager", "fused"])
def test_gemv_matches_reference(dtype, batch, sparsity, cfg):
    k, n = 100, 70  # ragged in K, N and the last K slice
    x = torch.randn(batch, k, device=DEVICE, dtype=dtype)
    wt = (torch.randn(k, n, device=DEVICE) / k**0.5).to(dtype)
    t = quantile_thresh(x, sparsity)
    res = torch.randn(batch, n, device=DEVICE, dtype=dtype)
    y = run(sparse_gemv, x, wt, torch.tensor([t], device=DEVICE), residual=res, act="silu", cfg=cfg)
    assert y.shape == (batch, n) and y.dtype == dtype
    want = ref.sparse_gemv_ref(x, wt, t, residual=res, act="silu")
    assert rel_err(y, want) < TOL[dtype]


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_qkv_norm_shift_bias_match_reference(batch):
    check_fused_qkv(run, CFGS, batch, DEVICE)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("sparsity", [0.0, 0.7])
def test_gated_mlp_matches_reference(batch, sparsity):
    check_gated_mlp(run, CFGS, batch, sparsity, DEVICE)


@pytest.mark.parametrize("batch", [1, 3])
def test_gelu_tanh_epilogue_matches_the_formula(batch):
    check_gelu_tanh(run, CFGS, batch, DEVICE)


def test_nm_selection_and_empty_slices():
    """Every channel skipped: each slice's list is empty."""
    check_nm_and_nothing_kept(run, DEVICE)


def test_eager_indices_past_the_count_never_reach_the_sums():
    """With the first indices loaded before the count is known, what lies past the count (the previous, denser
    launch's list, or anything) is masked out: a dense launch, then sparser ones and one keeping nothing, each
    equal the reference; nothing kept adds exactly nothing into the given tensor."""
    k, n = 96, 64
    wt = torch.randn(k, n, device=DEVICE) / 10
    for keep in (k, 40, 3, 0):
        x = torch.randn(1, k, device=DEVICE)
        # a level keeping exactly `keep` channels (|x| > t), so the sparse launches are never empty by chance
        t = float("inf") if keep == 0 else (0.0 if keep == k else float(x.abs().flatten().sort().values[k - keep - 1]))
        assert int((x.abs() > t).sum()) == keep
        y = run(sparse_gemv, x, wt, torch.tensor([t], device=DEVICE), cfg="eager")
        assert rel_err(y, ref.sparse_gemv_ref(x, wt, t)) < 1e-5 if keep else torch.equal(y, 0 * y)
        acc = torch.randn(1, n, device=DEVICE)
        want = acc.clone()
        run(sparse_gemv, x, wt, torch.tensor([t], device=DEVICE), accumulate=acc, cfg="eager")
        want += ref.sparse_gemv_ref(x, wt, t)
        assert rel_err(acc, want) < 1e-5


def test_repeated_launches_reuse_their_counters():
    """The last program of a strip resets its counter: back-to-back launches stay correct."""
    x = torch.randn(1, 96, device=DEVICE)
    wt = torch.randn(96, 64, device=DEVICE) / 10
    for _ in range(3):
        x = torch.randn_like(x)
        y = run(sparse_gemv, x, wt, torch.tensor([0.5], device=DEVICE))
        assert rel_err(y, ref.sparse_gemv_ref(x, wt, 0.5)) < 1e-5


def test_fused_launches_take_exactly_their_claims_and_stay_correct():
    """One launch per op: a launch takes programs + lists claims and marks its lists ready once each; the counters
    only grow, so back-to-back launches (fresh inputs, sparser each time, nothing kept last) stay correct."""
    k, n = 96, 64  # the "fused" tiles: 2 column strips × 3 K slices = 6 programs, 3 lists (one threshold row)
    wt = torch.randn(k, n, device=DEVICE) / 10
    claims = configs.claim_counters(torch.empty(0, device=DEVICE).device, 6, 3)  # the launch's own device
    before = claims.clone()
    for i, t in enumerate((0.0, 0.5, 1.5, float("inf"))):
        x = torch.randn(1, k, device=DEVICE)
        y = run(sparse_gemv, x, wt, torch.tensor([t], device=DEVICE), cfg="fused")
        want = ref.sparse_gemv_ref(x, wt, t)
        assert rel_err(y, want) < 1e-5 if want.abs().sum() > 0 else torch.equal(y, 0 * y)
        assert (claims - before).tolist() == [(i + 1) * (6 + 3), (i + 1) * 3]


def test_auto_runs_gather_where_it_can_and_masked_elsewhere():
    x = torch.randn(6, 32, device=DEVICE)
    wt = torch.randn(32, 16, device=DEVICE)
    with pytest.raises(ValueError, match="the gather kernel runs batches of at most 4 rows, got 6"):
        sparse_gemv(x, wt, torch.zeros(1, device=DEVICE), impl="gather")
    with pytest.raises(ValueError, match="impl must be 'auto', 'masked', 'gather' or 'oneshot', got 'v6'"):
        sparse_gemv(x, wt, torch.zeros(1, device=DEVICE), impl="v6")
    assert choose_impl("gemv", 32, 16, 4)[0] == "gather"
    assert choose_impl("gemv", 32, 16, 6)[0] == "masked"  # batch > 4
    with override_config(MaskedConfig(block_n=16, block_k=16)):
        assert choose_impl("gemv", 32, 16, 2) == ("masked", MaskedConfig(block_n=16, block_k=16))
    with override_config(CFGS["split"]):
        assert choose_impl("gemv", 32, 16, 2) == ("gather", CFGS["split"])
        assert choose_impl("gemv", 32, 16, 6)[0] == "masked"  # a forced gather config still falls back
    y2 = sparse_gemv(x[:1], wt, torch.zeros(1, device=DEVICE), impl="masked")
    y = sparse_gemv(x[:1], wt, torch.zeros(1, device=DEVICE), impl="gather")
    assert rel_err(y, y2) < 1e-5


def test_repeated_launch_is_bitwise_identical():
    """Fixed-order reduction, no atomics on data: the same inputs give the same bits."""
    k, n = 200, 96
    x = torch.randn(2, k, device=DEVICE)
    wt = torch.randn(k, n, device=DEVICE) / k**0.5
    t = torch.tensor([0.6], device=DEVICE)
    with override_config(CFGS["split"]), poison_outputs():
        y = sparse_gemv(x, wt, t)
        assert torch.equal(sparse_gemv(x, wt, t), y)
    assert rel_err(y, ref.sparse_gemv_ref(x, wt, t)) < 1e-5


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_qkv_and_gated_mlp_llama_shapes_under_graph_replay(batch, fused):
    d, nq, nkv, inter = 4096, 4096, 1024, 14336
    dt = torch.bfloat16
    x = torch.randn(batch, d, device="cuda", dtype=dt)
    g = (torch.rand(d, device="cuda") + 0.5).to(dt)
    wqkv = (torch.randn(d, nq + 2 * nkv, device="cuda") / 64).to(dt)
    wg = (torch.randn(d, inter, device="cuda") / 64).to(dt)
    wu = (torch.randn(d, inter, device="cuda") / 64).to(dt)
    t = torch.tensor([0.7, 0.5, 0.9], device="cuda")
    kw = dict(norm_weight=g, segments=(nq, nq + nkv))

    # fused: the lists written inside the walk's launch (its programs wait for them), tiles as tuned
    tiles = (GatherConfig(block_n=32, seg_k=2048, block_k=128, depth=2, fused=True) if batch == 1
             else GatherConfig(block_n=64, seg_k=256, block_k=32, fused=True))

    def step():
        with override_config(tiles) if fused else contextlib.nullcontext():
            return (sparse_gemv(x, wqkv, t, impl="gather", **kw),
                    sparse_gated_mlp(x, wg, wu, t[:2], norm_weight=g, impl="gather"))

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        qkv, h = step()
    for _ in range(20 if fused else 3):  # fresh inputs each replay: counters and lists must be reset / rebuilt
        x.copy_(torch.randn_like(x))
        qkv.fill_(float("nan"))
        h.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(qkv, ref.sparse_gemv_ref(x, wqkv, t, **kw)) < 1e-2
        assert rel_err(h, ref.sparse_gated_mlp_ref(x, wg, wu, t[:2], norm_weight=g)) < 1e-2
