"""The public sparse-GEMV op: y = act(W·x_s + bias) + residual, x_s = (x̂ − m)⊙1[|x̂ − m| > t], one fused op.

`sparse_gemv` (and `sparse_gated_mlp` in gated_mlp.py) validate their arguments, ask `configs.choose_impl`
which kernel runs (the one-shot tiles, the gather walk or the masked walk) and launch it through a registered
`torch.library` custom op, so torch.compile and CUDA graphs capture it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .configs import choose_impl
from .gather_gemv import ActiveLists, check_lists, launch_gather
from .gemv_common import ACTS, out_dtype, wshape
from .masked_gemv import launch_masked
from .oneshot_gemv import launch_oneshot




def _as_rows(t: torch.Tensor, nseg: int, k: int, name: str) -> torch.Tensor:
    """Return `t` as a float32 [nseg, k] view (a [nseg] tensor broadcasts along k with stride 0)."""
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() == 1 and t.shape[0] == nseg:
        t = t[:, None].expand(nseg, k)
    if tuple(t.shape) != (nseg, k):
        raise ValueError(f"{name} must have shape [{nseg}] or [{nseg}, {k}] (one row per segment), "
                         f"got {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}; convert it once when the plan is loaded")
    if t.stride(1) not in (0, 1):
        t = t.contiguous()
    return t


def _check_common(x: torch.Tensor, wt: torch.Tensor, name: str = "wt") -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [batch, in_features], got shape {tuple(x.shape)}")
    if wt.dim() == 3:  # packed [N / W, K, W] (pack_weight)
        if wt.shape[1] != x.shape[1] or not wt.is_contiguous() or wt.shape[2] < 16 or wt.shape[2] & (wt.shape[2] - 1):
            raise ValueError(f"a packed {name} must be contiguous [out_features / W, in_features={x.shape[1]}, W] with "
                             f"W a power of two ≥ 16 (pack_weight), got shape {tuple(wt.shape)}")
    elif wt.dim() != 2 or wt.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be the transposed weight [in_features={x.shape[1]}, out_features], "
                         f"got shape {tuple(wt.shape)}; pass weight.t().contiguous()")
    elif wt.stride(1) != 1:
        raise ValueError(f"{name} must be row-major [in, out] (stride(1) == 1), got strides {wt.stride()}; "
                         "pass weight.t().contiguous()")
    if x.stride(1) != 1:
        raise ValueError(f"x must be contiguous along in_features, got strides {x.stride()}")
    if x.device != wt.device:
        raise ValueError(f"x is on {x.device} but {name} is on {wt.device}")


def pack_weight(wt: torch.Tensor, width: int = 32) -> torch.Tensor:
    """Return W^T [K, N] repacked as [N / width, K, width]: each strip of `width` output columns is one contiguous
    block, so the kept rows of a strip lie close together in memory (DRAM pages stay open across them)."""
    k, n = wt.shape
    if width < 16 or width & (width - 1) or n % width:
        raise ValueError(f"width must be a power of two ≥ 16 dividing out_features={n}, got {width}")
    return wt.reshape(k, n // width, width).permute(1, 0, 2).contiguous()


def _launch(x, wt, w2, thresh, shift, bias, residual, norm_weight, eps, act, bounds, nm_n, nm_m, kind, impl="auto",
            out_thresh=None, out_shift=None):
    """Run one sparse GEMV (or gate/up pair) on the kernel `choose_impl` picks."""
    b, k = x.shape
    which, cfg = choose_impl(kind, k, wshape(wt)[1], b, impl, packed=wt.dim() == 3, presel=thresh is None,
                             out_sel=out_thresh is not None)
    if which == "gather":
        return launch_gather(x, wt, w2, thresh, shift, bias, residual, norm_weight, eps, act, bounds, nm_n, nm_m, cfg)
    if which == "oneshot":
        return launch_oneshot(x, wt, w2, thresh, shift, bias, residual, norm_weight, eps, act, bounds, nm_n, nm_m,
                              cfg)
    return launch_masked(x, wt, w2, thresh, shift, bias, residual, norm_weight, eps, act, bounds, nm_n, nm_m, cfg,
                         out_thresh, out_shift)


@torch.library.custom_op("actsparse::sparse_gemv", mutates_args=())
def _sparse_gemv_op(x: torch.Tensor, wt: torch.Tensor, thresh: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                    norm_weight: Optional[torch.Tensor], eps: float, act: int, segments: list[int],
                    nm_n: int, nm_m: int, impl: str = "auto", out_thresh: Optional[torch.Tensor] = None,
                    out_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    kind = "qkv" if segments else "gemv"
    return _launch(x, wt, None, thresh, shift, bias, residual, norm_weight, eps, act, segments, nm_n, nm_m, kind,
                   impl, out_thresh, out_shift)


@torch.library.custom_op("actsparse::sparse_gemv_accumulate", mutates_args=("acc",))
def _sparse_gemv_acc_op(x: torch.Tensor, wt: torch.Tensor, thresh: torch.Tensor, shift: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor], eps: float,
                        segments: list[int], nm_n: int, nm_m: int, acc: torch.Tensor, zero_first: bool = False,
                        gated: int = 0, impl: str = "oneshot", experts: Optional[torch.Tensor] = None,
                        expert_weights: Optional[torch.Tensor] = None) -> None:
    if experts is not None:  # one token a program (the one-shot tiles), or batch 1's lists (the gather walk)
        which, cfg = choose_impl("gemv", x.shape[-1], wt.shape[-1], 1, "gather" if impl == "gather" else "oneshot",
                                 accum=True)
        launch = launch_gather if which == "gather" else launch_oneshot
        launch(x, wt, None, thresh, shift, bias, None, norm_weight, eps, 0, segments, nm_n, nm_m, cfg,
               accumulate=acc, zero_first=zero_first, gated=gated, experts=experts, expert_weights=expert_weights)
        return
    which, cfg = choose_impl("qkv" if segments else "gemv", x.shape[-1], wshape(wt)[1], acc.shape[0], impl,
                             accum=True)
    launch = launch_gather if which == "gather" else launch_oneshot
    launch(x, wt, None, thresh, shift, bias, None, norm_weight, eps, 0, segments, nm_n, nm_m, cfg,
           accumulate=acc, zero_first=zero_first, gated=gated)


@_sparse_gemv_op.register_fake
def _(x, wt, thresh, shift, bias, residual, norm_weight, eps, act, segments, nm_n, nm_m, impl="auto",
      out_thresh=None, out_shift=None):
    return x.new_empty((x.shape[0], wshape(wt)[1]), dtype=out_dtype(wt, residual))


def _check_presel(shift, norm_weight, nm) -> None:
    """thresh=None: x arrives already selected, so the selection's own operands must not be given."""
    given = [name for name, v in (("shift", shift), ("norm_weight", norm_weight), ("nm", nm)) if v is not None]
    if given:
        raise ValueError(f"thresh=None means x is already selected (its zeros are skipped); {', '.join(given)} "
                         "belong to the selection and must be None (fold a shift into bias)")


