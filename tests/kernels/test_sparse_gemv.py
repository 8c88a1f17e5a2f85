"""sparse_gemv and sparse_gated_mlp against the torch references, on fresh random inputs, outputs poisoned."""

import pytest
import torch

from actsparse.kernels import MaskedConfig, override_config, poison_outputs, sparse_gated_mlp, sparse_gemv
from actsparse.kernels import ref

from .checks import check_gelu_tanh, quantile_thresh, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Both compute paths (tensor-core tl.dot, CUDA-core FMA up to batch 4), with and without split-K, and
# with two weight tiles in flight (depth 2: odd and even chunk counts per slice, one-chunk slices), and one-shot tiles.
PATHS = {"dot": MaskedConfig(block_n=32, block_k=32, num_warps=4, num_stages=2, use_dot=True, split_k=2),
         "fma": MaskedConfig(block_n=32, block_k=32, num_warps=4, num_stages=1, use_dot=False, split_k=3),
         "fma1": MaskedConfig(block_n=32, block_k=16, num_warps=4, num_stages=1, use_dot=False, split_k=1),
         "fma_d2": MaskedConfig(block_n=16, block_k=16, num_warps=4, num_stages=1, use_dot=False, split_k=2, depth=2),
         "dot_d2": MaskedConfig(block_n=32, block_k=16, num_warps=4, num_stages=1, use_dot=True, split_k=3, depth=2),
         # one K chunk a program (one-shot tiles): more partials than the last program sums in one load
         "one_shot": MaskedConfig(block_n=128, block_k=8, num_warps=4, split_k=13),
         # partials summed by fp32 atomics in the self-zeroing accumulators
         "atomic": MaskedConfig(block_n=32, block_k=16, num_warps=4, split_k=5, atomic=True)}


