"""Fused gate/up projection of a gated MLP: h = act(W_g·x_s,g) ⊙ (W_u·x_s,u), one read of x, one launch
(act: silu, SwiGLU; or gelu-tanh, Gemma's GeGLU).

The same kernels as `sparse_gemv` in PAIR mode: gate and up are read side by side (the one-shot tiles and the
gather walk: in separate programs of one launch; the masked walk: in one program), and the last program of each
column strip writes h = act(gate)·up, so neither product round-trips through memory.
The down projection then takes h as an input-sparse GEMV (TEAL thresholds |h|; M-COUNTDOWN is
the same computation with its threshold on h).
"""

from __future__ import annotations

from typing import Optional

import torch

from .configs import choose_impl
from .gemv_common import wshape
from .gather_gemv import ActiveLists, check_lists, launch_gather
from .oneshot_gemv import launch_oneshot
from .sparse_gemv import (ACTS, _as_rows, _check_common, _check_presel, _launch, _out_rows, _validate_nm, check_experts,
                          expert_rows, list_rule)


@torch.library.custom_op("actsparse::sparse_gated_mlp", mutates_args=())
def _sparse_gated_mlp_op(x: torch.Tensor, wt_gate: torch.Tensor, wt_up: torch.Tensor, thresh: Optional[torch.Tensor],
                         shift: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         norm_weight: Optional[torch.Tensor], eps: float, act: int, nm_n: int, nm_m: int,
                         impl: str = "auto", out_thresh: Optional[torch.Tensor] = None,
                         out_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _launch(x, wt_gate, wt_up, thresh, shift, bias, None, norm_weight, eps, act, [], nm_n, nm_m, "pair", impl,
                   out_thresh, out_shift)


@torch.library.custom_op("actsparse::sparse_gated_mlp_sums",
                         mutates_args=("out", "down_idx", "down_val", "down_count"))
def _sparse_gated_mlp_sums_op(x: torch.Tensor, wt_gate: torch.Tensor, wt_up: torch.Tensor, thresh: torch.Tensor,
                              shift: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                              norm_weight: Optional[torch.Tensor], eps: float, nm_n: int, nm_m: int,
                              out: torch.Tensor, impl: str = "oneshot",
                              experts: Optional[torch.Tensor] = None, down_idx: Optional[torch.Tensor] = None,
                              down_val: Optional[torch.Tensor] = None, down_count: Optional[torch.Tensor] = None,
                              down_seg: int = 0, down_thresh: Optional[torch.Tensor] = None,
                              down_shift: Optional[torch.Tensor] = None, down_nm_n: int = 0, down_nm_m: int = 1,
                              down_act: int = 1) -> None:
    if experts is not None:  # one token a program (the one-shot tiles), or batch 1's two lists (the gather walk)
        which, cfg = choose_impl("pair", x.shape[1], wt_gate.shape[-1], 1, "gather" if impl == "gather" else "oneshot",
                                 accum=True)
        launch = launch_gather if which == "gather" else launch_oneshot
        launch(x, wt_gate, wt_up, thresh, shift, bias, None, norm_weight, eps, 0, [], nm_n, nm_m, cfg,
               accumulate=out, zero_first=True, experts=experts)
        return
    which, cfg = choose_impl("pair", x.shape[1], wshape(wt_gate)[1], x.shape[0], impl, accum=True)
    if down_idx is not None:  # the gather walk also writes down's lists
        down = dict(lists=ActiveLists(down_idx, down_val, down_count, down_seg), thresh=down_thresh,
                    shift=down_shift, nm_n=down_nm_n, nm_m=down_nm_m, act=down_act)
        launch_gather(x, wt_gate, wt_up, thresh, shift, bias, None, norm_weight, eps, 0, [], nm_n, nm_m, cfg,
                      accumulate=out, zero_first=True, down=down)
        return
    launch = launch_gather if which == "gather" else launch_oneshot
    launch(x, wt_gate, wt_up, thresh, shift, bias, None, norm_weight, eps, 0, [], nm_n, nm_m, cfg,
           accumulate=out, zero_first=True)


@_sparse_gated_mlp_op.register_fake
def _(x, wt_gate, wt_up, thresh, shift, bias, norm_weight, eps, act, nm_n, nm_m, impl="auto", out_thresh=None,
      out_shift=None):
    return x.new_empty((x.shape[0], wshape(wt_gate)[1]), dtype=wt_gate.dtype)


def sparse_gated_mlp(
    x: torch.Tensor,
    wt_gate: torch.Tensor,
    wt_up: torch.Tensor,
    thresh: Optional[torch.Tensor],
    *,
    shift: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    act: str = "silu",
    nm: Optional[tuple[int, int]] = None,
    impl: str = "auto",
    out_thresh: Optional[torch.Tensor] = None,
    out_shift: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    experts: Optional[torch.Tensor] = None,
    down_lists: Optional[ActiveLists] = None,
    down_thresh: Optional[torch.Tensor] = None,
    down_shift: Optional[torch.Tensor] = None,
    down_nm: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Return h [B, I] = act(W_g·x_s,g + b_g) ⊙ (W_u·x_s,u + b_u) with per-projection thresholds.

    x: [B, K] (the residual stream when norm_weight is given); wt_gate, wt_up: [K, I] row-major;
    thresh: float32 [2] or [2, K] (row 0 gate, row 1 up); shift: [2, K]; bias: [2, I]; act: "silu" (SwiGLU)
    or "gelu_tanh" (GeGLU, Gemma's gelu_pytorch_tanh). thresh=None: x
    is already selected and both projections read it as is. out_thresh [1] or [I] / out_shift [I]: h is
    written selected for the down projection, h ← (h − m)⊙1[|h − m| > t] (see `sparse_gemv`).
    impl: "oneshot", "gather", "masked" or "auto" (see `sparse_gemv`).
    out: a contiguous float32 [2, B, I] tensor that receives the raw sums W_g·x_s,g + b_g and W_u·x_s,u + b_u
    instead (no act, no product) and is returned: the one-shot tiles ("auto"; zeroed first inside the norm's
    pre-pass) or the gather walk (written by its programs), with no counter or epilogue, for a down projection
    that forms act(gate)·up itself (`sparse_gemv(gated=act)`).
    experts: int32/int64 [B, T] expert ids on the device (a mixture-of-experts layer's top-k per token): wt_gate and
    wt_up are the stacked transposed expert weights [E, K, I] and out, a contiguous float32 [B, T, 2, I], receives
    each routed expert's raw gate and up sums (only the routed experts' kept rows are read), for
    `sparse_gemv(experts=, gated=act)`. thresh [2] / [2, K] serves every expert (they share the input x), [E, 2, K]
    holds a pair of rows per expert; the one-shot tiles run it, one token a program ("auto", "oneshot"), or at batch
    1 the gather walk ("gather": x compacted once into the two lists every routed expert walks; one rule for all
    experts); no shift or bias.
    down_lists (with out=, batch 1, impl="gather"; `active_lists(I, seg)`, seg a multiple of the walk's column
    strip): the walk's last program of each strip also forms h = act(gate)·up for its columns, selects it with the
    down projection's rule (down_thresh float32 [1] or [1, I], down_shift [1, I], or down_nm=(N, M)) and appends
    the kept channels to `down_lists`, so down runs as `gather_lists(down_lists, wt_down, accumulate=)` without a
    compaction launch of its own.
    """
    if experts is not None:
        experts = check_experts(experts, None, (wt_gate, wt_up), ("wt_gate", "wt_up"), impl, out,
                                {"shift": shift is not None, "bias": bias is not None,
                                 "out_thresh": out_thresh is not None,
                                 "down_lists": any(v is not None for v in (down_lists, down_thresh, down_shift,
                                                                           down_nm))})
        b, top = experts.shape
        _check_common(x, wt_gate[0], "wt_gate")
        if wt_gate.shape != wt_up.shape:
            raise ValueError(f"wt_gate and wt_up must have the same shape, got {tuple(wt_gate.shape)} and "
                             f"{tuple(wt_up.shape)}")
        k, n = wt_gate.shape[1:]
        if x.shape[0] != b:
            raise ValueError(f"experts has {b} rows (one per token) but x has {x.shape[0]}")
        thresh = expert_rows(thresh, 2, wt_gate.shape[0], k, impl)
        if norm_weight is not None and tuple(norm_weight.shape) != (k,):
            raise ValueError(f"norm_weight must have shape [{k}], got {tuple(norm_weight.shape)}")
        if out.dtype != torch.float32 or tuple(out.shape) != (b, top, 2, n) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 [{b}, {top}, 2, {n}] tensor (per routed expert: gate "
                             f"sums, up sums), got {out.dtype} {tuple(out.shape)}")
        nm_n, nm_m = _validate_nm(nm)
        torch.ops.actsparse.sparse_gated_mlp_sums(x, wt_gate, wt_up, thresh, None, None, norm_weight, float(eps),
                                                  nm_n, nm_m, out, "gather" if impl == "gather" else "oneshot",
                                                  experts)
        return out
    _check_common(x, wt_gate, "wt_gate")
    _check_common(x, wt_up, "wt_up")
    if wt_gate.shape != wt_up.shape or wt_gate.stride() != wt_up.stride():
        raise ValueError(f"wt_gate and wt_up must have the same shape and strides, got "
                         f"{tuple(wt_gate.shape)}/{wt_gate.stride()} and {tuple(wt_up.shape)}/{wt_up.stride()}")
    k, n = wshape(wt_gate)
    if thresh is None:
        _check_presel(shift, norm_weight, nm)
    else:
        thresh = _as_rows(thresh, 2, k, "thresh")
    out_thresh, out_shift = _out_rows(out_thresh, out_shift, n)
    if shift is not None:
        shift = _as_rows(shift.float(), 2, k, "shift").contiguous()
    if bias is not None and tuple(bias.shape) != (2, n):
        raise ValueError(f"bias must have shape [2, {n}] (gate row, up row), got {tuple(bias.shape)}")
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"norm_weight must have shape [{k}], got {tuple(norm_weight.shape)}")
    if act not in ACTS or act == "none":
        raise ValueError(f"act must be 'silu' or 'gelu_tanh' (the gate's activation), got {act!r}")
    nm_n, nm_m = _validate_nm(nm)
    if out is not None:
        b = x.shape[0]
        if out.dtype != torch.float32 or tuple(out.shape) != (2, b, n) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 [2, {b}, {n}] tensor (gate sums, up sums), got "
                             f"{out.dtype} {tuple(out.shape)}")
        if thresh is None or out_thresh is not None:
            raise ValueError("out= takes the raw sums: it needs thresh and cannot select the output (out_thresh)")
        choose_impl("pair", k, n, b, impl, packed=wt_gate.dim() == 3, accum=True)
        lists = {}
        if down_lists is not None:
            lists = _down_list_args(down_lists, down_thresh, down_shift, down_nm, act, b, k, n, impl, x.device)
        elif down_thresh is not None or down_shift is not None or down_nm is not None:
            raise ValueError("down_thresh, down_shift and down_nm select down's lists: they need down_lists=")
        torch.ops.actsparse.sparse_gated_mlp_sums(x, wt_gate, wt_up, thresh, shift, bias, norm_weight, float(eps),
                                                  nm_n, nm_m, out, impl, **lists)
        return out
    if down_lists is not None:
        raise ValueError("down_lists= is written beside the raw sums: it needs out=")
    # Rejects a bad impl / batch here.
    choose_impl("pair", k, n, x.shape[0], impl, packed=wt_gate.dim() == 3, presel=thresh is None,
                out_sel=out_thresh is not None)
    return torch.ops.actsparse.sparse_gated_mlp(x, wt_gate, wt_up, thresh, shift, bias, norm_weight,
                                                float(eps), ACTS[act], nm_n, nm_m, impl, out_thresh, out_shift)


def _down_list_args(lists, thresh, shift, nm, act: str, b: int, k: int, n: int, impl: str, device) -> dict:
    """The custom op's arguments of a valid `sparse_gated_mlp(down_lists=)`; ValueError naming what is not."""
    if b != 1:
        raise ValueError(f"down_lists= writes one token's lists: batch 1, got {b}")
    if impl != "gather":
        raise ValueError(f"down_lists= is written by the gather walk's last programs: impl='gather', got {impl!r}")
    check_lists(lists, n, device)
    _, cfg = choose_impl("pair", k, n, 1, "gather", accum=True)
    if lists.seg % cfg.block_n:
        raise ValueError(f"down_lists' seg ({lists.seg}) must be a multiple of the walk's column strip "
                         f"({cfg.block_n}): a strip appends to one list")
    thresh, shift, nm_n, nm_m = list_rule(lists, thresh, shift, nm, n, "down_")
    if nm_n and cfg.block_n % nm_m:
        raise ValueError(f"down_nm=(N, M) needs M dividing the walk's column strip ({cfg.block_n}), got M={nm_m}")
    return dict(down_idx=lists.idx, down_val=lists.val, down_count=lists.count, down_seg=lists.seg,
                down_thresh=thresh, down_shift=shift, down_nm_n=nm_n, down_nm_m=nm_m, down_act=ACTS[act])