def _out_rows(out_thresh: Optional[torch.Tensor], out_shift: Optional[torch.Tensor],
              n: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Validate the output selection: float32 thresholds [1] or [N] (a [N] view) and a shift [N]."""
    if out_thresh is None:
        if out_shift is not None:
            raise ValueError("out_shift needs out_thresh (the output selection's thresholds)")
        return None, None
    def row(t: torch.Tensor) -> torch.Tensor:
        return t[None] if t.dim() == 1 and t.shape[0] == n else t

    out_thresh = _as_rows(row(out_thresh), 1, n, "out_thresh")[0]
    if out_shift is not None:
        out_shift = _as_rows(row(out_shift.float()), 1, n, "out_shift")[0].contiguous()
    return out_thresh, out_shift


def _gated_input(x: torch.Tensor, gated: str, norm_weight, into) -> torch.Tensor:
    """gated=: x must be a pair's raw sums, a contiguous float32 [2, B, K]; the op must add into / write a tensor."""
    if gated not in ACTS or gated == "none":
        raise ValueError(f"gated must be 'none', 'silu' or 'gelu_tanh', got {gated!r}")
    if x.dim() != 3 or x.shape[0] != 2 or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"gated= reads a gate/up pair's raw sums: x must be a contiguous float32 [2, B, K] "
                         f"(sparse_gated_mlp(out=)), got {x.dtype} {tuple(x.shape)}")
    if norm_weight is not None or into is None:
        raise ValueError("gated= forms act(gate)·up in the kernel's prologue: it takes no norm_weight and "
                         "needs accumulate= or out=")
    return x


