"""sparse_mlp (the whole gated MLP in two launches) against its torch reference and against the formula written
out: fresh random weights, the stream's RMSNorm, scalar and per-channel thresholds, shifts with their folded
biases, N:M selection, batches 1 to 4, adding into a tensor and writing one, and every refusal."""

import pytest
import torch

from actsparse.kernels import MlpConfig, ref, sparse_mlp
from actsparse.kernels import fused_mlp

from .checks import quantile_thresh, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(k, i, d, dtype=torch.float32):
    return [(torch.randn(a, b, device=DEVICE) / a**0.5).to(dtype) for a, b in ((k, i), (k, i), (i, d))]


def _formula(x, wg, wu, wd, t, td, g=None, act="silu"):
    """The MLP with thresholds written out in float64, no helper shared with the kernel or its reference."""
    x = x.double()
    if g is not None:
        x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g.double()
    gate = (x * (x.abs() > t[0])) @ wg.double()
    up = (x * (x.abs() > t[1])) @ wu.double()
    z = 1.5957691216057308 * (gate + 0.044715 * gate**3) if act == "gelu_tanh" else gate
    h = gate * torch.sigmoid(z) * up
    return (h * (h.abs() > td)) @ wd.double()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_adds_the_whole_mlp_into_the_stream(batch, act):
    k, i, d = 64, 96, 48
    wg, wu, wd = _weights(k, i, d)
    g = torch.rand(k, device=DEVICE) + 0.5
    for sparsity in (0.0, 0.5, 0.9):
        x = torch.randn(batch, k, device=DEVICE) * 2
        xhat = ref.rmsnorm_ref(x, g, 1e-5)
        tq = quantile_thresh(xhat, sparsity)
        t = torch.tensor([tq, tq * 1.2], device=DEVICE)  # gate and up keep different rows
        h = ref.sparse_gated_mlp_ref(x, wg, wu, t, norm_weight=g, eps=1e-5, act=act)
        td = torch.tensor([quantile_thresh(h, sparsity)], device=DEVICE)
        stream = torch.randn(batch, d, device=DEVICE)
        got = sparse_mlp(x, wg, wu, wd, t, td, norm_weight=g, eps=1e-5, act=act, accumulate=stream.clone())
        want = _formula(x, wg, wu, wd, t, td[0], g, act)
        assert rel_err(got - stream, want) < 1e-5
        assert rel_err(ref.sparse_mlp_ref(x, wg, wu, wd, t, td, norm_weight=g, eps=1e-5, act=act), want) < 1e-5


def test_per_channel_thresholds_shifts_biases_and_out():
    """Per-channel rows for gate, up and down, SCAP-style shifts with W·m folded into the biases, written into out=
    (zeroed by the first launch: its old contents must not leak), twice back to back."""
    k, i, d, b = 48, 64, 40, 2
    wg, wu, wd = _weights(k, i, d)
    kw = dict(shift=torch.randn(2, k, device=DEVICE) * 0.2, bias=torch.randn(2, i, device=DEVICE),
              down_shift=torch.randn(i, device=DEVICE) * 0.05, down_bias=torch.randn(d, device=DEVICE))
    out = torch.full((b, d), 7.0, device=DEVICE)
    for _ in range(2):
        x = torch.randn(b, k, device=DEVICE)
        t = (torch.rand(2, k, device=DEVICE) * 1.2).contiguous()
        td = torch.rand(i, device=DEVICE) * 0.3
        want = ref.sparse_mlp_ref(x, wg, wu, wd, t, td, **kw)
        assert rel_err(sparse_mlp(x, wg, wu, wd, t, td, out=out, **kw), want) < 1e-5


def test_nm_selection_and_half_precision():
    """2:4 of x̂ for gate and up and of h for down; fp16 weights (x_s rounded as the kernels read them)."""
    k, i, d = 64, 64, 32
    wg, wu, wd = _weights(k, i, d, torch.float16)
    x = torch.randn(1, k, device=DEVICE)
    zero = torch.zeros(2, device=DEVICE)
    got = sparse_mlp(x, wg, wu, wd, zero, zero[:1], nm=(2, 4), accumulate=torch.zeros(1, d, device=DEVICE))
    assert rel_err(got, ref.sparse_mlp_ref(x, wg, wu, wd, 0.0, 0.0, nm=(2, 4))) < 2e-3


def test_nothing_kept_adds_only_the_down_bias():
    k, i, d = 32, 64, 48
    wg, wu, wd = _weights(k, i, d)
    x, bd = torch.randn(1, k, device=DEVICE), torch.randn(d, device=DEVICE)
    big = torch.full((2,), 1e9, device=DEVICE)
    stream = torch.randn(1, d, device=DEVICE)
    got = sparse_mlp(x, wg, wu, wd, big, big[:1], down_bias=bd, accumulate=stream.clone())
    assert torch.allclose(got, stream + bd, atol=1e-6)
    # every x̂ channel kept, every h channel dropped: gate and up walked, nothing read of W_d
    got = sparse_mlp(x, wg, wu, wd, torch.zeros(2, device=DEVICE), big[:1], accumulate=stream.clone())
    assert torch.equal(got, stream)


@pytest.mark.parametrize("cfg", [MlpConfig(block_i=32, block_k=16, block_d=16),
                                 MlpConfig(block_i=32, block_k=16, block_d=16, reduce_each=True),
                                 MlpConfig(block_i=32, block_k=16, block_d=16, depth=1, eager=True, joint=False,
                                           down_depth=1)])
