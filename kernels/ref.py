"""Plain PyTorch references of every kernel in this package (the tests' ground truth).

They compute in float32 (float64 if given float64) and follow the kernels' rounding points:
the sparsified input is cast to the weight dtype before the product, as the kernels feed it to
the matrix units; everything else stays in float32 until the single final cast.
"""

from __future__ import annotations

from typing import Optional, Sequence

import math

import torch


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rmsnorm_ref(x: torch.Tensor, g: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Return x·rsqrt(mean(x²) + eps)·g in float32 (no intermediate rounding)."""
    xf = x.to(_acc_dtype(x))
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * g.to(xf.dtype)


def act_ref(y: torch.Tensor, act: str) -> torch.Tensor:
    """act(y) for the kernels' activations: "none", "silu" or "gelu_tanh" (PyTorch's gelu, approximate="tanh")."""
    if act == "silu":
        return torch.nn.functional.silu(y)
    if act == "gelu_tanh":
        return torch.nn.functional.gelu(y, approximate="tanh")
    if act != "none":
        raise ValueError(f"act must be 'none', 'silu' or 'gelu_tanh', got {act!r}")
    return y


def nm_mask_ref(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Return the boolean mask keeping the n largest |score| of every m consecutive channels (ties: lower index)."""
    *lead, k = score.shape
    a = score.abs().reshape(*lead, k // m, m)
    # Stable sort on -|a| puts the lower index first among equal magnitudes.
    order = torch.sort(-a, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(m, device=a.device).expand_as(order).contiguous())
    return (rank < n).reshape(*lead, k)


def sparsify_ref(x: torch.Tensor, thresh: torch.Tensor | float, shift: Optional[torch.Tensor] = None,
                 nm: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Return x_s = (x − m)⊙1[|x − m| > t] (or the N:M selection of x − m), in x's dtype."""
    z = x - shift.to(x.dtype) if shift is not None else x
    keep = nm_mask_ref(z, *nm) if nm is not None else z.abs() > torch.as_tensor(thresh, dtype=z.dtype, device=z.device)
    return torch.where(keep, z, torch.zeros_like(z))


def _select_out(y: torch.Tensor, out_thresh, out_shift) -> torch.Tensor:
    """The output selection of a producer (`out_thresh`), in y's dtype: y ← (y − m)⊙1[|y − m| > t]."""
    if out_thresh is None:
        return y
    return sparsify_ref(y, torch.as_tensor(out_thresh, dtype=y.dtype, device=y.device).reshape(-1), out_shift)


def sparse_gemv_ref(
    x: torch.Tensor,
    wt: torch.Tensor,
    thresh: torch.Tensor | float | None,
    *,
    shift: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    act: str = "none",
    segments: Sequence[int] = (),
    nm: Optional[tuple[int, int]] = None,
    out_thresh: torch.Tensor | float | None = None,
    out_shift: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference of `sparse_gemv`: per column segment s, y = act(W_s·x_s + bias) + residual, in the
    residual's dtype, else the weights' (thresh None: x_s = x; out_thresh: the output selected for the next GEMV before the cast)."""
    acc = _acc_dtype(wt)
    xf = rmsnorm_ref(x, norm_weight, eps) if norm_weight is not None else x.to(acc)
    k, n = wt.shape
    bounds = [0, *segments, n]
    t = torch.as_tensor(-1.0 if thresh is None else thresh, dtype=acc, device=x.device)
    t = t.reshape(-1, 1).expand(len(bounds) - 1, k) if t.dim() <= 1 else t
    outs = []
    for s in range(len(bounds) - 1):
        m = None if shift is None else shift.reshape(-1, k)[s].to(acc)
        xs = sparsify_ref(xf, t[s], m, nm)
        outs.append(xs.to(wt.dtype).to(acc) @ wt[:, bounds[s]:bounds[s + 1]].to(acc))
    y = torch.cat(outs, dim=-1)
    if bias is not None:
        y = y + bias.to(acc)
    y = act_ref(y, act)
    if residual is not None:
        y = y + residual.to(acc)
    return _select_out(y, out_thresh, out_shift).to(residual.dtype if residual is not None else wt.dtype)


def sparse_gated_mlp_ref(
    x: torch.Tensor,
    wt_gate: torch.Tensor,
    wt_up: torch.Tensor,
    thresh: torch.Tensor | float | None,
    *,
    shift: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    act: str = "silu",
    nm: Optional[tuple[int, int]] = None,
    out_thresh: torch.Tensor | float | None = None,
    out_shift: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference of `sparse_gated_mlp`: act(W_g·x_s,g + b_g) ⊙ (W_u·x_s,u + b_u), in the weights' dtype (thresh None:
    x_s = x; out_thresh: h selected for the down projection before the cast)."""
    acc = _acc_dtype(wt_gate)
    xf = rmsnorm_ref(x, norm_weight, eps) if norm_weight is not None else x.to(acc)
    k = wt_gate.shape[0]
    t = torch.as_tensor(-1.0 if thresh is None else thresh, dtype=acc, device=x.device)
    t = t.reshape(-1, 1).expand(2, k) if t.dim() <= 1 else t
    ys = []
    for i, wt in enumerate((wt_gate, wt_up)):
        m = None if shift is None else shift[i].to(acc)
        xs = sparsify_ref(xf, t[i], m, nm)
        y = xs.to(wt.dtype).to(acc) @ wt.to(acc)
        if bias is not None:
            y = y + bias[i].to(acc)
        ys.append(y)
    return _select_out(act_ref(ys[0], act) * ys[1], out_thresh, out_shift).to(wt_gate.dtype)


def cats_up_ref(x: torch.Tensor, w_up: torch.Tensor, a: torch.Tensor, thresh: torch.Tensor | float, *,
                norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6, act: str = "none") -> torch.Tensor:
    """Reference of `cats_up`: where(|a| > t, a ⊙ act(W_u·x̂), 0), in a's dtype."""
    acc = _acc_dtype(w_up)
    xf = rmsnorm_ref(x, norm_weight, eps) if norm_weight is not None else x.to(acc)
    up = act_ref(xf.to(w_up.dtype).to(acc) @ w_up.to(acc).t(), act)
    af = a.to(acc)
    t = torch.as_tensor(thresh, dtype=acc, device=x.device)
    return torch.where(af.abs() > t, af * up, torch.zeros_like(up)).to(a.dtype)


def lowrank_add_ref(x: torch.Tensor, thresh: torch.Tensor, v: torch.Tensor, ust: torch.Tensor, ranks: torch.Tensor,
                    out: torch.Tensor, *, norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                    gated: str = "none", segments: Sequence[int] = ()) -> torch.Tensor:
    """Reference of `lowrank_add`: per site s, out[:, rows_s] += ((x̂ ⊙ 1[0 < |x̂| ≤ t_s]) · V_s) · UST_sᵀ in
    float32 (x̂: x, RMSNorm(x)·g, or act(gate)·up of a pair's raw sums), added into out in place."""
    if gated != "none":
        xf = act_ref(x[0].float(), gated) * x[1].float()
    else:
        xf = rmsnorm_ref(x, norm_weight, eps).float() if norm_weight is not None else x.float()
    s, r = ranks.numel(), ust.shape[1]
    n = ust.shape[0]
    bounds = [0, *segments, n]
    t = thresh.float().reshape(s, -1)
    ys = []
    for i in range(s):
        ri = int(ranks[i])
        keep = (xf.abs() <= t[i]) & (xf != 0)
        z = (xf * keep) @ v[:, i * r:i * r + ri].float()
        ys.append(z @ ust[bounds[i]:bounds[i + 1], :ri].float().t())
    y = torch.cat(ys, dim=-1)
    if out.dim() == 3:  # a pair's [2, B, N/2]
        y = torch.stack([y[:, :n // 2], y[:, n // 2:]])
    out.copy_((out.float() + y).to(out.dtype))
    return out


def rope_ref(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Return x·cos + rotate_half(x)·sin for x [B, H, D] at positions pos [B] (HF Llama convention), float32."""
    ang = pos.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]  # [B, D/2]
    emb = torch.cat([ang, ang], dim=-1)[:, None, :]
    xf = x.to(torch.float32)
    half = xf.shape[-1] // 2
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return xf * (emb.cos() * scale) + rot * (emb.sin() * scale)


def decode_attention_ref(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                         inv_freq: torch.Tensor, n_heads: int, n_kv_heads: int, *,
                         sm_scale: float | None = None, rope_scale: float = 1.0, softcap: float = 0.0,
                         window: int = 0, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                         norm_eps: float = 1e-6, norm_f32: bool = False) -> torch.Tensor:
    """Reference of `decode_attention`: writes roped k/v at pos into the caches, returns attn [B, H·D] in the
    caches' dtype (softcap:
    scores ← c·tanh(scores / c); window: the last `window` positions only, the new one included; q_norm,
    k_norm: each head RMS-normalised and scaled before RoPE, rounded to qkv's dtype before the scale unless
    norm_f32, and to the caches' after it)."""
    b, hkv, s, d = k_cache.shape
    q = qkv[:, : n_heads * d].reshape(b, n_heads, d)
    k = qkv[:, n_heads * d:(n_heads + n_kv_heads) * d].reshape(b, n_kv_heads, d)
    v = qkv[:, (n_heads + n_kv_heads) * d:].reshape(b, n_kv_heads, d)
    if q_norm is not None:
        def head_norm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            x32 = x.to(torch.float32)
            y = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + norm_eps)
            y = y if norm_f32 else y.to(qkv.dtype).to(torch.float32)
            return (y * g.to(torch.float32)).to(k_cache.dtype)
        q, k = head_norm(q, q_norm), head_norm(k, k_norm)
    q = rope_ref(q, pos, inv_freq, rope_scale)
    k = rope_ref(k, pos, inv_freq, rope_scale)
    scale = d ** -0.5 if sm_scale is None else sm_scale
    out = torch.empty(b, n_heads, d, dtype=torch.float32, device=qkv.device)
    for i in range(b):
        p = int(pos[i])
        k_cache[i, :, p] = k[i].to(k_cache.dtype)
        v_cache[i, :, p] = v[i].to(v_cache.dtype)
        p0 = max(0, p + 1 - window) if window > 0 else 0
        keys = k_cache[i, :, p0: p + 1].to(torch.float32).repeat_interleave(n_heads // n_kv_heads, dim=0)
        vals = v_cache[i, :, p0: p + 1].to(torch.float32).repeat_interleave(n_heads // n_kv_heads, dim=0)
        s = (q[i, :, None, :] * scale) @ keys.transpose(1, 2)  # [H, 1, p+1-p0]
        if softcap > 0:
            s = torch.tanh(s / softcap) * softcap
        att = torch.softmax(s, dim=-1)
        out[i] = (att @ vals)[:, 0]
    return out.reshape(b, n_heads * d).to(k_cache.dtype)


def silu_mul_ref(gu: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """Reference of `silu_mul`: act(gate)⊙up for [B, 2I] input, in its dtype."""
    g, u = gu.to(torch.float32).chunk(2, dim=-1)
    return (act_ref(g, act) * u).to(gu.dtype)


def add_rmsnorm_ref(x: torch.Tensor, delta: torch.Tensor, g: torch.Tensor,
                    eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `add_rmsnorm`: (r, rmsnorm(r)·g) with r = x + delta rounded to x's dtype (HF rounding)."""
    r = (x.to(torch.float32) + delta.to(torch.float32)).to(x.dtype)
    return r, hf_rmsnorm_ref(r, g, eps)


def hf_rmsnorm_ref(x: torch.Tensor, g: torch.Tensor, eps: float = 1e-6, scale_in_f32: bool = False) -> torch.Tensor:
    """Reference of `rmsnorm`: HF Llama's rounding (normalise in float32, cast to x's dtype, scale by g), or with
    scale_in_f32 Gemma's (normalise and scale by g in float32, one cast)."""
    xf = x.to(torch.float32)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if not scale_in_f32:
        y = y.to(x.dtype).to(torch.float32)
    return (g.to(torch.float32) * y).to(x.dtype)


def add_normed_ref(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, eps: float = 1e-6, scale_in_f32: bool = False,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Reference of `add_normed`: x += rmsnorm(y)·g (rounded as `hf_rmsnorm_ref`, then to out_dtype) in place,
    y zeroed; returns x."""
    n = hf_rmsnorm_ref(y, g, eps, scale_in_f32).to(x.dtype if out_dtype is None else out_dtype)
    x.copy_(x.to(torch.float32) + n.to(torch.float32))
    y.zero_()
    return x


def moe_route_ref(logits: torch.Tensor, top_k: int, *, renorm: bool,
                  w_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `moe_route`, as transformers' routers compute it: softmax over every expert in float32, the
    top_k largest, renormalised to sum 1 with `renorm`; (ids int64 [B, top_k], weights in w_dtype)."""
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    if renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w.to(w_dtype)


def experts_gated_mlp_ref(x: torch.Tensor, wt_gate: torch.Tensor, wt_up: torch.Tensor, thresh: torch.Tensor | float,
                          experts: torch.Tensor, *, norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                          nm: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Reference of `sparse_gated_mlp(experts=, out=)`: per token b and routed expert t, the raw sums
    W_g[e]·x_s,g and W_u[e]·x_s,u, float32 [B, T, 2, I] (e = experts[b, t]; wt_*: stacked [E, K, I]; thresh: the
    pair's rows, or [E, 2, K] a pair per expert)."""
    acc = _acc_dtype(wt_gate)
    xf = rmsnorm_ref(x, norm_weight, eps) if norm_weight is not None else x.to(acc)
    k = wt_gate.shape[1]
    t = torch.as_tensor(thresh, dtype=acc, device=x.device)
    idx = experts.reshape(x.shape[0], -1).long()
    # [B, T, 2, K]: the rows shared by every expert, or each routed expert's own ([E, 2, K])
    t = t[idx] if t.dim() == 3 else (t.reshape(-1, 1).expand(2, k) if t.dim() <= 1 else t).expand(*idx.shape, 2, k)
    sums = []
    for j, wt in enumerate((wt_gate, wt_up)):
        xs = sparsify_ref(xf[:, None, :].expand(*idx.shape, k), t[:, :, j], None, nm)  # fp32, as the tiles keep it
        sums.append(torch.einsum("btk,btkn->btn", xs, wt[idx].to(acc)))
    return torch.stack(sums, dim=2)


def experts_gemv_ref(x: torch.Tensor, wt: torch.Tensor, thresh: torch.Tensor | float, experts: torch.Tensor, *,
                     expert_weights: Optional[torch.Tensor] = None, gated: str = "none",
                     norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                     nm: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Reference of `sparse_gemv(experts=)`: Σ_t w_bt·W[e_bt]·x_s per token b, float32 [B, N] (the sum the op adds
    into or writes); gated: x is the pairs' raw sums [B, T, 2, K] and each expert's input is act(gate)·up."""
    acc = _acc_dtype(wt)
    idx = experts.reshape(experts.shape[0] if experts.dim() == 2 else 1, -1).long()
    b, top = idx.shape
    k = wt.shape[1]
    if gated != "none":
        xf = act_ref(x[:, :, 0].to(acc), gated) * x[:, :, 1].to(acc)  # [B, T, K]
    else:
        xf = rmsnorm_ref(x, norm_weight, eps) if norm_weight is not None else x.to(acc)
        xf = xf[:, None, :].expand(b, top, k)
    t = torch.as_tensor(thresh, dtype=acc, device=x.device)
    t = t[idx][:, :, 0] if t.dim() == 3 else t.reshape(-1)  # each routed expert's own row ([E, 1, K]) or a shared one
    xs = sparsify_ref(xf, t, None, nm)
    if expert_weights is not None:
        xs = xs * expert_weights.reshape(b, top, 1).to(acc)
    return torch.einsum("btk,btkn->bn", xs, wt[idx].to(acc))


def topk_thresholds_ref(x: torch.Tensor, n_zero: torch.Tensor, out: torch.Tensor, *,
                        norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                        score_w: Optional[torch.Tensor] = None, gated: Optional[str] = None) -> torch.Tensor:
    """Reference of `topk_thresholds`: per selection row s, the n_zero[s]-th smallest score (0 where n_zero ≤ 0) of
    |input| or |input|·score_w[s], written into out [S], or per channel into out [S, K]: the largest float whose
    float32 product with score_w is at most that level (∞ where score_w is 0)."""
    if gated:
        v = act_ref(x[0].float(), gated) * x[1].float()
    elif norm_weight is not None:
        v = rmsnorm_ref(x, norm_weight, eps).float()
    else:
        v = x.float()
    v = v.reshape(1, -1)
    score = v.abs() if score_w is None else v.abs() * score_w.float()          # [1 or S, K]
    # the n_zero-th smallest score per row, on the device (no host sync: a captured graph recomputes it)
    nz = n_zero.long().reshape(-1, 1)
    kth = score.expand(nz.shape[0], -1).sort(dim=-1).values.gather(-1, (nz - 1).clamp(min=0))
    t = torch.where(nz > 0, kth, torch.zeros_like(kth))                       # [S, 1]
    if score_w is None:
        out.copy_(t.reshape(-1))
    else:
        w = score_w.float()
        ws = torch.where(w > 0, w, torch.ones_like(w))
        q = t / ws   # then the largest float whose product with w is at most t: |x| > q ⇔ fl(|x|·w) > t
        q = torch.where(q * ws > t, torch.nextafter(q, torch.full_like(q, -math.inf)), q)
        up = torch.nextafter(q, torch.full_like(q, math.inf))
        q = torch.where(up * ws <= t, up, q)
        out.copy_(torch.where(w > 0, q, torch.full_like(w, math.inf)))
    return out


def sparse_mlp_ref(x: torch.Tensor, wt_gate: torch.Tensor, wt_up: torch.Tensor, wt_down: torch.Tensor,
                   thresh: torch.Tensor | float, down_thresh: torch.Tensor | float, *,
                   shift: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   down_shift: Optional[torch.Tensor] = None, down_bias: Optional[torch.Tensor] = None,
                   norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6, act: str = "silu",
                   nm: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Reference of `sparse_mlp`: W_d·s_d(h) + b_d with h = act(W_g·x_s,g + b_g)⊙(W_u·x_s,u + b_u) kept in float32
    (as the kernel forms it), returned in float32 [B, D] (what it adds into its fp32 tensor)."""
    acc = _acc_dtype(wt_gate)
    xf = rmsnorm_ref(x, norm_weight, eps) if norm_weight is not None else x.to(acc)
    k, inter = wt_gate.shape
    t = torch.as_tensor(thresh, dtype=acc, device=x.device)
    t = t.reshape(-1, 1).expand(2, k) if t.dim() <= 1 else t
    gu = []
    for j, wt in enumerate((wt_gate, wt_up)):
        xs = sparsify_ref(xf, t[j], None if shift is None else shift[j].to(acc), nm)
        y = xs.to(wt.dtype).to(acc) @ wt.to(acc)
        gu.append(y + bias[j].to(acc) if bias is not None else y)
    h = act_ref(gu[0], act) * gu[1]
    hs = sparsify_ref(h, torch.as_tensor(down_thresh, dtype=acc, device=x.device).reshape(-1),
                      None if down_shift is None else down_shift.to(acc), nm)
    y = hs.to(wt_down.dtype).to(acc) @ wt_down.to(acc)
    return (y + down_bias.to(acc) if down_bias is not None else y).float()
