"""Per-token Top-K levels (`topk_thresholds`) against torch.kthvalue on fresh random inputs: plain, normalised
and gated inputs, WINA's weighted scores, the edge counts, ties, and every refusal."""

import pytest
import torch

from actsparse.kernels import ref, topk_thresholds

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, params=[16, 8], ids=["16-warps", "8-warps"])
def warps(request, monkeypatch):
    """Every test with long rows on 16 warps (the default) and on 8."""
    from actsparse.kernels import topk

    monkeypatch.setattr(topk, "WARPS_LARGE", request.param)


def _inputs(k: int, mode: str, dtype=torch.float32):
    if mode == "gated":
        return torch.randn(2, 1, k, device=DEVICE, dtype=dtype), {"gated": "silu"}
    x = torch.randn(1, k, device=DEVICE, dtype=dtype) * 3
    if mode == "norm":
        return x, {"norm_weight": (torch.rand(k, device=DEVICE) + 0.5).to(dtype), "eps": 1e-5}
    return x, {}


def _input_values(x, kw):
    if "gated" in kw:
        return torch.nn.functional.silu(x[0].float()) * x[1].float()
    if "norm_weight" in kw:
        return ref.rmsnorm_ref(x, kw["norm_weight"], kw["eps"])
    return x.float()


@pytest.mark.parametrize("mode", ["plain", "norm", "gated"])
@pytest.mark.parametrize("k", [96, 4096, 14336])
def test_levels_keep_exactly_the_others(mode, k):
    """Each row's level is the n_zero-th smallest |input|: |input| > level keeps K − n_zero channels, and the level
    equals the reference's."""
    x, kw = _inputs(k, mode)
    n_zero = torch.tensor([k // 4, k // 2, k - 3], device=DEVICE, dtype=torch.int32)
    out = torch.full((3,), float("nan"), device=DEVICE)
    topk_thresholds(x, n_zero, out, **kw)
    want = ref.topk_thresholds_ref(x, n_zero, torch.empty_like(out), **kw)
    assert torch.allclose(out, want, rtol=1e-5, atol=0)
    v = _input_values(x, kw).abs().reshape(-1)
    for s, nz in enumerate(n_zero.tolist()):
        # rounding of the norm may move one channel across the cut, never more
        assert abs(int((v > out[s]).sum()) - (k - nz)) <= (1 if mode != "plain" else 0)


def test_weighted_scores_give_per_channel_levels():
    """WINA's score |x_i|·w_i: the level T over the scores, written per channel (∞ where w_i = 0) so that
    |x_i| > t_i is exactly fl(|x_i|·w_i) > T: the K − n_zero channels of largest score, the cut included."""
    k = 512
    x = torch.randn(1, k, device=DEVICE)
    w = torch.rand(2, k, device=DEVICE) + 0.1
    w[1, :7] = 0.0  # never kept
    n_zero = torch.tensor([100, 300], device=DEVICE, dtype=torch.int32)
    out = torch.zeros(2, k, device=DEVICE)
    topk_thresholds(x, n_zero, out, score_w=w)
    want = ref.topk_thresholds_ref(x, n_zero, torch.empty_like(out), score_w=w)
    assert torch.isinf(out[1, :7]).all() and torch.equal(out, want)
    for s, nz in enumerate(n_zero.tolist()):
        kept = x.abs().reshape(-1) > out[s]
        score = x.abs().reshape(-1) * w[s]
        assert torch.equal(kept, score > score.kthvalue(nz).values) and int(kept.sum()) == k - nz


def test_edge_counts_and_ties():
    """n_zero 0 keeps every nonzero channel (level 0), K keeps none (level = the largest score); equal scores at
    the cut are all dropped, as torch's rule drops them."""
    x = torch.tensor([[0.5, -2.0, 0.5, 3.0, -0.5, 1.0, 0.0, 4.0]], device=DEVICE)
    out = torch.empty(4, device=DEVICE)
    topk_thresholds(x, torch.tensor([0, 8, 2, 3], device=DEVICE, dtype=torch.int32), out)
    assert out.tolist() == [0.0, 4.0, 0.5, 0.5]  # 2 or 3 zeroed: the level 0.5 drops all three 0.5s


def test_fp16_input_and_fresh_levels_each_call():
    k = 1000
    for _ in range(3):
        x = torch.randn(1, k, device=DEVICE, dtype=torch.float16)
        n_zero = torch.randint(1, k, (2,), device=DEVICE, dtype=torch.int32)
        out = torch.empty(2, device=DEVICE)
        topk_thresholds(x, n_zero, out)
        assert torch.equal(out, ref.topk_thresholds_ref(x, n_zero, torch.empty_like(out)))


def test_every_refusal_names_the_problem():
    x = torch.randn(1, 64, device=DEVICE)
    nz = torch.tensor([8], device=DEVICE, dtype=torch.int32)
    out = torch.empty(1, device=DEVICE)
    with pytest.raises(ValueError, match="per-token Top-K runs one token at a time"):
        topk_thresholds(torch.randn(2, 64, device=DEVICE), nz, out)
    with pytest.raises(ValueError, match=r"at most 16384 channels, got 16400"):
        topk_thresholds(torch.randn(1, 16400, device=DEVICE), nz, out)
    with pytest.raises(ValueError, match="n_zero must be int32"):
        topk_thresholds(x, nz.long(), out)
    with pytest.raises(ValueError, match=r"out must be float32 \[S=1\]"):
        topk_thresholds(x, nz, torch.empty(2, device=DEVICE))
    with pytest.raises(ValueError, match="gated must be None, 'silu' or 'gelu_tanh'"):
        topk_thresholds(torch.randn(2, 1, 64, device=DEVICE), nz, out, gated="relu")
    with pytest.raises(ValueError, match=r"\[2, 1, K\]"):
        topk_thresholds(x, nz, out, gated="silu")
    with pytest.raises(ValueError, match=r"norm_weight must be \[K=64\]"):
        topk_thresholds(x, nz, out, norm_weight=torch.ones(32, device=DEVICE))
    with pytest.raises(ValueError, match=r"score_w must be float32 \[S=1, K=64\]"):
        topk_thresholds(x, nz, out, score_w=torch.ones(64, device=DEVICE))
    with pytest.raises(ValueError, match="per channel: out must be"):
        topk_thresholds(x, nz, out, score_w=torch.ones(1, 64, device=DEVICE))
