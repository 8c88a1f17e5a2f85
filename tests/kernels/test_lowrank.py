"""lowrank_add (R-Sparse's low-rank path, two launches an op) against its torch reference and the formula written
out: fresh random factors of unequal ranks, scalar and per-channel thresholds, the stream's RMSNorm, a gate/up
pair's act(gate)·up, a pair's output layout, and back-to-back launches (the sums zero themselves)."""

import pytest
import torch

from actsparse.kernels import lowrank_add, pack_lowrank, poison_outputs
from actsparse.kernels import ref

from .checks import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _factors(k: int, widths, ranks, dtype):
    return [None if r == 0 else ((torch.randn(k, r, device=DEVICE) / k**0.5).to(dtype),
                                 (torch.randn(n, r, device=DEVICE) / r**0.5).to(dtype)) for n, r in zip(widths, ranks)]


def _want(xhat, t, factors, widths):
    """The formula written out, per site: ((x̂ ⊙ 1[0 < |x̂| ≤ t_s]) V_s) (U S)_sᵀ."""
    outs = []
    for s, (f, n) in enumerate(zip(factors, widths)):
        if f is None:
            outs.append(xhat.new_zeros(xhat.shape[0], n))
            continue
        ts = t[s] if t.dim() == 2 else t[s:s + 1]
        keep = (xhat.abs() <= ts) & (xhat != 0)
        outs.append(((xhat * keep) @ f[0].float()) @ f[1].float().t())
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
def test_sites_side_by_side_with_the_norm_add_into_the_sums(dtype, batch):
    k, widths, ranks = 96, (64, 16, 16), (12, 5, 0)   # q|k|v: unequal ranks, one site without factors
    factors = _factors(k, widths, ranks, dtype)
    v, ust, rk = pack_lowrank(factors, widths, dtype, torch.device(DEVICE))
    g = torch.rand(k, device=DEVICE) + 0.5
    for per_channel in (False, True):
        for _ in range(2):  # back to back: the first launch's sums must not leak into the second
            x = torch.randn(batch, k, device=DEVICE)
            xhat = ref.rmsnorm_ref(x, g, 1e-5)
            q = torch.quantile(xhat.abs().flatten(), torch.tensor([0.3, 0.5, 0.7], device=DEVICE))
            t = (q[:, None] * (0.5 + torch.rand(3, k, device=DEVICE))) if per_channel else q
            base = torch.randn(batch, sum(widths), device=DEVICE)
            out = base.clone()
            lowrank_add(x, t.float().contiguous(), v, ust, rk, out, norm_weight=g, eps=1e-5, segments=(64, 80))
            want = base + _want(xhat, t, factors, widths)
            assert rel_err(out - base, want - base) < (1e-5 if dtype == torch.float32 else 2e-3)
            assert torch.equal(out[:, 80:], base[:, 80:])  # v has no factors: untouched
            got_ref = ref.lowrank_add_ref(x, t.float(), v, ust, rk, base.clone(), norm_weight=g, eps=1e-5,
                                          segments=(64, 80))
            assert rel_err(got_ref - base, want - base) < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_input_from_a_pairs_raw_sums_into_the_stream(act):
    """down's path: x̂ = act(gate)·up from the pair's raw sums [2, B, I], added into an fp32 stream [B, D]."""
    i, d, b = 80, 48, 2
    factors = _factors(i, (d,), (7,), torch.float32)
    v, ust, rk = pack_lowrank(factors, (d,), torch.float32, torch.device(DEVICE))
    sums = torch.randn(2, b, i, device=DEVICE)
    h = ref.act_ref(sums[0], act) * sums[1]
    t = torch.quantile(h.abs().flatten(), 0.6).reshape(1)
    stream = torch.randn(b, d, device=DEVICE)
    out = lowrank_add(sums, t, v, ust, rk, stream.clone(), gated=act)
    assert rel_err(out - stream, _want(h, t, factors, (d,))) < 1e-5


def test_a_pairs_output_layout_and_a_model_dtype_output():
    """gate|up: the two sites' outputs land in the pair's [2, B, I] sums; an fp16 output is read, added in fp32
    and rounded once."""
    k, i, b = 64, 40, 2
    factors = _factors(k, (i, i), (9, 4), torch.float32)
    v, ust, rk = pack_lowrank(factors, (i, i), torch.float32, torch.device(DEVICE))
    x = torch.randn(b, k, device=DEVICE)
    t = torch.tensor([0.4, 0.9], device=DEVICE)
    pair = torch.randn(2, b, i, device=DEVICE)
    out = lowrank_add(x, t, v, ust, rk, pair.clone(), segments=(i,))
    add = _want(x, t, factors, (i, i))
    assert rel_err(out - pair, torch.stack([add[:, :i], add[:, i:]])) < 1e-5
    y16 = torch.randn(b, 2 * i, device=DEVICE).half()
    with poison_outputs():
        got = lowrank_add(x, t, v, ust, rk, y16.clone(), segments=(i,))
    assert rel_err(got.float(), (y16.float() + add).half().float()) < 1e-3


