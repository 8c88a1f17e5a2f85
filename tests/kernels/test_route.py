"""moe_route (router logits to top-k expert ids and weights, one launch) against transformers' routing formula."""

import pytest
import torch

from actsparse.kernels import moe_route, ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _logits(b: int, e: int, dtype) -> torch.Tensor:
    """Distinct logits (a random permutation of spaced values, plus noise): no ties for the order to hinge on."""
    base = torch.stack([torch.randperm(e) for _ in range(b)]).float() * 0.37
    return (base + torch.rand(b, e) * 0.1).to(DEVICE, dtype)


@pytest.mark.parametrize("e,top_k", [(8, 2), (60, 4), (128, 8), (16, 1), (6, 3)])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                           (torch.float16, torch.float32)])
def test_ids_and_weights_equal_softmax_top_k_and_renormalising(e, top_k, renorm, dtype, w_dtype):
    b = 3
    logits = _logits(b, e, dtype)
    idx, w = moe_route(logits, top_k, renorm=renorm, w_dtype=w_dtype)
    probs = torch.softmax(logits.float(), dim=-1)  # the formula, written out
    want_w, want_idx = probs.sort(dim=-1, descending=True)
    want_w, want_idx = want_w[:, :top_k], want_idx[:, :top_k]
    if renorm:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    assert idx.dtype == torch.int64 and w.dtype == w_dtype and idx.shape == w.shape == (b, top_k)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(w.float(), want_w.to(w_dtype).float(), rtol=2e-3 if w_dtype != torch.float32 else 1e-5,
                               atol=1e-6)
    ridx, rw = ref.moe_route_ref(logits, top_k, renorm=renorm, w_dtype=w_dtype)
    assert torch.equal(ridx, idx) and torch.allclose(rw.float(), w.float(), rtol=2e-3, atol=1e-6)


def test_equal_logits_go_to_the_lowest_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]], device=DEVICE)
    idx, w = moe_route(logits, 2, renorm=True)
    assert idx.tolist() == [[1, 2]] and torch.allclose(w, torch.full_like(w, 0.5))


def test_bad_arguments_are_refused():
    logits = _logits(2, 8, torch.float32)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, E=8\]"):
        moe_route(logits, 9, renorm=True)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        moe_route(logits[0], 2, renorm=True)
    with pytest.raises(ValueError, match="w_dtype must be"):
        moe_route(logits, 2, renorm=True, w_dtype=torch.int32)


def _spread_router(e: int, d: int, x: torch.Tensor, dtype) -> torch.Tensor:
    """A router weight [E, D] whose logits for x are a random permutation of well-spaced values (plus a little
    noise orthogonal to nothing in particular): no near-tie for the GEMV's summation order to flip."""
    c = torch.randperm(e).float() * 0.37 + 0.05
    w = c[:, None] * x.float().cpu()[0][None, :] / x.float().cpu()[0].pow(2).sum()
    return (w + torch.randn(e, d) * 1e-4).to(DEVICE, dtype).contiguous()


@pytest.mark.parametrize("e,top_k", [(8, 2), (60, 4), (128, 8)])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_router_gemv_in_the_same_launch_equals_linear_then_route(e, top_k, renorm, dtype):
    """`router=`: the logits x·routerᵀ (rounded to x's dtype, as F.linear's) formed in the routing launch, batch 3,
    random tokens: the same ids and weights as F.linear then the routing; twice (the sums it borrows zero again)."""
    d = 96
    x = torch.randn(3, d, device=DEVICE).to(dtype)
    for _ in range(2):
        router = _spread_router(e, d, x[:1], dtype) if dtype != torch.float32 else \
            (torch.randn(e, d, device=DEVICE) / d**0.5).to(dtype)
        idx, w = moe_route(x, top_k, renorm=renorm, w_dtype=torch.float32, router=router)
        logits = torch.nn.functional.linear(x.float(), router.float()).to(dtype)
        want_idx, want_w = ref.moe_route_ref(logits, top_k, renorm=renorm, w_dtype=torch.float32)
        assert torch.equal(idx[:1], want_idx[:1]) and idx.shape == (3, top_k)
        if dtype == torch.float32:
            assert torch.equal(idx, want_idx)
            torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(w[:1], want_w[:1], rtol=2e-3, atol=1e-5)


def test_router_arguments_are_checked():
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"router must be \[E, D=16\]"):
        moe_route(x, 2, renorm=True, router=torch.randn(8, 12, device=DEVICE))
    with pytest.raises(ValueError, match=r"top_k must be in \[1, E=8\]"):
        moe_route(x, 9, renorm=True, router=torch.randn(8, 16, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_qwen3_moe_router_shapes_bf16_under_graph_replay():
    """Qwen3-30B-A3B's router (128 experts × 2048, top 8), bf16, in a CUDA graph replayed on fresh tokens."""
    d, e = 2048, 128
    x = torch.randn(1, d, device="cuda").bfloat16()
    router = _spread_router(e, d, x, torch.bfloat16)
    moe_route(x, 8, renorm=True, w_dtype=torch.bfloat16, router=router)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx, w = moe_route(x, 8, renorm=True, w_dtype=torch.bfloat16, router=router)
    for _ in range(4):
        x.copy_((x.float() * (1 + 0.01 * torch.randn_like(x.float()))).bfloat16())
        graph.replay()
        want_idx, want_w = ref.moe_route_ref(torch.nn.functional.linear(x, router), 8, renorm=True,
                                             w_dtype=torch.bfloat16)
        assert torch.equal(idx, want_idx)
        torch.testing.assert_close(w.float(), want_w.float(), rtol=1e-2, atol=1e-3)
