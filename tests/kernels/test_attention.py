"""decode_attention (RoPE + cache write + GQA attention) against the torch reference."""

import pytest
import torch

from actsparse.kernels import decode_attention, poison_outputs
from actsparse.kernels import ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _case(b, hq, hkv, d, s, dtype, device=DEVICE):
    qkv = torch.randn(b, (hq + 2 * hkv) * d, device=device, dtype=dtype)
    kc = torch.randn(b, hkv, s, d, device=device, dtype=dtype)
    vc = torch.randn(b, hkv, s, d, device=device, dtype=dtype)
    pos = torch.randint(0, s, (b,), dtype=torch.int32, device=device)
    for i in range(b):  # what lies past the position was never written: NaN must not leak in
        kc[i, :, int(pos[i]) + 1:] = float("nan")
        vc[i, :, int(pos[i]) + 1:] = float("nan")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    return qkv, kc, vc, pos, inv_freq


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (8, 1)])  # GQA, MHA, MQA
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("head_dim", [16, 24])  # 24: padded to 32 inside (as Phi-3's 96 to 128)
def test_decode_attention_matches_reference(dtype, heads, batch, head_dim):
    hq, hkv = heads
    qkv, kc, vc, pos, inv_freq = _case(batch, hq, hkv, head_dim, 40, dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    with poison_outputs():
        out = decode_attention(qkv, kc, vc, pos, inv_freq, hq, hkv, rope_scale=1.1, block_s=16)
    want = ref.decode_attention_ref(qkv, kc2, vc2, pos, inv_freq, hq, hkv, rope_scale=1.1)
    assert not torch.isnan(out).any()
    assert ((out.double() - want.double()).norm() / want.double().norm()) < TOL[dtype]
    for i in range(batch):  # the new k (roped) and v landed at pos
        p = int(pos[i])
        torch.testing.assert_close(kc[i, :, p].float(), kc2[i, :, p].float(), rtol=TOL[dtype], atol=TOL[dtype])
        torch.testing.assert_close(vc[i, :, p], vc2[i, :, p])
        torch.testing.assert_close(kc[i, :, :p], kc2[i, :, :p])  # the past is untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [0, 5, 20])
def test_sliding_window_and_soft_capping_match_reference(dtype, window):
    """Gemma's attention: scores scaled by query_pre_attn_scalar^-0.5, soft-capped c·tanh(s/c), over the last
    `window` positions only (what lies before the window is NaN: it must not be read)."""
    qkv, _, _, _, inv_freq = _case(3, 4, 2, 16, 40, dtype)
    qkv = qkv * 4  # scores large enough that the cap bends them
    kc, vc = torch.randn(2, 3, 2, 40, 16, device=DEVICE, dtype=dtype)
    pos = torch.tensor([3, 17, 39], dtype=torch.int32, device=DEVICE)
    for i, p in enumerate(pos.tolist()):
        kc[i, :, p + 1:] = vc[i, :, p + 1:] = float("nan")
        if window:
            kc[i, :, :max(0, p + 1 - window)] = vc[i, :, :max(0, p + 1 - window)] = float("nan")
    kc2, vc2 = kc.clone(), vc.clone()
    kw = dict(sm_scale=0.3, softcap=5.0, window=window)
    with poison_outputs():
        out = decode_attention(qkv, kc, vc, pos, inv_freq, 4, 2, block_s=16, **kw)
    want = ref.decode_attention_ref(qkv, kc2, vc2, pos, inv_freq, 4, 2, **kw)
    assert not torch.isnan(out).any()
    assert ((out.double() - want.double()).norm() / want.double().norm()) < TOL[dtype]
    uncapped = ref.decode_attention_ref(qkv, kc.clone(), vc.clone(), pos, inv_freq, 4, 2, sm_scale=0.3, window=window)
    assert ((uncapped.double() - want.double()).norm() / want.double().norm()) > 1e-2  # the cap changed something


@pytest.mark.parametrize("dtype,qkv_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                             (torch.float16, torch.float32)])  # the last: fp32 raw q|k|v sums
@pytest.mark.parametrize("norm_f32", [False, True])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_q_and_k_norms_inside_the_kernel_equal_normalising_each_head_first(dtype, qkv_dtype, norm_f32, head_dim):
    """Qwen3 / Gemma 3: q|k|v's q and k heads RMS-normalised and scaled before RoPE, in the attention launch:
    the same as normalising each head row with the plain formula first (rounded as the engine's unfused norm:
    to q|k|v's dtype before the scale unless norm_f32, to the model's after it), then the norm-free kernel."""
    hq, hkv, d, b = 4, 2, head_dim, 2
    qkv, kc, vc, pos, inv_freq = _case(b, hq, hkv, d, 30, dtype)
    pos.clamp_(min=1)  # at position 0 a token attends to itself alone: its output is v, whatever q and k are
    qkv = (qkv.float() * 3 + 1).to(qkv_dtype)  # rows far from unit RMS: the norm must matter
    gq = torch.rand(d, device=DEVICE, dtype=torch.float32 if norm_f32 else dtype) + 0.5
    gk = torch.rand(d, device=DEVICE, dtype=gq.dtype) + 0.5
    eps = 1e-5

    def head_norm(x, g):  # x [B, H·D]
        x32 = x.float().reshape(b, -1, d)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = y if norm_f32 else y.to(qkv_dtype).float()
        return (y * g.float()).to(dtype).reshape(b, -1)

    normed = torch.cat([head_norm(qkv[:, :hq * d], gq), head_norm(qkv[:, hq * d:(hq + hkv) * d], gk),
                        qkv[:, (hq + hkv) * d:].to(dtype)], dim=1)
    kc2, vc2, kc3, vc3 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    with poison_outputs():
        out = decode_attention(qkv, kc, vc, pos, inv_freq, hq, hkv, block_s=16, q_norm=gq, k_norm=gk,
                               norm_eps=eps, norm_f32=norm_f32)
    want = decode_attention(normed, kc2, vc2, pos, inv_freq, hq, hkv, block_s=16)
    refd = ref.decode_attention_ref(qkv, kc3, vc3, pos, inv_freq, hq, hkv, q_norm=gq, k_norm=gk, norm_eps=eps,
                                    norm_f32=norm_f32)
    plain = decode_attention(qkv.to(dtype), kc3.clone(), vc3.clone(), pos, inv_freq, hq, hkv, block_s=16)
    assert not torch.isnan(out).any()
    for other in (want, refd):
        assert ((out.double() - other.double()).norm() / other.double().norm()) < TOL[dtype]
    assert ((out.double() - plain.double()).norm() / plain.double().norm()) > 1e-2  # the norms changed it
    for i in range(b):  # the cache holds the normalised, roped k
        p = int(pos[i])
        torch.testing.assert_close(kc[i, :, p].float(), kc2[i, :, p].float(), rtol=TOL[dtype], atol=TOL[dtype])
        torch.testing.assert_close(kc[i, :, p].float(), kc3[i, :, p].float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_position_zero_attends_to_itself_only():
    qkv, kc, vc, _, inv_freq = _case(1, 2, 1, 16, 8, torch.float32)
    pos = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    kc[:] = float("nan")
    vc[:] = float("nan")
    out = decode_attention(qkv, kc, vc, pos, inv_freq, 2, 1, block_s=16)
    v_new = qkv[0, 3 * 16:4 * 16]
    torch.testing.assert_close(out[0, :16], v_new)
    torch.testing.assert_close(out[0, 16:], v_new)


def test_bad_arguments_are_rejected():
    qkv, kc, vc, pos, inv_freq = _case(1, 4, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(qkv, kc, vc, pos, inv_freq, 3, 2)
    with pytest.raises(ValueError, match="int32"):
        decode_attention(qkv, kc, vc, pos.long(), inv_freq, 4, 2)
    with pytest.raises(ValueError, match="qkv must be"):
        decode_attention(qkv[:, :-16], kc, vc, pos, inv_freq, 4, 2)
    with pytest.raises(ValueError, match="inv_freq"):
        decode_attention(qkv, kc, vc, pos, inv_freq[:4], 4, 2)
    with pytest.raises(ValueError, match="block_s"):
        decode_attention(qkv, kc, vc, pos, inv_freq, 4, 2, block_s=24)
    with pytest.raises(ValueError, match="softcap and window must be ≥ 0"):
        decode_attention(qkv, kc, vc, pos, inv_freq, 4, 2, window=-1)
    g = torch.ones(16, device=DEVICE)
    with pytest.raises(ValueError, match="q_norm and k_norm go together"):
        decode_attention(qkv, kc, vc, pos, inv_freq, 4, 2, q_norm=g)
    with pytest.raises(ValueError, match=r"k_norm must be \[16\]"):
        decode_attention(qkv, kc, vc, pos, inv_freq, 4, 2, q_norm=g, k_norm=g[:8])
    qkv, kc, vc, pos, inv_freq = _case(1, 4, 2, 18, 8, torch.float32)
    with pytest.raises(ValueError, match="head_dim must be even and ≥ 16"):
        decode_attention(qkv, kc[..., :15], vc[..., :15], pos, inv_freq[:7], 4, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(32, 8), (32, 32)])
def test_gpu_llama_head_shapes(dtype, heads):
    hq, hkv = heads
    qkv, kc, vc, pos, inv_freq = _case(4, hq, hkv, 128, 300, dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    with poison_outputs():
        out = decode_attention(qkv, kc, vc, pos, inv_freq, hq, hkv, block_s=32)
    want = ref.decode_attention_ref(qkv, kc2, vc2, pos, inv_freq, hq, hkv)
    assert ((out.double() - want.double()).norm() / want.double().norm()) < TOL[dtype]
