"""The expert-indexed kernels (`experts=`: the one-shot tiles, and at batch 1 the gather walk): a mixture-of-experts
layer's routed gate|up sums and its gated down projection, reading each expert's weights from a device tensor of
ids, against the plain torch formula."""

import pytest
import torch

from actsparse.kernels import ref, sparse_gated_mlp, sparse_gemv

from .checks import quantile_thresh, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _moe(b: int, top: int, e: int = 6, k: int = 64, i: int = 48, d: int = 80, dtype=torch.float32):
    """Random stacked experts, inputs, ids drawn without repeats per token, and routing weights."""
    x = torch.randn(b, k, device=DEVICE) * 2
    wg, wu = ((torch.randn(e, k, i, device=DEVICE) / k**0.5).to(dtype) for _ in range(2))
    wd = (torch.randn(e, i, d, device=DEVICE) / i**0.5).to(dtype)
    idx = torch.stack([torch.randperm(e)[:top] for _ in range(b)]).to(DEVICE)
    w = torch.rand(b, top, device=DEVICE)
    return x, wg, wu, wd, idx, w


@pytest.mark.parametrize("batch,top,impl", [(1, 2, "oneshot"), (1, 4, "oneshot"), (2, 3, "oneshot"),
                                            (1, 2, "gather"), (1, 4, "gather")])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_routed_pair_sums_and_gated_down_match_the_formula(batch, top, impl, sparsity):
    """gate|up of each routed expert as raw sums (norm fused, gate and up selecting different rows), then down
    forming act(gate)·up, selecting it, scaling by the routing weight and adding into the fp32 stream: on the
    one-shot tiles, and at batch 1 on the gather walk (x's two lists shared by every routed expert; down: each
    routed expert's act(gate)·up its own list)."""
    x, wg, wu, wd, idx, w = _moe(batch, top, k=128 if impl == "gather" else 64)
    g = torch.rand(x.shape[1], device=DEVICE) + 0.5
    t = quantile_thresh(ref.rmsnorm_ref(x, g), sparsity)
    th = torch.tensor([t, t * 1.3], device=DEVICE)
    sums = torch.full((batch, top, 2, wg.shape[2]), float("nan"), device=DEVICE)
    sparse_gated_mlp(x, wg, wu, th, norm_weight=g, eps=1e-6, experts=idx, out=sums, impl=impl)
    want = ref.experts_gated_mlp_ref(x, wg, wu, th, idx, norm_weight=g, eps=1e-6)
    # the plain formula, written out: expert e's gate rows of the selected normed input
    xn = ref.rmsnorm_ref(x, g)
    e0 = int(idx[0, 0])
    assert torch.allclose(want[0, 0, 0], (xn[0] * (xn[0].abs() > th[0])) @ wg[e0], atol=1e-5)
    assert rel_err(sums, want) < 1e-5
    h = torch.randn(batch, wd.shape[2], device=DEVICE)
    h0 = h.clone()
    act = torch.nn.functional.silu(sums[:, :, 0]) * sums[:, :, 1]
    td = torch.tensor([quantile_thresh(act, sparsity)], device=DEVICE)
    sparse_gemv(sums, wd, td, gated="silu", accumulate=h, experts=idx, expert_weights=w, impl=impl)
    add = ref.experts_gemv_ref(sums, wd, td, idx, expert_weights=w, gated="silu")
    formula = torch.stack([sum(w[b_, j] * (act[b_, j] * (act[b_, j].abs() > td)) @ wd[idx[b_, j]] for j in range(top))
                           for b_ in range(batch)])
    assert rel_err(add, formula) < 1e-5
    assert rel_err(h - h0, add) < 1e-5


