"""Decode attention for one new token: RoPE on q and k, KV-cache write and GQA attention, one launch.

One program per (batch row, kv head) handles the GROUP query heads that share the kv head, so
each cached key/value is read once. The position comes from a device tensor, so the launch has
static arguments and is captured by CUDA graphs; the loop runs to the current position only, and from the
first position of a sliding window where there is one (Gemma's and Mistral's local layers). Scores may be
soft-capped, c·tanh(s / c) (Gemma 2).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import new_output
from .gather_gemv import ActiveLists, check_lists
from .gemv_common import select_chunk
from .pdl import pdl_args, pdl_prologue


@triton.jit
def _head_norm(x, rstd, g_ptr, lanes, mask, src_ptr, cache_ptr, SCALE_F32: tl.constexpr):
    """RMSNorm of head rows x [*, DP] (fp32, loaded from q|k|v) by their rstd, scaled by g at `lanes`, rounded as
    the engine's unfused norm rounds: normalise, cast to q|k|v's dtype (HF; not SCALE_F32: Gemma scales in
    float32), scale, cast to the model's (= the cache's) dtype."""
    y = x * rstd[:, None]
    if not SCALE_F32:
        y = y.to(src_ptr.dtype.element_ty).to(tl.float32)
    g = tl.load(g_ptr + lanes, mask=mask, other=0.0).to(tl.float32)
    return (y * g[None, :]).to(cache_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _rope(ptr, offs_h, mask_h, d, partner, cos, sin, g_ptr, eps, cache_ptr, D: tl.constexpr, NORM: tl.constexpr,
          SCALE_F32: tl.constexpr):
    """x·cos + rotate_half(x)·sin for rows offs_h of a [*, D] block (HF Llama convention); lanes d ≥ D (the
    padding up to a power of two) read as 0. NORM: each row RMS-normalised and scaled by g first (Qwen3's and
    Gemma 3's per-head q and k norms)."""
    m = mask_h[:, None] & (d < D)[None, :]
    x = tl.load(ptr + offs_h[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    xp = tl.load(ptr + offs_h[:, None] * D + partner[None, :], mask=m, other=0.0).to(tl.float32)
    if NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        x = _head_norm(x, rstd, g_ptr, d, d < D, ptr, cache_ptr, SCALE_F32)
        xp = _head_norm(xp, rstd, g_ptr, partner, d < D, ptr, cache_ptr, SCALE_F32)
    sign = tl.where(d < D // 2, -1.0, 1.0)
    return x * cos[None, :] + sign[None, :] * xp * sin[None, :]


@triton.jit
def _decode_attention_kernel(
    qkv_ptr, kc_ptr, vc_ptr, pos_ptr, inv_freq_ptr, out_ptr, qn_ptr, kn_ptr,
    stride_qkv, stride_cb, stride_ch, stride_cs, stride_ob,
    sm_scale, rope_scale, softcap, window, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
    NORM: tl.constexpr = False, SCALE_F32: tl.constexpr = False, PDL: tl.constexpr = False,
    LIST: tl.constexpr = False, t_ptr=None, m_ptr=None, idx_ptr=None, val_ptr=None, cnt_ptr=None, stride_tk=0,
    HAS_SHIFT: tl.constexpr = False, NM_N: tl.constexpr = 0, NM_M: tl.constexpr = 1):
    pdl_prologue(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + b)
    d = tl.arange(0, DP)  # head_dim D padded to a power of two (Phi-3: 96 → 128); lanes ≥ D masked
    mask_d = d < D
    partner = tl.where(d < D // 2, d + D // 2, d - D // 2)
    ang = pos.to(tl.float32) * tl.load(inv_freq_ptr + d % (D // 2), mask=mask_d, other=0.0)
    cos = tl.cos(ang) * rope_scale
    sin = tl.sin(ang) * rope_scale

    row = qkv_ptr + b * stride_qkv
    one = tl.arange(0, 1)
    k_new = _rope(row + (HQ + h) * D, one, one < 1, d, partner, cos, sin, kn_ptr, eps, kc_ptr, D, NORM,
                  SCALE_F32)  # [1, D]
    v_new = tl.load(row + (HQ + HKV + h) * D + d, mask=mask_d, other=0.0)
    kc = kc_ptr + b * stride_cb + h * stride_ch
    vc = vc_ptr + b * stride_cb + h * stride_ch
    tl.store(kc + pos * stride_cs + one[:, None] * 0 + d[None, :], k_new.to(kc_ptr.dtype.element_ty),
             mask=mask_d[None, :])
    tl.store(vc + pos * stride_cs + d, v_new, mask=mask_d)

    g = tl.arange(0, BLOCK_G)
    mask_g = g < GROUP
    q = _rope(row + h * GROUP * D, g, mask_g, d, partner, cos, sin, qn_ptr, eps, kc_ptr, D, NORM,
              SCALE_F32) * sm_scale  # [BLOCK_G, D]
    q = q.to(kc_ptr.dtype.element_ty)
    # Make this program's cache writes visible to all of its threads before reading the cache.
    tl.debug_barrier()

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, DP], dtype=tl.float32)
    for s0 in range(tl.maximum(pos + 1 - window, 0), pos + 1, BLOCK_S):  # the window's positions only
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s <= pos
        k = tl.load(kc + offs_s[:, None] * stride_cs + d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(vc + offs_s[:, None] * stride_cs + d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        if IEEE:  # float32 caches: full-precision products, not tf32
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_G, BLOCK_S]
        else:
            s = tl.dot(q, tl.trans(k))
        if SOFTCAP:  # c·tanh(s / c), tanh(u) = 2·sigmoid(2u) − 1
            s = softcap * (2.0 * tl.sigmoid(s * (2.0 / softcap)) - 1.0)
        s = tl.where(mask_s[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    o_ptr = out_ptr + b * stride_ob + (h * GROUP + g[:, None]) * D + d[None, :]
    tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
    if LIST:
        # o's selection of this kv head's GROUP·D output channels (as o reads them: rounded to the output's
        # dtype), written as list h of o's gather walk: no compaction launch before o (batch 1, D = DP)
        j = tl.arange(0, BLOCK_G * DP)
        valid = j < GROUP * D
        offs_k = h * GROUP * D + j
        xo = tl.reshape(out.to(out_ptr.dtype.element_ty).to(tl.float32), [1, BLOCK_G * DP])
        xs, rows = select_chunk(xo, t_ptr, m_ptr, offs_k, valid, one < 1, stride_tk, HAS_SHIFT, NM_N, NM_M, 1,
                                BLOCK_G * DP)
        keep = rows.to(tl.int32)
        slot = tl.cumsum(keep, axis=0) - 1
        kept = keep != 0
        tl.store(idx_ptr + h * GROUP * D + slot, offs_k, mask=kept)
        tl.store(val_ptr + h * GROUP * D + slot[None, :], xs, mask=kept[None, :])
        tl.store(cnt_ptr + h, tl.sum(keep, axis=0))


@torch.library.custom_op("actsparse::decode_attention",
                         mutates_args=("k_cache", "v_cache", "list_idx", "list_val", "list_count"))
def _decode_attention_op(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                         inv_freq: torch.Tensor, n_heads: int, n_kv_heads: int, sm_scale: float,
                         rope_scale: float, block_s: int, softcap: float = 0.0, window: int = 0,
                         q_norm: Optional[torch.Tensor] = None, k_norm: Optional[torch.Tensor] = None,
                         norm_eps: float = 1e-6, norm_f32: bool = False,
                         list_thresh: Optional[torch.Tensor] = None, list_shift: Optional[torch.Tensor] = None,
                         list_idx: Optional[torch.Tensor] = None, list_val: Optional[torch.Tensor] = None,
                         list_count: Optional[torch.Tensor] = None, list_nm_n: int = 0,
                         list_nm_m: int = 1) -> torch.Tensor:
    b = qkv.shape[0]
    d = k_cache.shape[-1]
    group = n_heads // n_kv_heads
    out = new_output((b, n_heads * d), qkv.device, k_cache.dtype)  # an fp32 q|k|v still yields cache-dtype rows
    norm = q_norm is not None
    lists = {}
    if list_idx is not None:
        lists = dict(LIST=True, t_ptr=list_thresh, m_ptr=list_shift if list_shift is not None else list_thresh,
                     idx_ptr=list_idx, val_ptr=list_val, cnt_ptr=list_count, stride_tk=list_thresh.stride(1),
                     HAS_SHIFT=list_shift is not None, NM_N=list_nm_n, NM_M=max(list_nm_m, 1))
    _decode_attention_kernel[(b, n_kv_heads)](
        qkv, k_cache, v_cache, pos, inv_freq, out, q_norm if norm else inv_freq, k_norm if norm else inv_freq,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0),
        sm_scale, rope_scale, softcap if softcap > 0 else 1.0, window if window > 0 else k_cache.shape[2], norm_eps,
        HQ=n_heads, HKV=n_kv_heads, D=d, DP=triton.next_power_of_2(d), GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_S=block_s, IEEE=k_cache.dtype == torch.float32, SOFTCAP=softcap > 0, NORM=norm, SCALE_F32=norm_f32,
        num_warps=4, num_stages=2, **lists, **pdl_args(qkv.device),
    )
    return out


@_decode_attention_op.register_fake
def _(qkv, k_cache, v_cache, pos, inv_freq, n_heads, n_kv_heads, sm_scale, rope_scale, block_s, softcap=0.0,
      window=0, q_norm=None, k_norm=None, norm_eps=1e-6, norm_f32=False, list_thresh=None, list_shift=None,
      list_idx=None, list_val=None, list_count=None, list_nm_n=0, list_nm_m=1):
    return qkv.new_empty((qkv.shape[0], n_heads * k_cache.shape[-1]), dtype=k_cache.dtype)


def decode_attention(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    inv_freq: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    *,
    sm_scale: float | None = None,
    rope_scale: float = 1.0,
    softcap: float = 0.0,
    window: int = 0,
    block_s: int = 32,
    q_norm: Optional[torch.Tensor] = None,
    k_norm: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-6,
    norm_f32: bool = False,
    lists: Optional[ActiveLists] = None,
    list_thresh: Optional[torch.Tensor] = None,
    list_shift: Optional[torch.Tensor] = None,
    list_nm: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Return attn [B, n_heads·D]; writes the roped k and v of the new token into the caches at `pos`.

    qkv: [B, (n_heads + 2·n_kv_heads)·D] pre-RoPE projections; k_cache, v_cache: [B, n_kv_heads, S, D];
    pos: int32 [B], the new token's position (< S); inv_freq: float32 [D/2] RoPE frequencies. sm_scale: the
    scores' scale (default D^-0.5); softcap > 0: scores ← softcap·tanh(scores / softcap), after the scale;
    window > 0: attend to the last `window` positions only, the new one included (HF's sliding window).
    q_norm, k_norm ([D] each, both or neither): every head of q and of k RMS-normalised (norm_eps) and scaled
    by them before RoPE (Qwen3, Gemma 3), rounded as `rmsnorm(..., scale_in_f32=norm_f32)` then a cast to the
    cache's dtype round: no norm launches of their own.
    lists (batch 1; `active_lists(n_heads·D, seg=n_heads / n_kv_heads·D)`, head_dim a power of two): also select
    the output as the next op (o) selects its input, with list_thresh (float32 [1] or [1, n_heads·D]), list_shift
    ([1, n_heads·D]) or list_nm=(N, M), and write its kept channels as o's active-row lists, one per kv head, for
    `gather_lists`: o then runs without a compaction launch of its own.
    """
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must both be [B, n_kv_heads, S, D] with equal strides, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    b, hkv, s, d = k_cache.shape
    if hkv != n_kv_heads or n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads}) = cache dim 1 ({hkv})")
    if d % 2 or d < 16 or k_cache.stride(3) != 1:
        raise ValueError(f"head_dim must be even and ≥ 16 and the cache contiguous in it, got {d}")
    if tuple(qkv.shape) != (b, (n_heads + 2 * n_kv_heads) * d) or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be contiguous [{b}, {(n_heads + 2 * n_kv_heads) * d}], got {tuple(qkv.shape)}")
    if pos.dtype != torch.int32 or tuple(pos.shape) != (b,):
        raise ValueError(f"pos must be int32 [{b}] on the device, got {pos.dtype} {tuple(pos.shape)}")
    if tuple(inv_freq.shape) != (d // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(f"inv_freq must be float32 [{d // 2}], got {inv_freq.dtype} {tuple(inv_freq.shape)}")
    if block_s < 16 or block_s & (block_s - 1):
        raise ValueError(f"block_s must be a power of two ≥ 16, got {block_s}")
    if softcap < 0 or window < 0:
        raise ValueError(f"softcap and window must be ≥ 0 (0: off), got {softcap} and {window}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm go together: pass both or neither")
    for name, g in (("q_norm", q_norm), ("k_norm", k_norm)):
        if g is not None and (tuple(g.shape) != (d,) or g.device != qkv.device):
            raise ValueError(f"{name} must be [{d}] (head_dim) on {qkv.device}, got {tuple(g.shape)} on {g.device}")
    scale = d ** -0.5 if sm_scale is None else sm_scale
    sel = {}
    if lists is not None:
        sel = _list_args(lists, list_thresh, list_shift, list_nm, b, n_heads, n_kv_heads, d, qkv.device)
    elif list_thresh is not None or list_shift is not None or list_nm is not None:
        raise ValueError("list_thresh, list_shift and list_nm select the lists' channels: they need lists=")
    return torch.ops.actsparse.decode_attention(qkv, k_cache, v_cache, pos, inv_freq, n_heads, n_kv_heads,
                                                float(scale), float(rope_scale), int(block_s), float(softcap),
                                                int(window), q_norm, k_norm, float(norm_eps), bool(norm_f32), **sel)


def _list_args(lists, thresh, shift, nm, b: int, n_heads: int, n_kv_heads: int, d: int, device) -> dict:
    """The custom op's list arguments of a valid `decode_attention(lists=)` call; ValueError naming what is not."""
    from .sparse_gemv import list_rule

    k, seg = n_heads * d, n_heads // n_kv_heads * d
    if b != 1:
        raise ValueError(f"lists= writes o's active rows at batch 1 (a batch's lists are the union of its rows, "
                         f"which no one program of the attention sees); got batch {b}")
    if d & (d - 1):
        raise ValueError(f"lists= needs a power-of-two head_dim (the lists are contiguous per kv head), got {d}")
    check_lists(lists, k, device)
    if lists.seg != seg:
        raise ValueError(f"lists= holds one list per kv head: make them with seg = {seg} (heads per kv head × "
                         f"head_dim), got {lists.seg}")
    thresh, shift, nm_n, nm_m = list_rule(lists, thresh, shift, nm, k, "list_")
    if nm_n > 0 and seg % nm_m:
        raise ValueError(f"list_nm=(N, M) needs M dividing a kv head's {seg} channels, got M={nm_m}")
    return dict(list_thresh=thresh, list_shift=shift, list_idx=lists.idx, list_val=lists.val,
                list_count=lists.count, list_nm_n=nm_n, list_nm_m=nm_m)