def _check_accumulate(acc: torch.Tensor, x: torch.Tensor, n: int, act: str, residual, out_thresh, thresh,
                      name: str = "accumulate") -> None:
    """accumulate= / out= is a float32 [B, N] tensor, row-major, on x's device, taking the raw sum alone."""
    if acc.dtype != torch.float32 or tuple(acc.shape) != (x.shape[0], n) or acc.stride(1) != 1:
        raise ValueError(f"{name} must be a float32 [{x.shape[0]}, {n}] tensor contiguous along its columns, "
                         f"got {acc.dtype} {tuple(acc.shape)} with strides {acc.stride()}")
    if acc.device != x.device:
        raise ValueError(f"{name} is on {acc.device} but x is on {x.device}")
    clash = [what for what, bad in (("act", act != "none"), ("residual", residual is not None),
                                    ("out_thresh", out_thresh is not None), ("thresh=None", thresh is None)) if bad]
    if clash:
        raise ValueError(f"{name}= takes the raw sum W·x_s + bias in fp32 (an accumulate= tensor holds the residual "
                         f"itself); it cannot take {', '.join(clash)}")


def check_experts(experts: torch.Tensor, expert_weights: Optional[torch.Tensor], wts: Sequence[torch.Tensor],
                  names: Sequence[str], impl: str, into: Optional[torch.Tensor],
                  refused: dict[str, bool]) -> torch.Tensor:
    """experts=: an integer [B, T] tensor ([T] for one token) of expert ids on the weights' device, the weights
    stacked experts [E, K, N] (each row-major), expert_weights float32 like experts, the one-shot tiles adding into
    or writing a tensor; return experts as [B, T]. The ids stay on the device unchecked (a captured graph reads
    them): each must be < E."""
    if experts.dtype not in (torch.int32, torch.int64) or experts.dim() not in (1, 2) or not experts.is_contiguous():
        raise ValueError(f"experts must be a contiguous int32 or int64 [B, T] tensor of expert ids (top-k per token), "
                         f"got {experts.dtype} {tuple(experts.shape)}")
    experts = experts.reshape(1, -1) if experts.dim() == 1 else experts
    for wt, name in zip(wts, names):
        if wt.dim() != 3 or not wt.is_contiguous():
            raise ValueError(f"with experts=, {name} must be the stacked transposed expert weights, a contiguous "
                             f"[E, in_features, out_features] tensor, got shape {tuple(wt.shape)} and strides "
                             f"{wt.stride()}")
        if wt.device != experts.device:
            raise ValueError(f"experts is on {experts.device} but {name} is on {wt.device}")
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if expert_weights is not None and (expert_weights.dtype not in floats or not expert_weights.is_contiguous()
                                       or expert_weights.numel() != experts.numel()
                                       or expert_weights.shape[-1] != experts.shape[-1]):
        raise ValueError(f"expert_weights must be a contiguous float tensor shaped like experts "
                         f"{tuple(experts.shape)} (one routing weight per routed expert), got "
                         f"{expert_weights.dtype} {tuple(expert_weights.shape)}")
    if impl not in ("auto", "oneshot", "gather"):
        raise ValueError(f"experts= runs on the one-shot tiles or the gather walk; use impl='oneshot', 'gather' or "
                         f"'auto', got {impl!r}")
    if impl == "gather" and experts.shape[0] != 1:
        raise ValueError(f"experts= on the gather walk runs batch 1 (its lists are one token's); got batch "
                         f"{experts.shape[0]}: use impl='oneshot'")
    if into is None:
        raise ValueError("experts= runs adding into a tensor: give accumulate= or out=")
    clash = [what for what, bad in refused.items() if bad]
    if clash:
        raise ValueError(f"experts= takes no {', '.join(clash)} (one rule serves every expert of the layer; a shift "
                         f"would need W_e·m per expert, segments and packing are for dense q|k|v)")
    return experts


