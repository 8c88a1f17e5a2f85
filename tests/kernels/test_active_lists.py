"""Active-row lists written by the op that produces an input (`decode_attention(lists=)`, o's input) or by the
compaction pass alone (`compact_lists`), and the gather walk that reads them (`gather_lists`): the lists hold
exactly the selected channels (a plain torch selection of the attention's output), the walk adds exactly W·x_s."""

import pytest
import torch

from actsparse.kernels import (active_lists, compact_lists, decode_attention, gather_lists, poison_outputs,
                               sparse_gemv)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _attention_case(hq, hkv, d, s, dtype):
    qkv = torch.randn(1, (hq + 2 * hkv) * d, device=DEVICE, dtype=dtype)
    kc = torch.randn(1, hkv, s, d, device=DEVICE, dtype=dtype)
    vc = torch.randn(1, hkv, s, d, device=DEVICE, dtype=dtype)
    pos = torch.randint(1, s, (1,), dtype=torch.int32, device=DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEVICE, dtype=torch.float32) / d))
    return qkv, kc, vc, pos, inv_freq


def _selected(x, thresh=None, shift=None, nm=None):
    """The reference selection of x [1, K] as the kernels select (float32)."""
    v = x.float() - (shift if shift is not None else 0.0)
    if nm is not None:
        return _nm(v, *nm)
    return torch.where(v.abs() > thresh, v, torch.zeros_like(v))


def _nm(v, n, m):
    """The N largest |v| of every M consecutive channels kept."""
    g = v.reshape(v.shape[0], -1, m)
    idx = g.abs().topk(n, dim=-1).indices
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return torch.where(keep, g, torch.zeros_like(g)).reshape(v.shape)


def _assert_nm(got, chans, v, n, m):
    """got [1, K] keeps, in every group of m channels, n channels whose |v| are the group's n largest, at v."""
    mask = torch.zeros(v.numel(), dtype=torch.bool, device=v.device)
    mask[list(chans)] = True
    groups, keep = v.reshape(-1, m), mask.reshape(-1, m)
    assert (keep.sum(dim=1) == n).all()
    top = groups.abs().topk(n, dim=1).values.sort(dim=1).values
    assert torch.equal(groups.abs()[keep].reshape(-1, n).sort(dim=1).values, top)
    assert torch.equal(got, torch.where(mask.reshape(got.shape), v.reshape(got.shape), torch.zeros_like(got)))


