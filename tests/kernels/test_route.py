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