def run(fn, *args, path="dot", **kw):
    with override_config(PATHS[path]), poison_outputs():
        return fn(*args, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("shape", [(64, 48), (100, 70)])  # (K, N); the second is ragged in both
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("path", list(PATHS))
def test_sparse_gemv_matches_reference(dtype, batch, shape, sparsity, path):
    k, n = shape
    x = torch.randn(batch, k, device=DEVICE, dtype=dtype)
    wt = (torch.randn(k, n, device=DEVICE) / k**0.5).to(dtype)
    t = quantile_thresh(x, sparsity)
    thresh = torch.tensor([t], device=DEVICE)
    y = run(sparse_gemv, x, wt, thresh, path=path)
    assert y.shape == (batch, n) and y.dtype == dtype
    assert rel_err(y, ref.sparse_gemv_ref(x, wt, t)) < TOL[dtype]


# Every path runs each case (the interpreter takes seconds a path): each dtype and each batch size once.
@pytest.mark.parametrize("dtype, batch", [(torch.float32, 1), (torch.float16, 2)])
def test_fused_qkv_norm_shift_bias_residual_match_reference(dtype, batch):
    k, nq, nkv = 96, 64, 32
    n = nq + 2 * nkv
    x = torch.randn(batch, k, device=DEVICE, dtype=dtype) * 3
    wt = (torch.randn(k, n, device=DEVICE) / k**0.5).to(dtype)
    g = (torch.rand(k, device=DEVICE) + 0.5).to(dtype)
    thresh = torch.rand(3, k, device=DEVICE)  # per-channel, one row per segment
    shift = torch.randn(3, k, device=DEVICE) * 0.2
    bias = torch.randn(n, device=DEVICE).to(dtype)
    res = torch.randn(batch, n, device=DEVICE).to(dtype)
    kw = dict(shift=shift, bias=bias, residual=res, norm_weight=g, eps=1e-5, segments=(nq, nq + nkv))
    for path in PATHS:
        y = run(sparse_gemv, x, wt, thresh, path=path, **kw)
        assert rel_err(y, ref.sparse_gemv_ref(x, wt, thresh, **kw)) < TOL[dtype]


def test_segments_use_their_own_thresholds():
    k, n = 64, 96
    x = torch.randn(1, k, device=DEVICE)
    wt = torch.randn(k, n, device=DEVICE)
    # Segment 1 keeps nothing, so its outputs are exactly zero while the others are not.
    y = run(sparse_gemv, x, wt, torch.tensor([0.0, 1e9, 0.0], device=DEVICE), segments=(32, 64))
    assert torch.all(y[:, 32:64] == 0) and torch.all(y[:, :32] != 0) and torch.all(y[:, 64:] != 0)


@pytest.mark.parametrize("batch", [4, 6])  # FMA path with per-row accumulators; tl.dot path
@pytest.mark.parametrize("path", ["fma", "dot"])
def test_batch_rows_keep_their_own_masks(batch, path):
    """The union of rows is read, but each token's result equals its own batch-1 result."""
    k, n = 128, 64
    x = torch.randn(batch, k, device=DEVICE)
    wt = torch.randn(k, n, device=DEVICE) / k**0.5
    thresh = torch.tensor([0.8], device=DEVICE)
    y = run(sparse_gemv, x, wt, thresh, path=path)
    for b in range(batch):
        yb = run(sparse_gemv, x[b:b + 1], wt, thresh, path=path)
        assert rel_err(y[b:b + 1], yb) < 1e-5


def test_threshold_zero_is_the_dense_product():
    x = torch.randn(2, 80, device=DEVICE)
    wt = torch.randn(80, 40, device=DEVICE)
    y = run(sparse_gemv, x, wt, torch.zeros(1, device=DEVICE), act="silu")
    assert rel_err(y, torch.nn.functional.silu(x @ wt)) < 1e-5


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("batch", [1, 2])
def test_nm_selection_matches_reference(nm, batch):
    k, n = 64, 32
    x = torch.randn(batch, k, device=DEVICE)
    x[:, 8:12] = 0.5  # ties inside a group: the lower index wins in both
    wt = torch.randn(k, n, device=DEVICE) / k**0.5
    shift = torch.randn(1, k, device=DEVICE) * 0.1
    y = run(sparse_gemv, x, wt, torch.zeros(1, device=DEVICE), nm=nm, shift=shift)
    assert rel_err(y, ref.sparse_gemv_ref(x, wt, 0.0, nm=nm, shift=shift)) < 1e-5
    kept = ref.nm_mask_ref(x - shift, *nm).float().mean().item()
    assert kept == pytest.approx(nm[0] / nm[1])


# Every path runs each case: the four cases hold every pair of dtype, batch size and sparsity (dense, sparse).
@pytest.mark.parametrize("dtype, batch, sparsity", [(torch.float32, 1, 0.6), (torch.float32, 3, 0.0),
                                                    (torch.float16, 1, 0.0), (torch.float16, 3, 0.6)])
def test_gated_mlp_matches_reference(dtype, batch, sparsity):
    k, n = 64, 80
    x = torch.randn(batch, k, device=DEVICE, dtype=dtype) * 2
    wg = (torch.randn(k, n, device=DEVICE) / k**0.5).to(dtype)
    wu = (torch.randn(k, n, device=DEVICE) / k**0.5).to(dtype)
    g = (torch.rand(k, device=DEVICE) + 0.5).to(dtype)
    xn = ref.rmsnorm_ref(x, g)
    t = quantile_thresh(xn, sparsity)
    thresh = torch.tensor([t, t * 1.3], device=DEVICE)  # gate and up differ
    shift = torch.randn(2, k, device=DEVICE) * 0.1
    bias = torch.randn(2, n, device=DEVICE).to(dtype)
    kw = dict(norm_weight=g, shift=shift, bias=bias)
    want = ref.sparse_gated_mlp_ref(x, wg, wu, thresh, **kw)
    for path in PATHS:
        y = run(sparse_gated_mlp, x, wg, wu, thresh, path=path, **kw)
        assert rel_err(y, want) < TOL[dtype]


@pytest.mark.parametrize("batch", [1, 3])
def test_gelu_tanh_epilogue_matches_the_formula(batch):
    check_gelu_tanh(lambda fn, *a, cfg, **kw: run(fn, *a, path=cfg, **kw), ["dot", "fma", "atomic"], batch, DEVICE)


@pytest.mark.parametrize("use_dot", [False, True])
def test_atomic_partials_leave_the_accumulators_zero_for_the_next_launch(use_dot):
    """Launches in a row (a gemv, then a gate/up pair of another width, then the gemv again) each equal the
    reference: the last program of every tile zeroed its sums, so nothing carries over."""
    from actsparse.kernels.configs import atomic_accumulator

    cfg = MaskedConfig(block_n=16, block_k=16, num_warps=4, num_stages=1, use_dot=use_dot, split_k=4, atomic=True)
    k, n, n2 = 96, 40, 24
    x = torch.randn(2, k, device=DEVICE)
    wt = torch.randn(k, n, device=DEVICE) / k**0.5
    wg, wu = (torch.randn(k, n2, device=DEVICE) / k**0.5 for _ in range(2))
    thresh = torch.tensor([quantile_thresh(x, 0.5)], device=DEVICE)
    want = ref.sparse_gemv_ref(x, wt, thresh)
    with override_config(cfg), poison_outputs():
        first = sparse_gemv(x, wt, thresh)
        pair = sparse_gated_mlp(x, wg, wu, thresh.expand(2).contiguous())
        again = sparse_gemv(x, wt, thresh)
    assert rel_err(first, want) < 1e-5 and rel_err(again, want) < 1e-5
    assert rel_err(pair, ref.sparse_gated_mlp_ref(x, wg, wu, thresh.expand(2))) < 1e-5
    assert not atomic_accumulator(x.device).any()


def test_bad_arguments_are_rejected():
    x = torch.randn(2, 32, device=DEVICE)
    wt = torch.randn(32, 16, device=DEVICE)
    t = torch.zeros(1, device=DEVICE)
    with pytest.raises(ValueError, match="transposed weight"):
        sparse_gemv(x, wt.t().contiguous(), t)
    with pytest.raises(ValueError, match="row-major"):
        sparse_gemv(x, torch.randn(16, 32, device=DEVICE).t(), t)
    with pytest.raises(ValueError, match="2-D"):
        sparse_gemv(x[0], wt, t)
    with pytest.raises(ValueError, match="float32"):
        sparse_gemv(x, wt, t.half())
    with pytest.raises(ValueError, match="one row per segment"):
        sparse_gemv(x, wt, torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="segments"):
        sparse_gemv(x, wt, torch.zeros(3, device=DEVICE), segments=(12, 4))
    with pytest.raises(ValueError, match="multiples of 16"):
        sparse_gemv(x, torch.randn(32, 40, device=DEVICE), torch.zeros(2, device=DEVICE), segments=(20,))
    with pytest.raises(ValueError, match="N:M|nm must be"):
        sparse_gemv(x, wt, t, nm=(3, 6))
    with pytest.raises(ValueError, match="act must be"):
        sparse_gemv(x, wt, t, act="gelu")
    with pytest.raises(ValueError, match="residual"):
        sparse_gemv(x, wt, t, residual=torch.zeros(1, 16, device=DEVICE))
    with pytest.raises(ValueError, match="same shape"):
        sparse_gated_mlp(x, wt, torch.randn(32, 8, device=DEVICE), torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="bias"):
        sparse_gated_mlp(x, wt, wt, torch.zeros(2, device=DEVICE), bias=torch.zeros(16, device=DEVICE))


def test_registered_as_torch_library_custom_ops():
    x = torch.randn(2, 32, device=DEVICE)
    wt = torch.randn(32, 16, device=DEVICE)
    thresh = torch.full((1, 32), 0.3, device=DEVICE)  # the op itself takes [segments, K]
    torch.library.opcheck(torch.ops.actsparse.sparse_gemv.default,
                          (x, wt, thresh, None, None, None, None, 1e-6, 0, [], 0, 0),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------ GPU: bf16, decode shapes, graphs, compile
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(4096, 6144), (14336, 4096), (4096, 1024), (1024, 4096), (14336, 512)])
def test_gpu_decode_shapes_default_configs(dtype, batch, sparsity, shape):
    k, n = shape
    x = torch.randn(batch, k, device="cuda", dtype=dtype)
    wt = (torch.randn(k, n, device="cuda") / k**0.5).to(dtype)
    t = quantile_thresh(x, sparsity)
    res = torch.randn(batch, n, device="cuda", dtype=dtype)
    with poison_outputs():
        y = sparse_gemv(x, wt, torch.tensor([t], device="cuda"), residual=res)
    assert rel_err(y, ref.sparse_gemv_ref(x, wt, t, residual=res)) < TOL[dtype]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_gpu_fused_qkv_and_gated_mlp_llama_shapes(dtype, batch):
    d, nq, nkv, inter = 4096, 4096, 1024, 1024  # intermediate cut to keep the test short
    x = torch.randn(batch, d, device="cuda", dtype=dtype)
    g = (torch.rand(d, device="cuda") + 0.5).to(dtype)
    wqkv = (torch.randn(d, nq + 2 * nkv, device="cuda") / d**0.5).to(dtype)
    t = torch.tensor([0.7, 0.5, 0.9], device="cuda")
    kw = dict(norm_weight=g, segments=(nq, nq + nkv))
    with poison_outputs():
        y = sparse_gemv(x, wqkv, t, **kw)
    assert rel_err(y, ref.sparse_gemv_ref(x, wqkv, t, **kw)) < TOL[dtype]
    wg = (torch.randn(d, inter, device="cuda") / d**0.5).to(dtype)
    wu = (torch.randn(d, inter, device="cuda") / d**0.5).to(dtype)
    with poison_outputs():
        h = sparse_gated_mlp(x, wg, wu, t[:2], norm_weight=g)
    assert rel_err(h, ref.sparse_gated_mlp_ref(x, wg, wu, t[:2], norm_weight=g)) < TOL[dtype]


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_replay_and_torch_compile_match_eager():
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    wt = (torch.randn(4096, 4096, device="cuda") / 64).to(torch.bfloat16)
    t = torch.tensor([0.6], device="cuda")
    eager = sparse_gemv(x, wt, t)
    sparse_gemv(x, wt, t)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sparse_gemv(x, wt, t)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert rel_err(captured, sparse_gemv(x, wt, t)) < 1e-6
    compiled = torch.compile(lambda a: sparse_gemv(a, wt, t), fullgraph=True)
    assert rel_err(compiled(x), sparse_gemv(x, wt, t)) < 1e-6
    assert rel_err(eager, eager) == 0