def _as_dense(lists, k):
    """The selected input the lists describe, and the set of their channels (each listed once)."""
    x = torch.zeros(1, k, dtype=torch.float32, device=DEVICE)
    seen = []
    for slot, c in enumerate(lists.count.tolist()):
        base = slot * lists.seg
        idx = lists.idx[base:base + c].long()
        assert ((idx >= base) & (idx < base + lists.seg)).all(), "a list holds channels of its own slot only"
        x[0, idx] = lists.val[base:base + c]
        seen += idx.tolist()
    assert len(seen) == len(set(seen))
    return x, set(seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,d", [((4, 2), 16), ((8, 1), 32), ((4, 4), 16), ((6, 2), 16)])  # GQA, MQA, MHA,
# a group of 3 heads: lists of 48 channels, which the compaction pass selects 16 at a time
@pytest.mark.parametrize("rule", ["scalar", "per-channel", "shift", "nm"])
def test_attention_writes_the_lists_of_its_selected_output(dtype, heads, d, rule):
    hq, hkv = heads
    k = hq * d
    qkv, kc, vc, pos, inv_freq = _attention_case(hq, hkv, d, 40, dtype)
    plain = decode_attention(qkv, kc.clone(), vc.clone(), pos, inv_freq, hq, hkv, block_s=16)
    level = float(plain.float().abs().median())
    sel = {"scalar": dict(list_thresh=torch.tensor([level], device=DEVICE)),
           "per-channel": dict(list_thresh=torch.rand(1, k, device=DEVICE) * 2 * level),
           "shift": dict(list_thresh=torch.tensor([level], device=DEVICE),
                         list_shift=torch.randn(1, k, device=DEVICE) * level),
           "nm": dict(list_nm=(2, 4))}[rule]
    lists = active_lists(k, hq // hkv * d, DEVICE)
    with poison_outputs():
        out = decode_attention(qkv, kc, vc, pos, inv_freq, hq, hkv, block_s=16, lists=lists, **sel)
    assert torch.equal(out, plain)  # the output itself is unchanged
    got, chans = _as_dense(lists, k)
    if rule == "nm":  # each group of 4 keeps 2 of its largest |x| (equal values at the cut: either may stay)
        _assert_nm(got, chans, out.float(), 2, 4)
        want = got
    else:
        want = _selected(out, sel.get("list_thresh"), sel.get("list_shift"), sel.get("list_nm"))
        assert chans == set(torch.nonzero(want[0]).flatten().tolist())
        assert torch.equal(got, want)
    # the compaction pass writes the same lists (as sets per slot)
    lists2 = compact_lists(out, sel.get("list_thresh"), active_lists(k, hq // hkv * d, DEVICE),
                           shift=sel.get("list_shift"), nm=sel.get("list_nm"))
    assert torch.equal(_as_dense(lists2, k)[0], want) and torch.equal(lists2.count, lists.count)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seg", [16, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_the_walk_over_lists_adds_exactly_w_times_the_selected_input(dtype, seg, bias):
    k, n = 128, 96
    x = torch.randn(1, k, device=DEVICE, dtype=dtype)
    wt = (torch.randn(k, n, device=DEVICE) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    th = torch.tensor([0.7], device=DEVICE)
    acc = torch.randn(1, n, device=DEVICE)
    start = acc.clone()
    lists = compact_lists(x, th, active_lists(k, seg, DEVICE))
    gather_lists(lists, wt, accumulate=acc, bias=b)
    xs = _selected(x, th)
    want = start.double() + xs.double() @ wt.double() + (b.double() if bias else 0.0)
    assert torch.allclose(acc.double(), want, rtol=1e-4, atol=1e-4)
    # and what sparse_gemv adds into the stream with its own compaction
    acc2 = start.clone()
    sparse_gemv(x, wt, th, bias=b, impl="gather", accumulate=acc2)
    assert torch.allclose(acc, acc2, rtol=1e-5, atol=1e-5)


def test_nothing_kept_adds_only_the_bias():
    k, n = 64, 32
    x = torch.zeros(1, k, device=DEVICE)
    wt = torch.randn(k, n, device=DEVICE)
    b = torch.randn(n, device=DEVICE)
    acc = torch.zeros(1, n, device=DEVICE)
    lists = compact_lists(x, torch.tensor([0.0], device=DEVICE), active_lists(k, 16, DEVICE))
    assert lists.count.tolist() == [0, 0, 0, 0]
    assert torch.equal(gather_lists(lists, wt, accumulate=acc, bias=b), b[None])


def test_every_refusal_names_the_problem():
    hq, hkv, d = 4, 2, 16
    qkv, kc, vc, pos, inv_freq = _attention_case(hq, hkv, d, 20, torch.float32)
    th = torch.tensor([0.1], device=DEVICE)
    good = active_lists(hq * d, 2 * d, DEVICE)
    with pytest.raises(ValueError, match="seg must be ≥ 16 and divide"):
        active_lists(64, 24, DEVICE)
    with pytest.raises(ValueError, match="one list per kv head: make them with seg = 32"):
        decode_attention(qkv, kc, vc, pos, inv_freq, hq, hkv, lists=active_lists(hq * d, 16, DEVICE), list_thresh=th)
    with pytest.raises(ValueError, match="lists are for 128 channels"):
        decode_attention(qkv, kc, vc, pos, inv_freq, hq, hkv, lists=active_lists(128, 32, DEVICE), list_thresh=th)
    with pytest.raises(ValueError, match="give list_thresh"):
        decode_attention(qkv, kc, vc, pos, inv_freq, hq, hkv, lists=good)
    with pytest.raises(ValueError, match="they need lists="):
        decode_attention(qkv, kc, vc, pos, inv_freq, hq, hkv, list_thresh=th)
    with pytest.raises(ValueError, match="takes no list_thresh"):
        decode_attention(qkv, kc, vc, pos, inv_freq, hq, hkv, lists=good, list_thresh=th, list_nm=(2, 4))
    with pytest.raises(ValueError, match="must be an ActiveLists"):
        decode_attention(qkv, kc, vc, pos, inv_freq, hq, hkv, lists=(good.idx, good.val), list_thresh=th)
    q2, kc2, vc2, pos2, _ = _attention_case(hq, hkv, d, 20, torch.float32)
    with pytest.raises(ValueError, match="at batch 1"):
        decode_attention(torch.cat([q2, q2]), kc2.expand(2, -1, -1, -1).contiguous(),
                         vc2.expand(2, -1, -1, -1).contiguous(), pos2.repeat(2), inv_freq, hq, hkv, lists=good,
                         list_thresh=th)
    q3, kc3, vc3, pos3, f3 = _attention_case(2, 1, 24, 20, torch.float32)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        decode_attention(q3, kc3, vc3, pos3, f3, 2, 1, lists=active_lists(48, 48, DEVICE), list_thresh=th)
    x = torch.randn(1, 64, device=DEVICE)
    wt = torch.randn(64, 32, device=DEVICE)
    lists = active_lists(64, 16, DEVICE)
    with pytest.raises(ValueError, match="one of them"):
        compact_lists(x, None, lists)
    with pytest.raises(ValueError, match="contiguous \\[1, K\\] row"):
        compact_lists(torch.randn(2, 64, device=DEVICE), th, lists)
    with pytest.raises(ValueError, match="accumulate must be a contiguous float32 \\[1, 32\\]"):
        gather_lists(lists, wt, accumulate=torch.zeros(2, 32, device=DEVICE))
    with pytest.raises(ValueError, match="lists are for 64 channels"):
        gather_lists(lists, torch.randn(128, 32, device=DEVICE), accumulate=torch.zeros(1, 32, device=DEVICE))
    with pytest.raises(ValueError, match="bias must have shape \\[32\\]"):
        gather_lists(lists, wt, accumulate=torch.zeros(1, 32, device=DEVICE), bias=torch.zeros(8, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama_shapes_attention_lists_then_walk(dtype):
    """Llama-3-8B's o at batch 1: attention's lists, then the walk, equal the compaction path's sum."""
    hq, hkv, d = 32, 8, 128
    qkv, kc, vc, pos, inv_freq = _attention_case(hq, hkv, d, 300, dtype)
    wt = (torch.randn(hq * d, 4096, device=DEVICE) / 64).to(dtype)
    lists = active_lists(hq * d, hq // hkv * d, DEVICE)
    plain = decode_attention(qkv, kc.clone(), vc.clone(), pos, inv_freq, hq, hkv)
    th = torch.tensor([float(plain.float().abs().median())], device=DEVICE)
    a = decode_attention(qkv, kc, vc, pos, inv_freq, hq, hkv, lists=lists, list_thresh=th)
    x0 = torch.randn(1, 4096, device=DEVICE)
    got, want = gather_lists(lists, wt, accumulate=x0.clone()), x0.clone()
    sparse_gemv(a, wt, th, impl="gather", accumulate=want)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("rule", ["scalar", "per-channel", "shift", "nm"])
@pytest.mark.parametrize("seg_k", [32, 1024])  # several K slices meeting by atomics, or one slice a program
def test_the_raw_pair_writes_downs_lists(rule, seg_k):
    """sparse_gated_mlp(out=, down_lists=): beside gate|up's raw sums, the last program of each column strip
    writes h = act(gate)·up's kept channels (down's rule) as down's lists: exactly the channels a plain torch
    selection of act(gate)·up keeps, and the walk over them adds what sparse_gemv(gated=) adds."""
    from actsparse.kernels import GatherConfig, override_config, sparse_gated_mlp

    k, i, d = 64, 96, 48
    x = torch.randn(1, k, device=DEVICE)
    wg, wu = ((torch.randn(k, i, device=DEVICE) / k ** 0.5) for _ in range(2))
    wd = torch.randn(i, d, device=DEVICE) / i ** 0.5
    g = torch.rand(k, device=DEVICE) + 0.5
    th = torch.tensor([0.3, 0.4], device=DEVICE)
    sums = torch.full((2, 1, i), float("nan"), device=DEVICE)
    with override_config(GatherConfig(block_n=16, seg_k=seg_k, block_k=16)):
        sparse_gated_mlp(x, wg, wu, th, norm_weight=g, eps=1e-6, impl="gather", out=sums)
    h = torch.nn.functional.silu(sums[0]) * sums[1]
    u = h.abs().flatten().sort().values
    level = float((u[i // 2 - 1] + u[i // 2]) / 2)  # between two values: no channel sits on it
    sel = {"scalar": dict(down_thresh=torch.tensor([level], device=DEVICE)),
           "per-channel": dict(down_thresh=torch.rand(1, i, device=DEVICE) * 2 * level),
           "shift": dict(down_thresh=torch.tensor([level], device=DEVICE),
                         down_shift=torch.randn(1, i, device=DEVICE) * level),
           "nm": dict(down_nm=(2, 4))}[rule]
    lists = active_lists(i, 32, DEVICE)
    lists.count.fill_(7)  # stale counts from a previous step: the compaction pass zeroes them
    sums2 = torch.full((2, 1, i), float("nan"), device=DEVICE)
    with override_config(GatherConfig(block_n=16, seg_k=seg_k, block_k=16)), poison_outputs():
        sparse_gated_mlp(x, wg, wu, th, norm_weight=g, eps=1e-6, impl="gather", out=sums2, down_lists=lists, **sel)
    assert torch.allclose(sums2, sums, rtol=1e-5, atol=1e-6)
    want = _selected(h, sel.get("down_thresh"), sel.get("down_shift"), sel.get("down_nm"))
    got, chans = _as_dense(lists, i)
    assert chans == set(torch.nonzero(want[0]).flatten().tolist())
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    acc = torch.randn(1, d, device=DEVICE)
    start = acc.clone()
    gather_lists(lists, wd, accumulate=acc)
    assert torch.allclose(acc.double(), start.double() + want.double() @ wd.double(), rtol=1e-4, atol=1e-4)


def test_down_lists_refusals():
    from actsparse.kernels import sparse_gated_mlp

    k, i = 64, 96
    x = torch.randn(1, k, device=DEVICE)
    wg = wu = torch.randn(k, i, device=DEVICE)
    th = torch.tensor([0.3, 0.4], device=DEVICE)
    sums = torch.empty(2, 1, i, device=DEVICE)
    td = torch.tensor([0.1], device=DEVICE)
    good = active_lists(i, 32, DEVICE)
    with pytest.raises(ValueError, match="impl='gather'"):
        sparse_gated_mlp(x, wg, wu, th, out=sums, down_lists=good, down_thresh=td)
    with pytest.raises(ValueError, match="it needs out="):
        sparse_gated_mlp(x, wg, wu, th, impl="gather", down_lists=good, down_thresh=td)
    with pytest.raises(ValueError, match="they need down_lists="):
        sparse_gated_mlp(x, wg, wu, th, impl="gather", out=sums, down_thresh=td)
    with pytest.raises(ValueError, match="one of them"):
        sparse_gated_mlp(x, wg, wu, th, impl="gather", out=sums, down_lists=good)
    with pytest.raises(ValueError, match="lists are for 64 channels .* has 96"):
        sparse_gated_mlp(x, wg, wu, th, impl="gather", out=sums, down_lists=active_lists(64, 32, DEVICE),
                         down_thresh=td)
    with pytest.raises(ValueError, match="batch 1"):
        sparse_gated_mlp(torch.randn(2, k, device=DEVICE), wg, wu, th, impl="gather",
                         out=torch.empty(2, 2, i, device=DEVICE), down_lists=good, down_thresh=td)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("inter,seg", [(14336, 2048), (11008, 256)])  # Llama-3-8B, Llama-2-7B MLPs
def test_gpu_pair_writes_downs_lists_under_graph_replays(inter, seg):
    """Captured once, replayed on fresh inputs: the pair's strips arrive in any order on the GPU, their counters
    reset themselves and the compaction pass zeroes down's counts each replay; down's walk over the lists adds
    what the compaction path adds."""
    from actsparse.kernels import sparse_gated_mlp

    d, dev = 4096, "cuda"
    x = torch.randn(1, d, device=dev)
    wg, wu = ((torch.randn(d, inter, device=dev) / d ** 0.5).to(torch.bfloat16) for _ in range(2))
    wd = (torch.randn(inter, d, device=dev) / inter ** 0.5).to(torch.bfloat16)
    g = torch.ones(d, device=dev, dtype=torch.bfloat16)
    th = torch.tensor([0.67, 0.67], device=dev)  # about half of a unit normal's |x̂|
    sums, ref_sums = (torch.empty(2, 1, inter, device=dev) for _ in range(2))
    sparse_gated_mlp(x, wg, wu, th, norm_weight=g, impl="gather", out=ref_sums)
    td = torch.tensor([float((torch.nn.functional.silu(ref_sums[0]) * ref_sums[1]).abs().median())], device=dev)
    lists, acc = active_lists(inter, seg, dev), torch.zeros(1, d, device=dev)

    def step():
        acc.zero_()
        sparse_gated_mlp(x, wg, wu, th, norm_weight=g, impl="gather", out=sums, down_lists=lists, down_thresh=td)
        gather_lists(lists, wd, accumulate=acc)
    for _ in range(2):
        step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(5):
        x.copy_(torch.randn(1, d, device=dev))
        graph.replay()
        want = torch.zeros(1, d, device=dev)
        sparse_gated_mlp(x, wg, wu, th, norm_weight=g, impl="gather", out=ref_sums)
        sparse_gemv(ref_sums, wd, td, gated="silu", impl="gather", accumulate=want)
        torch.cuda.synchronize()
        assert int(lists.count.sum()) > 0
        assert ((acc - want).norm() / want.norm()) < 1e-3