def test_tiles_from_the_table(monkeypatch, cfg):
    """A tuned entry is what runs (gate and up walked together, their products summed each step or once, or one
    after the other; W_d's next tile requested early or not): channels of h not a multiple of the program's block, gate and up keeping different rows."""
    k, i, d = 40, 72, 24
    wg, wu, wd = _weights(k, i, d)
    monkeypatch.setitem(fused_mlp.TUNED_MLP, (k, i, d, 1), cfg)
    x = torch.randn(1, k, device=DEVICE)
    t = torch.tensor([0.3, 0.9], device=DEVICE)
    td = torch.full((1,), 0.05, device=DEVICE)
    got = sparse_mlp(x, wg, wu, wd, t, td, accumulate=torch.zeros(1, d, device=DEVICE))
    assert rel_err(got, _formula(x, wg, wu, wd, t, 0.05)) < 1e-5


def test_bad_arguments_are_refused_with_the_reason():
    k, i, d = 32, 64, 16
    wg, wu, wd = _weights(k, i, d)
    x, t, td = torch.randn(1, k, device=DEVICE), torch.zeros(2, device=DEVICE), torch.zeros(1, device=DEVICE)
    acc = torch.zeros(1, d, device=DEVICE)
    with pytest.raises(ValueError, match="give exactly one"):
        sparse_mlp(x, wg, wu, wd, t, td)
    with pytest.raises(ValueError, match="give exactly one"):
        sparse_mlp(x, wg, wu, wd, t, td, accumulate=acc, out=acc)
    with pytest.raises(ValueError, match="batches of at most 4"):
        sparse_mlp(torch.randn(5, k, device=DEVICE), wg, wu, wd, t, td, accumulate=torch.zeros(5, d, device=DEVICE))
    with pytest.raises(ValueError, match="wt_down must be the transposed down weight"):
        sparse_mlp(x, wg, wu, wd.t(), t, td, accumulate=acc)
    with pytest.raises(ValueError, match="in the gate's dtype"):
        sparse_mlp(x, wg, wu, wd.half(), t, td, accumulate=acc)
    with pytest.raises(ValueError, match="same shape and strides"):
        sparse_mlp(x, wg, wu[:, :32], wd, t, td, accumulate=acc)
    with pytest.raises(ValueError, match=r"accumulate must be a contiguous float32 \[1, 16\]"):
        sparse_mlp(x, wg, wu, wd, t, td, accumulate=acc.double())
    with pytest.raises(ValueError, match=r"thresh must have shape \[2\] or \[2, 32\]"):
        sparse_mlp(x, wg, wu, wd, t[:1].expand(3), td, accumulate=acc)
    with pytest.raises(ValueError, match=r"down_thresh must have shape \[1\] or \[1, 64\]"):
        sparse_mlp(x, wg, wu, wd, t, torch.zeros(3, device=DEVICE), accumulate=acc)
    with pytest.raises(ValueError, match=r"bias must have shape \[2, 64\]"):
        sparse_mlp(x, wg, wu, wd, t, td, bias=torch.zeros(64, device=DEVICE), accumulate=acc)
    with pytest.raises(ValueError, match=r"down_shift must have shape \[64\]"):
        sparse_mlp(x, wg, wu, wd, t, td, down_shift=torch.zeros(16, device=DEVICE), accumulate=acc)
    with pytest.raises(ValueError, match=r"down_bias must have shape \[16\]"):
        sparse_mlp(x, wg, wu, wd, t, td, down_bias=torch.zeros(64, device=DEVICE), accumulate=acc)
    with pytest.raises(ValueError, match="act must be 'silu' or 'gelu_tanh'"):
        sparse_mlp(x, wg, wu, wd, t, td, act="none", accumulate=acc)
    with pytest.raises(ValueError, match="nm must be"):
        sparse_mlp(x, wg, wu, wd, t, td, nm=(2, 3), accumulate=acc)
    with pytest.raises(ValueError, match="must divide the kernel's 64 channels"):
        sparse_mlp(x, wg, wu, wd, t, td, nm=(2, 128), accumulate=acc)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_llama_shapes_bf16_under_graph_replay():
    """Llama-3-8B's MLP (4096 → 14336 → 4096), bf16, added into an fp32 stream inside a CUDA graph replayed with
    fresh inputs at 0, 50 and 90% of the rows skipped."""
    k, i, d = 4096, 14336, 4096
    wg, wu, wd = _weights(k, i, d, torch.bfloat16)
    g = torch.rand(k, device="cuda") + 0.5
    x = torch.randn(1, k, device="cuda")
    t = torch.zeros(2, device="cuda")
    td = torch.zeros(1, device="cuda")
    stream = torch.zeros(1, d, device="cuda")
    sparse_mlp(x, wg, wu, wd, t, td, norm_weight=g, eps=1e-5, accumulate=stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sparse_mlp(x, wg, wu, wd, t, td, norm_weight=g, eps=1e-5, accumulate=stream)
    for sparsity in (0.0, 0.5, 0.9):
        x.copy_(torch.randn(1, k, device="cuda"))
        xhat = ref.rmsnorm_ref(x, g, 1e-5)
        t.fill_(quantile_thresh(xhat, sparsity))
        h = ref.sparse_gated_mlp_ref(x, wg, wu, t, norm_weight=g, eps=1e-5).float()
        td.fill_(quantile_thresh(h, sparsity))
        base = torch.randn(1, d, device="cuda")
        stream.copy_(base)
        graph.replay()
        torch.cuda.synchronize()
        # fp32 copies of the weights: the reference then keeps x_s and h unrounded as the kernel's FMAs do, so
        # no channel near a threshold flips between them
        want = ref.sparse_mlp_ref(x, wg.float(), wu.float(), wd.float(), t, td, norm_weight=g, eps=1e-5)
        assert rel_err(stream - base, want) < 1e-3