def test_per_expert_thresholds_select_each_routed_expert_by_its_own_rows():
    """thresh [E, S, K]: each routed expert selects its input with its own rows (a fitted plan's per-expert sites),
    gate|up and down alike, against the formula written out per token and expert."""
    e, k, i = 6, 64, 48
    x, wg, wu, wd, idx, w = _moe(2, 3, e=e, k=k, i=i)
    tg = torch.rand(e, 2, device=DEVICE)[:, :, None].expand(e, 2, k)  # per-expert scalars, expanded along K
    sums = torch.full((2, 3, 2, i), float("nan"), device=DEVICE)
    sparse_gated_mlp(x, wg, wu, tg, experts=idx, out=sums)
    td = torch.rand(e, 1, i, device=DEVICE) * 0.3  # per-expert, per-channel
    h = torch.zeros(2, wd.shape[2], device=DEVICE)
    sparse_gemv(sums, wd, td, gated="silu", accumulate=h, experts=idx, expert_weights=w)
    for b in range(2):
        want = torch.zeros(wd.shape[2], device=DEVICE)
        for j in range(3):
            ex = int(idx[b, j])
            g, u = ((x[b] * (x[b].abs() > tg[ex, m])) @ wt[ex] for m, wt in ((0, wg), (1, wu)))
            assert rel_err(sums[b, j], torch.stack([g, u])) < 1e-5
            a = torch.nn.functional.silu(g) * u
            want += w[b, j] * (a * (a.abs() > td[ex, 0])) @ wd[ex]
        assert rel_err(h[b], want) < 1e-5
    with pytest.raises(ValueError, match=r"per-expert thresholds must be a float32 \[6, 1, 48\] tensor"):
        sparse_gemv(sums, wd, td[:2], gated="silu", accumulate=h, experts=idx)


@pytest.mark.parametrize("batch,impl", [(2, "oneshot"), (1, "gather")])
def test_a_single_expert_matrix_writes_each_token_its_routed_sum(batch, impl):
    """Not gated, out=: the buffer is zeroed first and receives Σ_t W[e_t]·x_s (routing weights 1)."""
    x, _, _, wd, idx, _ = _moe(batch, 3, k=48)
    th = torch.tensor([0.4], device=DEVICE)
    y = torch.full((batch, wd.shape[2]), float("nan"), device=DEVICE)
    sparse_gemv(x, wd, th, out=y, experts=idx, impl=impl)
    xs = x * (x.abs() > 0.4)
    want = torch.stack([sum(xs[b] @ wd[idx[b, j]] for j in range(3)) for b in range(batch)])
    assert rel_err(y, want) < 1e-5


@pytest.mark.parametrize("rule", ["threshold", "nm"])
def test_gather_walk_with_several_k_slices(rule):
    """The gather walk's routed experts where K is split into slices (Qwen3-30B-A3B's gate|up: 2048 over 1024-channel
    slices): the pair's partials meet by atomics in the sums its compaction pass zeroed, down's slices add into the
    stream; N:M rules too."""
    from actsparse.kernels import GatherConfig, override_config

    x, wg, wu, wd, idx, w = _moe(1, 3, k=128, i=96)
    nm = (2, 4) if rule == "nm" else None
    th = torch.tensor([0.4, 0.6], device=DEVICE)
    td = torch.tensor([0.2], device=DEVICE)
    sums = torch.full((1, 3, 2, 96), float("nan"), device=DEVICE)
    h = torch.randn(1, wd.shape[2], device=DEVICE)
    h0 = h.clone()
    with override_config(GatherConfig(block_n=16, seg_k=32, block_k=16)):
        sparse_gated_mlp(x, wg, wu, th, experts=idx, out=sums, impl="gather", nm=nm)
        sparse_gemv(sums, wd, td, gated="silu", accumulate=h, experts=idx, expert_weights=w, impl="gather", nm=nm)
    assert rel_err(sums, ref.experts_gated_mlp_ref(x, wg, wu, th, idx, nm=nm)) < 1e-5
    want = ref.experts_gemv_ref(sums, wd, td, idx, expert_weights=w, gated="silu", nm=nm)
    assert rel_err(h - h0, want) < 1e-5