def expert_rows(thresh: Optional[torch.Tensor], nseg: int, e: int, k: int, impl: str = "oneshot") -> torch.Tensor:
    """experts=' thresholds: the op's rows [nseg] / [nseg, k] shared by every expert (returned [nseg, k]), or a row
    set per expert, float32 [E, nseg, k] (a per-expert scalar expanded along k; the one-shot tiles only)."""
    if thresh is None:
        raise ValueError("experts= selects inside the op: thresh must be given (zeros keep every nonzero input)")
    if thresh.dim() != 3:
        return _as_rows(thresh, nseg, k, "thresh")
    if impl == "gather":
        raise ValueError("experts= on the gather walk takes one rule for every expert (thresh [S] or [S, K]): its "
                         "lists are compacted once for all; per-expert thresholds run on impl='oneshot'")
    if tuple(thresh.shape) != (e, nseg, k) or thresh.dtype != torch.float32 or thresh.stride(2) not in (0, 1):
        raise ValueError(f"per-expert thresholds must be a float32 [{e}, {nseg}, {k}] tensor (one row set per "
                         f"expert; expand a scalar along the last dim), got {thresh.dtype} {tuple(thresh.shape)}")
    return thresh


def _validate_nm(nm: Optional[tuple[int, int]]) -> tuple[int, int]:
    if nm is None:
        return 0, 0
    n, m = nm
    if not (0 < n < m) or m & (m - 1):
        raise ValueError(f"nm must be (N, M) with 0 < N < M and M a power of two, got {nm}")
    return n, m