def test_few_programs_each_walk_several_row_blocks(monkeypatch):
    """The second launch has a few programs per SM, each over every num_programs-th block of output rows (one
    SM here: two programs over many blocks), all of them counted before the sums are zeroed."""
    from actsparse.kernels import lowrank as lr

    monkeypatch.setattr(lr, "num_sms", lambda device: 1)
    k, widths, ranks = 40, (200, 64, 64), (5, 3, 2)   # 328 rows: 6 blocks of 64 over 2 programs
    factors = _factors(k, widths, ranks, torch.float32)
    v, ust, rk = pack_lowrank(factors, widths, torch.float32, torch.device(DEVICE))
    for _ in range(2):
        x = torch.randn(1, k, device=DEVICE)
        t = torch.tensor([0.5, 1.0, 2.0], device=DEVICE)
        base = torch.randn(1, sum(widths), device=DEVICE)
        got = lowrank_add(x, t, v, ust, rk, base.clone(), segments=(200, 264))
        assert rel_err(got - base, _want(x, t, factors, widths)) < 1e-5


def test_threshold_views_and_rank_zero():
    """Per-channel thresholds given as a broadcast view (stride 0 along K) read as their values; factors of rank
    0 on every site add nothing (no launch)."""
    k, n = 48, 20
    factors = _factors(k, (n,), (6,), torch.float32)
    v, ust, rk = pack_lowrank(factors, (n,), torch.float32, torch.device(DEVICE))
    x = torch.randn(2, k, device=DEVICE)
    view = torch.tensor([0.7], device=DEVICE).reshape(1, 1).expand(1, k)
    base = torch.randn(2, n, device=DEVICE)
    got = lowrank_add(x, view, v, ust, rk, base.clone())
    assert rel_err(got - base, _want(x, view.contiguous(), factors, (n,))) < 1e-5
    zero = [(torch.zeros(k, 0, device=DEVICE), torch.zeros(n, 0, device=DEVICE))]
    v0, u0, r0 = pack_lowrank(zero, (n,), torch.float32, torch.device(DEVICE))
    assert torch.equal(lowrank_add(x, view, v0, u0, r0, base.clone()), base)


def test_bad_arguments_are_refused_with_the_reason():
    k = 32
    v, ust, rk = pack_lowrank(_factors(k, (16, 8), (4, 2), torch.float32), (16, 8), torch.float32,
                              torch.device(DEVICE))
    x, out, t = torch.randn(1, k, device=DEVICE), torch.zeros(1, 24, device=DEVICE), torch.zeros(2, device=DEVICE)
    with pytest.raises(ValueError, match="segments must be the 1 increasing boundaries of 2 sites"):
        lowrank_add(x, t, v, ust, rk, out)
    with pytest.raises(ValueError, match=r"thresh must be float32 \[2\] or \[2, 32\]"):
        lowrank_add(x, t.double(), v, ust, rk, out, segments=(16,))
    with pytest.raises(ValueError, match=r"out must be \[1, 24\] or a pair's \[2, 1, 12\]"):
        lowrank_add(x, t, v, ust, rk, out[:, :20], segments=(16,))
    with pytest.raises(ValueError, match="gated must be 'none', 'silu' or 'gelu_tanh'"):
        lowrank_add(x, t, v, ust, rk, out, segments=(16,), gated="relu")
    with pytest.raises(ValueError, match=r"gated: x must be a pair's raw sums \[2, B, K\]"):
        lowrank_add(x, t, v, ust, rk, out, segments=(16,), gated="silu")
    with pytest.raises(ValueError, match="pack_lowrank's for K=16"):
        lowrank_add(x[:, :16], t, v, ust, rk, out, segments=(16,))
    with pytest.raises(ValueError, match="one .* or None per site"):
        pack_lowrank([None, None], (16, 8), torch.float32, torch.device(DEVICE))
    with pytest.raises(ValueError, match=r"site 0: V must be \[32, r\] and U·S \[16, r\]"):
        pack_lowrank([(torch.zeros(32, 4), torch.zeros(15, 4))], (16,), torch.float32, torch.device(DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_llama_shapes_bf16_under_graph_replay():
    """q|k|v at Llama-3-8B shapes and R-Sparse's ranks, bf16 factors, replayed in a CUDA graph with fresh inputs."""
    k, widths, ranks = 4096, (4096, 1024, 1024), (204, 82, 82)
    factors = _factors(k, widths, ranks, torch.bfloat16)
    v, ust, rk = pack_lowrank(factors, widths, torch.bfloat16, torch.device("cuda"))
    g = torch.rand(k, device="cuda") + 0.5
    x = torch.randn(1, k, device="cuda")
    t = torch.full((3,), 0.8, device="cuda")
    out = torch.zeros(1, sum(widths), device="cuda")
    lowrank_add(x, t, v, ust, rk, out, norm_weight=g, eps=1e-5, segments=(4096, 5120))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.zero_()
        lowrank_add(x, t, v, ust, rk, out, norm_weight=g, eps=1e-5, segments=(4096, 5120))
    for _ in range(5):
        x.copy_(torch.randn(1, k, device="cuda"))
        graph.replay()
        want = _want(ref.rmsnorm_ref(x, g, 1e-5), t, factors, widths)
        assert rel_err(out, want) < 1e-2