@pytest.mark.parametrize("impl", ["oneshot", "gather"])
def test_bf16_experts_match_the_reference(impl):
    x, wg, wu, wd, idx, w = _moe(1, 2, dtype=torch.bfloat16)
    x = x.to(torch.bfloat16)
    th = torch.tensor([0.5, 0.5], device=DEVICE)
    sums = torch.empty(1, 2, 2, wg.shape[2], device=DEVICE)
    sparse_gated_mlp(x, wg, wu, th, experts=idx[0], out=sums, impl=impl)   # a [T] id tensor: one token
    assert rel_err(sums, ref.experts_gated_mlp_ref(x, wg, wu, th, idx)) < 1e-3
    y = torch.empty(1, wd.shape[2], device=DEVICE)
    wb = w.to(torch.bfloat16)  # routing weights in the model's dtype, as Qwen's router hands them on
    sparse_gemv(sums, wd, th[:1], gated="silu", out=y, experts=idx, expert_weights=wb, impl=impl)
    assert rel_err(y, ref.experts_gemv_ref(sums, wd, th[:1], idx, expert_weights=wb, gated="silu")) < 1e-3


def test_what_experts_cannot_take_is_refused():
    x, wg, wu, wd, idx, w = _moe(1, 2)
    th2, th1 = torch.zeros(2, device=DEVICE), torch.zeros(1, device=DEVICE)
    sums = torch.empty(1, 2, 2, wg.shape[2], device=DEVICE)
    h = torch.zeros(1, wd.shape[2], device=DEVICE)
    with pytest.raises(ValueError, match="experts must be a contiguous int32 or int64"):
        sparse_gated_mlp(x, wg, wu, th2, experts=idx.float(), out=sums)
    with pytest.raises(ValueError, match="wt_gate must be the stacked transposed expert weights"):
        sparse_gated_mlp(x, wg[0], wu[0], th2, experts=idx, out=sums)
    with pytest.raises(ValueError, match="give accumulate= or out="):
        sparse_gated_mlp(x, wg, wu, th2, experts=idx)
    with pytest.raises(ValueError, match="runs on the one-shot tiles or the gather walk"):
        sparse_gated_mlp(x, wg, wu, th2, experts=idx, out=sums, impl="masked")
    x2, _, _, _, idx2, _ = _moe(2, 2)
    with pytest.raises(ValueError, match="on the gather walk runs batch 1"):
        sparse_gated_mlp(x2, wg, wu, th2, experts=idx2, out=torch.empty(2, 2, 2, wg.shape[2], device=DEVICE),
                         impl="gather")
    with pytest.raises(ValueError, match="one rule for every expert"):
        sparse_gated_mlp(x, wg, wu, torch.zeros(wg.shape[0], 2, x.shape[1], device=DEVICE), experts=idx, out=sums,
                         impl="gather")
    with pytest.raises(ValueError, match="experts= takes no shift, bias"):
        sparse_gated_mlp(x, wg, wu, th2, experts=idx, out=sums, shift=torch.zeros(2, x.shape[1], device=DEVICE),
                         bias=torch.zeros(2, wg.shape[2], device=DEVICE))
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 \[1, 2, 2, 48\]"):
        sparse_gated_mlp(x, wg, wu, th2, experts=idx, out=sums[:, :1])
    with pytest.raises(ValueError, match="expert_weights must be a contiguous float tensor shaped like experts"):
        sparse_gemv(sums, wd, th1, gated="silu", accumulate=h, experts=idx, expert_weights=w[:, :1])
    with pytest.raises(ValueError, match=r"x must be a contiguous float32 \[1, 2, 2, 48\]"):
        sparse_gemv(sums[0], wd, th1, gated="silu", accumulate=h, experts=idx)
    with pytest.raises(ValueError, match="expert_weights= scales routed experts: it needs experts="):
        sparse_gemv(x, wd[0][:, :64].t().contiguous(), th1, accumulate=h, expert_weights=w)
    with pytest.raises(ValueError, match="experts= takes no residual"):
        sparse_gemv(sums, wd, th1, gated="silu", accumulate=h, experts=idx, residual=h)
    with pytest.raises(ValueError, match=r"accumulate must be a contiguous float32 \[1, 80\]"):
        sparse_gemv(sums, wd, th1, gated="silu", accumulate=h.double(), experts=idx)