def sparse_gemv(
    x: torch.Tensor,
    wt: torch.Tensor,
    thresh: Optional[torch.Tensor],
    *,
    shift: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    act: str = "none",
    segments: Sequence[int] = (),
    nm: Optional[tuple[int, int]] = None,
    impl: str = "auto",
    out_thresh: Optional[torch.Tensor] = None,
    out_shift: Optional[torch.Tensor] = None,
    accumulate: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    gated: str = "none",
    experts: Optional[torch.Tensor] = None,
    expert_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Return y [B, N] = act(W·x_s + bias) + residual, with x_s = (x̂ − m)⊙1[|x̂ − m| > t] and x̂ = rmsnorm(x) or x.

    x: [B, K]; wt: W^T [K, N] row-major, or packed [N / W, K, W] (`pack_weight`; the masked kernel); thresh: float32 [S] or [S, K] (S = len(segments) + 1, one row
    per output-column segment, e.g. q/k/v); shift: [S, K]; bias: [N]; residual: [B, N];
    norm_weight: [K] RMSNorm weight applied to x first; act: "none", "silu" or "gelu_tanh" (Gemma's
    gelu_pytorch_tanh); nm=(N, M) keeps the top N of every M consecutive channels instead of thresholding.
    thresh=None: x is already selected (x_s = x, its zeros skipped; shift, norm_weight and nm must be None),
    e.g. a producer's output with out_thresh.
    out_thresh: float32 [1] or [N], out_shift: [N]: the output is written selected for the next GEMV,
    y ← (y − m)⊙1[|y − m| > t] (after bias, act and residual). impl: "oneshot" (one program per weight
    tile, masked row loads, fp32 atomic sums; batch ≤ 16, [K, N] weights, selection inside the op),
    "gather" (a compaction pass, then a walk that gathers only the active weight rows; batch ≤ 4, same
    conditions), "masked" (a split-K walk whose masked row loads skip the unselected rows; anything) or
    "auto" (the kernel measured fastest for the op where it can run: `configs.choose_impl`).
    accumulate: a float32 [B, N] tensor (e.g. the residual stream kept in fp32) that W·x_s + bias is added into
    in place, and returned: the kernel's partials land in it directly (no output, counter or epilogue);
    act must be "none" and residual, out_thresh None (it is its own residual); the one-shot tiles ("auto") or
    the gather walk run it.
    out: a contiguous float32 [B, N] tensor that receives W·x_s + bias, as accumulate= after zeroing it (inside
    the norm's pre-pass where norm_weight is given): the raw sums in fp32 for a consumer that reads them (e.g.
    q|k|v for the attention kernel), with no output cast, counter or epilogue.
    gated: "silu" or "gelu_tanh": x is a gate/up pair's raw fp32 sums [2, B, K] (`sparse_gated_mlp(out=)`) and
    the input is act(gate)·up, formed in the kernel's prologue (needs accumulate= or out=; no norm_weight).
    experts: int32/int64 [B, T] expert ids on the device (a mixture-of-experts layer's top-k per token): wt is the
    stacked transposed expert weights [E, K, N] and token b adds Σ_t w_bt·W_{e_bt}·x_s into row b of accumulate=
    / out= [B, N], reading only the routed experts' kept rows; expert_weights: [B, T] routing weights w (float32,
    bf16 or fp16; None: 1), scaling each expert's selected input in fp32. With gated=, x is the pair's raw sums per
    routed expert, float32 [B, T, 2, K] (`sparse_gated_mlp(experts=, out=)`). The one-shot tiles run it, one token
    a program ("auto", "oneshot"), or at batch 1 the gather walk ("gather": each routed row's input its own list);
    thresh [1] / [1, K] serves every expert, [E, 1, K] holds one row per expert (the one-shot tiles only); no
    shift, bias, segments or residual.
    """
    if experts is not None:
        return _experts_gemv(x, wt, thresh, experts, expert_weights, accumulate, out, gated, norm_weight, eps, nm,
                             impl, shift=shift is not None, bias=bias is not None, segments=len(segments) > 0,
                             residual=residual is not None, act=act != "none", out_thresh=out_thresh is not None)
    if expert_weights is not None:
        raise ValueError("expert_weights= scales routed experts: it needs experts=")
    if gated != "none":
        x = _gated_input(x, gated, norm_weight, accumulate if out is None else out)
    pair_sums = x if gated != "none" else None
    x = x[0] if pair_sums is not None else x
    _check_common(x, wt)
    k, n = wshape(wt)
    bounds = [int(s) for s in segments]
    if len(bounds) > 2 or any(not (0 < s < n) for s in bounds) or bounds != sorted(bounds):
        raise ValueError(f"segments must be at most 2 increasing column boundaries inside (0, {n}), got {bounds}")
    nseg = len(bounds) + 1
    if thresh is None:
        _check_presel(shift, norm_weight, nm)
    else:
        thresh = _as_rows(thresh, nseg, k, "thresh")
    if shift is not None:
        shift = _as_rows(shift.float(), nseg, k, "shift").contiguous()
    out_thresh, out_shift = _out_rows(out_thresh, out_shift, n)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")
    if residual is not None and tuple(residual.shape) != (x.shape[0], n):
        raise ValueError(f"residual must have shape [{x.shape[0]}, {n}], got {tuple(residual.shape)}")
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"norm_weight must have shape [{k}], got {tuple(norm_weight.shape)}")
    if act not in ACTS:
        raise ValueError(f"act must be one of {sorted(ACTS)}, got {act!r}")
    nm_n, nm_m = _validate_nm(nm)
    if out is not None and accumulate is not None:
        raise ValueError("give out= (written) or accumulate= (added into), not both")
    into = accumulate if out is None else out
    if into is not None:
        _check_accumulate(into, x, n, act, residual, out_thresh, thresh, "accumulate" if out is None else "out")
        if out is not None and not out.is_contiguous():
            raise ValueError(f"out must be contiguous, got strides {out.stride()}")
        choose_impl("qkv" if bounds else "gemv", k, n, x.shape[0], impl, packed=wt.dim() == 3, accum=True)
        torch.ops.actsparse.sparse_gemv_accumulate(x if pair_sums is None else pair_sums, wt, thresh, shift, bias,
                                                   norm_weight, float(eps), bounds, nm_n, nm_m, into, out is not None,
                                                   ACTS[gated], impl)
        return into
    # Rejects a bad impl / batch here.
    choose_impl("qkv" if bounds else "gemv", k, n, x.shape[0], impl, packed=wt.dim() == 3, presel=thresh is None,
                out_sel=out_thresh is not None)
    return torch.ops.actsparse.sparse_gemv(x, wt, thresh, shift, bias, residual, norm_weight, float(eps),
                                           ACTS[act], bounds, nm_n, nm_m, impl, out_thresh, out_shift)


def _experts_gemv(x, wt, thresh, experts, expert_weights, accumulate, out, gated, norm_weight, eps, nm, impl,
                  **refused) -> torch.Tensor:
    """`sparse_gemv(experts=)`: the routed experts of each token add into (or write) its row."""
    if out is not None and accumulate is not None:
        raise ValueError("give out= (written) or accumulate= (added into), not both")
    into = accumulate if out is None else out
    experts = check_experts(experts, expert_weights, (wt,), ("wt",), impl, into, refused)
    b, top = experts.shape
    e, k, n = wt.shape
    if gated != "none":
        if gated not in ACTS:
            raise ValueError(f"gated must be 'none', 'silu' or 'gelu_tanh', got {gated!r}")
        if x.dtype != torch.float32 or tuple(x.shape) != (b, top, 2, k) or not x.is_contiguous():
            raise ValueError(f"gated= with experts= reads the routed pairs' raw sums: x must be a contiguous float32 "
                             f"[{b}, {top}, 2, {k}] tensor (sparse_gated_mlp(experts=, out=)), got {x.dtype} "
                             f"{tuple(x.shape)}")
        if norm_weight is not None:
            raise ValueError("gated= forms act(gate)·up in the kernel's prologue: it takes no norm_weight")
    else:
        _check_common(x, wt[0])
        if x.shape[0] != b:
            raise ValueError(f"experts has {b} rows (one per token) but x has {x.shape[0]}")
    thresh = expert_rows(thresh, 1, e, k, impl)
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"norm_weight must have shape [{k}], got {tuple(norm_weight.shape)}")
    if into.dtype != torch.float32 or tuple(into.shape) != (b, n) or not into.is_contiguous():
        name = "accumulate" if out is None else "out"
        raise ValueError(f"{name} must be a contiguous float32 [{b}, {n}] tensor, got {into.dtype} "
                         f"{tuple(into.shape)}")
    if into.device != x.device:
        raise ValueError(f"accumulate/out is on {into.device} but x is on {x.device}")
    nm_n, nm_m = _validate_nm(nm)
    ew = None if expert_weights is None else expert_weights.reshape(b, top)
    torch.ops.actsparse.sparse_gemv_accumulate(x, wt, thresh, None, None, norm_weight, float(eps), [], nm_n, nm_m,
                                               into, out is not None, ACTS[gated],
                                               "gather" if impl == "gather" else "oneshot", experts, ew)
    return into


def compact_lists(x: torch.Tensor, thresh: Optional[torch.Tensor], lists: ActiveLists, *,
                  shift: Optional[torch.Tensor] = None, nm: Optional[tuple[int, int]] = None) -> ActiveLists:
    """Write into `lists` the active rows of x [1, K] selected as `sparse_gemv` selects (thresh float32 [1] or
    [1, K], shift [1, K], or nm=(N, M) with thresh None) and return them: the gather walk's compaction pass alone,
    for a `gather_lists` whose input no producer listed."""
    if x.dim() != 2 or x.shape[0] != 1 or x.stride(1) != 1:
        raise ValueError(f"x must be a contiguous [1, K] row (the lists are batch 1's), got {tuple(x.shape)}")
    k = x.shape[1]
    check_lists(lists, k, x.device)
    thresh, shift, nm_n, nm_m = list_rule(lists, thresh, shift, nm, k)
    if nm_n and (lists.seg & -lists.seg) % nm_m:
        raise ValueError(f"nm=(N, M) needs M dividing the largest power of two in seg {lists.seg}, got M={nm_m}")
    torch.ops.actsparse.compact_lists(x, thresh, shift, lists.idx, lists.val, lists.count, lists.seg, nm_n, nm_m)
    return lists


def list_rule(lists: ActiveLists, thresh: Optional[torch.Tensor], shift: Optional[torch.Tensor],
              nm: Optional[tuple[int, int]], k: int, prefix: str = "") -> tuple:
    """The rule an op writing `lists` selects its K channels with, checked: (thresholds float32 [1, K] (N:M reads
    none: a view of the lists' values stands in, no allocation in a captured step), shift [1, K] or None, N, M).
    `prefix` names the caller's arguments (list_thresh, down_thresh, ...) in the errors."""
    nm_n, nm_m = _validate_nm(nm)
    if thresh is None and nm_n == 0:
        raise ValueError(f"give {prefix}thresh (a threshold rule) or {prefix}nm=(N, M), one of them")
    if thresh is not None and nm_n:
        raise ValueError(f"{prefix}nm selects by N:M (of |x − {prefix}shift| where a shift is given): it takes no "
                         f"{prefix}thresh")
    thresh = _as_rows(thresh if thresh is not None else lists.val[:1], 1, k, f"{prefix}thresh")
    if shift is not None:
        shift = _as_rows(shift.float(), 1, k, f"{prefix}shift").contiguous()
    return thresh, shift, nm_n, nm_m


def gather_lists(lists: ActiveLists, wt: torch.Tensor, *, accumulate: torch.Tensor,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """accumulate [1, N] += W·x_s (+ bias) in place and return it, x_s being the selected input whose active rows
    `lists` hold (written by the op that produced the input, `decode_attention(lists=)`, or `compact_lists`):
    the gather walk over W^T [K, N] (row-major) without its compaction launch."""
    if wt.dim() != 2 or wt.stride(1) != 1:
        raise ValueError(f"wt must be the transposed weight [K, N], row-major, got shape {tuple(wt.shape)}")
    k, n = wt.shape
    check_lists(lists, k, wt.device)
    if (accumulate.dtype != torch.float32 or tuple(accumulate.shape) != (1, n) or not accumulate.is_contiguous()
            or accumulate.device != wt.device):
        raise ValueError(f"accumulate must be a contiguous float32 [1, {n}] tensor on {wt.device}, got "
                         f"{accumulate.dtype} {tuple(accumulate.shape)} on {accumulate.device}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.device != wt.device):
        raise ValueError(f"bias must have shape [{n}] on {wt.device}, got {tuple(bias.shape)} on {bias.device}")
    torch.ops.actsparse.gather_lists(lists.idx, lists.val, lists.count, wt, bias, accumulate, lists.seg)
    return accumulate
