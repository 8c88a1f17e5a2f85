"""The compiler's resource report of the sparse-GEMV kernels for Hopper, on a machine without a GPU (no
device time).

  python benchmarks/kernel_resources.py            # the report
  python benchmarks/kernel_resources.py --check    # compile every switch of every kernel; exit 1 on a failure

Compiles `_mlp_kernel` (the fused MLP), `_oneshot_kernel` (bf16, batch 1 and the tensor-core batch path, o and gate|up), `_gather_kernel` (bf16, batch 1, gate|up pair, one K slice), `_masked_gemv_kernel` (bf16, batch 1,
one-shot tiles: one K chunk a program, ordered or atomic sum; o's plain GEMV and gate|up's normed pair), and
(with --check) the decode attention, the post-norm add and the MoE routing, for
sm_90 over a few launch configurations and prints registers, stack and shared memory per configuration
(cuobjdump from Triton's package), so a tuning grid can be checked for compilation and occupancy before a
device run: the interpreter the tests use does not compile, and accepts code the compiler refuses. The local
Triton may differ from the GPU machine's.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions, compiled for a target named below, never launched
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from actsparse.kernels import (attention, cats, fused_mlp, gather_gemv, lowrank, masked_gemv, oneshot_gemv,  # noqa: E402
                               route, topk)

norms = importlib.import_module("actsparse.kernels.rmsnorm")  # the name rmsnorm there is the op

PTRS = {**{n: "*bf16" for n in ("x_ptr", "g_ptr", "w_ptr", "w2_ptr", "bias_ptr", "res_ptr", "y_ptr", "a_ptr")},
        **{n: "*fp32" for n in ("t_ptr", "m_ptr", "ws_ptr", "val_ptr", "acc_ptr", "rstd_ptr", "z_ptr")},
        **{n: "*i32" for n in ("cnt_ptr", "idx_ptr", "count_ptr")}, "e_ptr": "*i64", "ew_ptr": "*fp32",
        "claim_ptr": "*i64", "ready_ptr": "*i64"}


def compile_gather(block_n: int, block_k: int, depth: int, num_warps: int = 4, use_dot: bool = False,
                   accum: int = 0, eager: bool = False, fused: bool = False, gated: int = 0, experts: int = 0,
                   lists: int = 0):
    """The compiled walk for one configuration (sm_90): gate|up's pair with the RMSNorm and Gemma's gelu-tanh;
    `accum` 1-3: adding into a given fp32 tensor (stored, read-add-stored, atomic), a bias on the first slice;
    `fused`: the lists written inside the launch (zeroing the tensor with accum 3; `gated`: from raw pair sums);
    `experts` 1: a mixture of experts' routed gate|up pair, 2: its down scaled by the routing weights (atomic);
    `lists`: the pair's last programs also writing down's lists (1: per-channel thresholds and a shift, 2: N:M 2:4)."""
    consts = dict(NORM=True, NORM_BLOCK=4096, HAS_SHIFT=False, PAIR=True, HAS_BIAS=accum > 0, HAS_RES=False,
                  ACT=0 if accum else 2, NM_N=0, NM_M=1, GROUPS=1 if accum < 3 else 4, GROUPS_P2=1 if accum < 3 else 4,
                  SPLIT=not accum, USE_DOT=use_dot, IEEE=False, VAL_B=4 if use_dot else 1, DEPTH=depth,
                  ACCUM=accum, BLOCK_B=16 if use_dot else 1, SEG_K=4096 if accum < 3 else 1024,
                  BLOCK_K=block_k, BLOCK_N=block_n, EAGER=eager, FUSED=False, GATED=0, SLOTS=1, PROGRAMS=1,
                  ZERO=False, CHUNK=1, EXPERTS=False, HAS_EW=False, LISTS=False, D_ACT=1, D_SHIFT=False, D_NM_N=0,
                  D_NM_M=1, SEG_D=1)
    if fused:
        consts |= dict(FUSED=True, GATED=gated, NORM=not gated, SLOTS=2 * consts["GROUPS"], PROGRAMS=448 * consts["GROUPS"],
                       ZERO=accum == 3, CHUNK=512)
    ptrs = {}
    if lists:
        consts |= dict(LISTS=True, D_SHIFT=lists == 1, D_NM_N=2 if lists == 2 else 0, D_NM_M=4 if lists == 2 else 1,
                       SEG_D=1024, HAS_BIAS=False)
        ptrs = {"arr_ptr": "*i32", "dt_ptr": "*fp32", "dm_ptr": "*fp32", "didx_ptr": "*i32", "dval_ptr": "*fp32",
                "dcnt_ptr": "*i32", "y_ptr": "*fp32"}
    if experts:
        consts |= dict(EXPERTS=True, PAIR=experts == 1, HAS_EW=experts == 2, HAS_BIAS=False, NORM=False)
        ptrs = {"e_ptr": "*i64", "ew_ptr": "*bf16"}
    return _compile(gather_gemv._gather_kernel, consts, num_warps, ptrs)


def compile_gather_lists(groups: int):
    """The compiled walk as `gather_lists` launches it (sm_90): one matrix over lists a producer wrote (no norm or
    selection), a bias on the first slice, adding into fp32 by atomics (several slices) or read-add-store (one);
    Llama-3-8B's o: 8 lists of 512 channels (one per kv head)."""
    consts = dict(NORM=False, NORM_BLOCK=16, HAS_SHIFT=False, PAIR=False, HAS_BIAS=True, HAS_RES=False, ACT=0,
                  NM_N=0, NM_M=1, GROUPS=groups, GROUPS_P2=groups, SPLIT=False, USE_DOT=False, IEEE=False, VAL_B=1,
                  DEPTH=2, ACCUM=3 if groups > 1 else 2, BLOCK_B=1, SEG_K=4096 // groups, BLOCK_K=128, BLOCK_N=32,
                  EAGER=False, FUSED=False, GATED=0, SLOTS=1, PROGRAMS=1, ZERO=False, CHUNK=1, EXPERTS=False,
                  HAS_EW=False, LISTS=False, D_ACT=1, D_SHIFT=False, D_NM_N=0, D_NM_M=1, SEG_D=1)
    return _compile(gather_gemv._gather_kernel, consts, 4, {"y_ptr": "*fp32", "x_ptr": "*fp32"})


def compile_compact(gated: int, zero: bool, xsel: bool = False, zc: bool = False, seg: int = 1024):
    """The compiled compaction pass (sm_90): RMSNorm and selection, or act(gate)·up from a pair's raw sums
    (`gated`), zeroing its share of an fp32 tensor (`zero`); `xsel`: each list its own routed row's input; `zc`:
    zeroing the next op's list counts too; `seg`: channels a list (not a power of two: selected CHUNK at a time)."""
    consts = dict(NORM=not gated, NORM_BLOCK=4096, HAS_SHIFT=False, NM_N=0, NM_M=1, GATED=gated, GROUPS=4,
                  BLOCK_B=1, SEG_K=seg, ZERO=zero, Z_BLOCK=1024, PDL=False, XSEL=xsel, ZC_N=14 if zc else 0,
                  ZC_P2=16 if zc else 1, CHUNK=0 if seg & (seg - 1) == 0 else seg & -seg)
    return _compile(gather_gemv._compact_kernel, consts, 4, {"zc_ptr": "*i32"} if zc else None)


def compile_masked(block_n: int, block_k: int, num_warps: int, pair: bool, atomic: bool, one_chunk: bool = True,
                   depth: int = 1, use_dot: bool = False):
    """The compiled masked walk for one configuration (sm_90): o's GEMV, or gate|up's pair with the RMSNorm."""
    consts = dict(PRESEL=False, OUT_SEL=False, OUT_SHIFT=False, PACK_W=0, NORM=pair, NORM_BLOCK=4096,
                  HAS_SHIFT=False, PAIR=pair, HAS_BIAS=False, HAS_RES=False, ACT=int(pair), NM_N=0, NM_M=1,
                  USE_DOT=use_dot, IEEE=False, SPLIT=True, DEPTH=depth,
                  RED=masked_gemv._reduce_width(4096 // block_k, block_n * (2 if pair else 1), num_warps),
                  ATOMIC=atomic, ONE_CHUNK=one_chunk, BLOCK_B=16 if use_dot else 1, BLOCK_K=block_k, BLOCK_N=block_n)
    return _compile(masked_gemv._masked_gemv_kernel, consts, num_warps)


def compile_oneshot(block_n: int, block_k: int, num_warps: int, pair: bool, use_dot: bool = False,
                    experts: bool = False, pdl: bool = False):
    """The compiled one-shot tiles for one configuration (sm_90): o's GEMV, or gate|up's pair with the RMSNorm;
    `experts`: a mixture-of-experts layer's routed pair sums, or its gated down adding into the stream."""
    consts = dict(NORM=pair, NORM_BLOCK=4096, HAS_SHIFT=False, PAIR=pair, HAS_BIAS=False, HAS_RES=not pair,
                  ACT=int(pair), NM_N=0, NM_M=1, USE_DOT=use_dot, IEEE=False, BLOCK_B=16 if use_dot else 1,
                  BLOCK_K=block_k, BLOCK_N=block_n, EXPERTS=False, HAS_EW=False)
    if experts:
        consts |= dict(HAS_RES=False, ACT=0, ACCUM=True, GATED=0 if pair else 1, EXPERTS=True, HAS_EW=not pair)
    return _compile(oneshot_gemv._oneshot_kernel, consts | dict(PDL=pdl), num_warps)


def compile_oneshot_up(block_n: int, block_k: int, num_warps: int, use_dot: bool = False):
    """The compiled one-shot tiles of CATS's up rows (sm_90), with the RMSNorm."""
    consts = dict(NORM=True, NORM_BLOCK=4096, USE_DOT=use_dot, IEEE=False, BLOCK_B=16 if use_dot else 1,
                  BLOCK_K=block_k, BLOCK_N=block_n)
    return _compile(cats._oneshot_up_kernel, consts, num_warps)


def compile_rows_up(block_n: int, rows: int, block_k: int, num_warps: int, act: int = 0):
    """The compiled kept-rows walk of CATS's up rows (sm_90, batch 1), with the RMSNorm (`act`: COUNTDOWN's)."""
    consts = dict(NORM=True, NORM_BLOCK=4096, BLOCK_N=block_n, ROWS=rows, BLOCK_K=block_k, ACT=act, PDL=False)
    return _compile(cats._rows_up_kernel, consts, num_warps)


def compile_lowrank(phase: str, norm: bool = False, gated: int = 0):
    """The compiled low-rank path of R-Sparse (sm_90): its first launch (the dropped channels through V, from the
    stream's RMSNorm or a pair's act(gate)·up) or its second (U·S adding into fp32 sums; `norm`: a pair's)."""
    ptrs = {"v_ptr": "*bf16", "u_ptr": "*bf16", "rk_ptr": "*i32", "z_ptr": "*fp32", "out_ptr": "*fp32",
            "x_ptr": "*fp32" if gated else "*bf16"}
    if phase == "in":
        consts = dict(NORM=norm, NORM_BLOCK=4096, GATED=gated, BLOCK_K=64, BLOCK_C=128, PDL=False)
        return _compile(lowrank._lr_in_kernel, consts, 4, ptrs)
    return _compile(lowrank._lr_out_kernel, dict(PAIR=norm, BLOCK_N=16, BLOCK_R=512, Z_BLOCK=1024, PDL=False), 4,
                    ptrs)


def compile_mlp(depth: int, eager: bool, extras: bool, nm: bool, batch: int = 1, joint: bool = True,
                down_depth: int = 2, reduce_each: bool = False):
    """The compiled fused MLP's second launch (sm_90): gate and up walked over Llama-3-8B's 4096 × 14336 and the
    kept rows of W_d^T read; `extras`: gate/up biases, down's shift and bias; `nm`: 2:4 selection of h."""
    consts = dict(HAS_BIAS=extras, HAS_DSHIFT=extras, HAS_DBIAS=extras, NM_N=2 if nm else 0, NM_M=4 if nm else 1,
                  ACT=1, EAGER=eager, DEPTH=depth, IEEE=False, BLOCK_B=batch, SEG_K=4096, BLOCK_K=32, BLOCK_I=64,
                  BLOCK_D=128, JOINT=joint, DOWN_DEPTH=down_depth, REDUCE_EACH=reduce_each, PDL=False)
    ptrs = {n: "*bf16" for n in ("wg_ptr", "wu_ptr", "wd_ptr", "bias_ptr", "bd_ptr")}
    return _compile(fused_mlp._mlp_kernel, consts, 4, {**ptrs, "td_ptr": "*fp32", "md_ptr": "*fp32",
                                                        "y_ptr": "*fp32"})


def compile_attention(norm: bool, scale_f32: bool, lists: int = 0):
    """The compiled decode attention (sm_90): Llama-3-8B heads, fp32 raw q|k|v sums, bf16 caches; `norm`: Qwen3's
    and Gemma 3's per-head q and k norms inside (`scale_f32`: Gemma's rounding); `lists`: it also writes o's
    active-row lists (1: thresholds and shifts, 2: N:M 2:4)."""
    consts = dict(HQ=32, HKV=8, D=128, DP=128, GROUP=4, BLOCK_G=16, BLOCK_S=32, IEEE=False, SOFTCAP=False,
                  NORM=norm, SCALE_F32=scale_f32, LIST=lists > 0, HAS_SHIFT=lists == 1, NM_N=2 if lists == 2 else 0,
                  NM_M=4 if lists == 2 else 1)
    ptrs = {"qkv_ptr": "*fp32", "kc_ptr": "*bf16", "vc_ptr": "*bf16", "pos_ptr": "*i32", "inv_freq_ptr": "*fp32",
            "out_ptr": "*bf16", "qn_ptr": "*bf16", "kn_ptr": "*bf16", "t_ptr": "*fp32", "m_ptr": "*fp32",
            "idx_ptr": "*i32", "val_ptr": "*fp32", "cnt_ptr": "*i32"}
    return _compile(attention._decode_attention_kernel, consts, 4, ptrs)


def compile_add_normed(scale_f32: bool):
    """The compiled post-norm add (sm_90): the fp32 stream += rmsnorm(raw fp32 sums)·g rounded to bf16."""
    consts = dict(SCALE_F32=scale_f32, OUT_DTYPE=triton.language.bfloat16, BLOCK=4096)
    ptrs = {"x_ptr": "*fp32", "y_ptr": "*fp32", "g_ptr": "*fp32" if scale_f32 else "*bf16"}
    return _compile(norms._add_normed_kernel, consts, 8, ptrs)


def compile_route(renorm: bool):
    """The compiled MoE routing (sm_90): 128 experts' bf16 logits, top-8, bf16 weights."""
    consts = dict(TOP=8, TOP_P2=8, BLOCK_E=128, RENORM=renorm, W_DTYPE=triton.language.bfloat16)
    ptrs = {"logit_ptr": "*bf16", "idx_ptr": "*i64", "w_ptr": "*bf16"}
    return _compile(route._route_kernel, consts, 1, ptrs)


def compile_route_gemv(renorm: bool):
    """The compiled router GEMV + routing in one launch (sm_90): 128 experts × 2048, 4 a program, top-8."""
    consts = dict(TOP=8, TOP_P2=8, ROWS=4, BLOCK_D=1024, BLOCK_E=128, RENORM=renorm,
                  W_DTYPE=triton.language.bfloat16, L_DTYPE=triton.language.bfloat16)
    ptrs = {"x_ptr": "*bf16", "r_ptr": "*bf16", "lg_ptr": "*fp32", "idx_ptr": "*i64", "w_ptr": "*bf16"}
    return _compile(route._route_gemv_kernel, consts, 4, ptrs)


def compile_topk(norm: bool, gated: int, weighted: bool):
    """The compiled per-token Top-K levels (sm_90): a Llama-3-8B MLP's 14,336 channels, 16 warps."""
    consts = dict(NORM=norm, GATED=gated, HAS_W=weighted, BLOCK=16384, PDL=False)
    ptrs = {"x_ptr": "*fp32", "g_ptr": "*bf16", "w_ptr": "*fp32", "n_ptr": "*i32", "out_ptr": "*fp32"}
    return _compile(topk._topk_kernel, consts, topk.WARPS_LARGE, ptrs)


def _cases() -> list[tuple[str, str, tuple]]:
    """(name, compile function, its arguments) of every branch of the kernels' compile-time switches."""
    cases = [(f"masked pair={p} atomic={a} one_chunk={o} depth={d} dot={dot}", "compile_masked",
              (32, 64, 4, p, a, o, d, dot))
             for p in (False, True) for a in (False, True) for o in (False, True) for d in (1, 2)
             for dot in (False, True)]
    cases += [(f"gather depth={d} dot={dot}", "compile_gather", (32, 64, d, 4, dot)) for d in (1, 2)
              for dot in (False, True)]
    cases += [(f"gather accum={a}", "compile_gather", (32, 64, 2, 4, False, a)) for a in (1, 2, 3)]
    cases += [(f"gather eager depth={d}", "compile_gather", (32, 128, d, 4, False, 3, True)) for d in (1, 2)]
    cases += [(f"gather fused accum={a} depth={d} dot={dot} gated={g}", "compile_gather",
               (32, 128, d, 4, dot, a, False, True, g))
              for a, d, dot, g in ((0, 2, False, 0), (1, 2, False, 0), (3, 1, False, 0), (3, 2, False, 1), (0, 1, True, 0),
                                   (3, 2, True, 0))]
    cases += [(f"compact gated={g} zero={z}", "compile_compact", (g, z)) for g, z in ((0, False), (0, True), (1, True))]
    cases += [("compact gated=1 routed rows", "compile_compact", (1, False, True))]
    cases += [("compact zeroing the next op's list counts", "compile_compact", (0, True, False, True))]
    cases += [("compact lists of 384 channels (a group of 3 heads)", "compile_compact", (0, False, False, False, 384))]
    cases += [(f"gather_lists slices={g}", "compile_gather_lists", (g,)) for g in (8, 1)]
    cases += [(f"gather pair writing down's lists accum={a} rule={r}", "compile_gather",
               (32, 128, 2, 4, False, a, False, False, 0, 0, r)) for a, r in ((3, 1), (1, 1), (3, 2))]
    cases += [(f"gather experts={e}", "compile_gather", (32, 128, 2, 4, False, 3, False, False, 0, e)) for e in (1, 2)]
    cases += [(f"oneshot pair={p} dot={dot}", "compile_oneshot", (128, 64, 2, p, dot)) for p in (False, True)
              for dot in (False, True)]
    cases += [(f"oneshot experts pair={p}", "compile_oneshot", (128, 64, 2, p, False, True)) for p in (False, True)]
    cases += [("oneshot pdl", "compile_oneshot", (128, 64, 2, True, False, False, True))]
    cases += [(f"cats_up oneshot dot={dot}", "compile_oneshot_up", (64, 128, 4, dot)) for dot in (False, True)]
    cases += [(f"cats_up rows act={a}", "compile_rows_up", (32, 16, 256, 4, a)) for a in (0, 1)]
    cases += [(f"lowrank {ph} norm={n} gated={g}", "compile_lowrank", (ph, n, g))
              for ph, n, g in (("in", True, 0), ("in", False, 1), ("out", False, 0), ("out", True, 0))]
    cases += [(f"mlp depth={d} eager={e} extras={x} nm={n} batch={b} joint={j} down_depth={dd} reduce={r}",
               "compile_mlp", (d, e, x, n, b, j, dd, r))
              for d, e, x, n, b, j, dd, r in ((2, False, False, False, 1, True, 2, False),
                                              (1, True, True, False, 1, False, 1, False),
                                              (2, False, False, True, 2, True, 2, False),
                                              (2, False, False, False, 1, False, 2, False),
                                              (2, False, False, False, 1, True, 2, True))]
    cases += [(f"attention norm={n} f32={f}", "compile_attention", (n, f)) for n, f in ((False, False), (True, False),
                                                                                       (True, True))]
    cases += [(f"attention writing o's lists rule={r}", "compile_attention", (False, False, r)) for r in (1, 2)]
    cases += [(f"add_normed f32={f}", "compile_add_normed", (f,)) for f in (False, True)]
    cases += [(f"route renorm={r}", "compile_route", (r,)) for r in (False, True)]
    cases += [(f"route gemv renorm={r}", "compile_route_gemv", (r,)) for r in (False, True)]
    cases += [(f"topk norm={n} gated={g} weighted={w}", "compile_topk", (n, g, w))
              for n, g, w in ((False, 0, False), (True, 0, False), (False, 1, False), (False, 0, True))]
    return cases


def _try(case: tuple[str, str, tuple]) -> str:
    """'' when the case compiles, else the compiler's message (it names the line; its first lines are kept)."""
    name, fn, args = case
    try:
        globals()[fn](*args)
        return ""
    except Exception as e:
        return f"FAILED {name}: {type(e).__name__}: {str(e)[:600]}"


def check() -> int:
    """Compile every branch of every kernel's compile-time switches for sm_90 at small tiles, on every core;
    print each failure.

    The tests run the kernels in Triton's interpreter, which accepts code the compiler refuses (two returns of
    different shapes, say); this is the compiler's word on the same code, without a GPU. Returns the failures."""
    from concurrent.futures import ProcessPoolExecutor

    cases = _cases()
    with ProcessPoolExecutor(max_workers=max(1, min(len(cases), os.cpu_count() or 1))) as pool:
        errors = [e for e in pool.map(_try, cases) if e]
    for e in errors:
        print(e)
    print(f"{len(cases) - len(errors)} of {len(cases)} configurations compiled for sm_90")
    return len(errors)


# Integer arguments a Llama-shaped launch passes as multiples of 16; a real launch tells the compiler so (Triton
# specialises such arguments), and without it the weight loads compile to 2-byte loads instead of 16-byte ones.
DIVISIBLE = {"K", "N", "N0", "N1", "K_SPLIT", "stride_xb", "stride_ts", "stride_ms", "stride_wk", "stride_bs",
             "stride_rb", "stride_yb", "stride_ab", "stride_tn", "stride_wn", "stride_wd", "I", "D"}


FLOATS = {"eps", "sm_scale", "rope_scale", "softcap"}  # the float scalars among the kernels' arguments


def _compile(fn, consts: dict, num_warps: int, ptrs: dict | None = None):
    sig, cst, attrs = {}, {}, {}
    ptrs = {**PTRS, **(ptrs or {})}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], cst[(i,)] = "constexpr", consts[name]
            continue
        sig[name] = ptrs.get(name, "fp32" if name in FLOATS else "i32")
        if name in ("to_ptr", "mo_ptr"):  # the masked walk's output selection: thresholds and shifts
            sig[name] = "*fp32"
        if sig[name].startswith("*") or name in DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cst, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def resources(compiled) -> str:
    """cuobjdump's resource line of a compiled kernel (REG, STACK, SHARED, LOCAL, ...)."""
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True)
    return next((line.strip() for line in out.stdout.splitlines() if "REG:" in line), out.stdout[-300:])


def main() -> None:
    print(f"triton {triton.__version__}, sm_90, gate|up walk, bf16, batch 1, 4 warps")
    for depth in (1, 2):
        for block_n, block_k in ((32, 128), (64, 128), (32, 256), (16, 256)):
            print(f"depth {depth} block_n {block_n:3d} block_k {block_k:3d}: "
                  f"{resources(compile_gather(block_n, block_k, depth))}")
    print("masked walk, one-shot tiles (block_n columns, block_k rows, warps), bf16, batch 1")
    for block_n, block_k, warps in ((128, 64, 2), (32, 128, 4), (64, 64, 2)):
        for pair in (False, True):
            for atomic in (False, True):
                for one in (True, False):
                    print(f"{'gate|up' if pair else 'o      '} {block_n:3d}x{block_k:3d} {warps}w "
                          f"{'atomic ' if atomic else 'ordered'} {'one chunk' if one else '3-D acc  '}: "
                          f"{resources(compile_masked(block_n, block_k, warps, pair, atomic, one))}")
    print("one-shot tiles (block_n columns, block_k rows, warps), bf16, batch 1")
    for block_n, block_k, warps in ((128, 64, 2), (64, 128, 2), (128, 128, 4), (256, 64, 4), (64, 64, 2)):
        for pair in (False, True):
            print(f"{'gate|up' if pair else 'o      '} {block_n:3d}x{block_k:3d} {warps}w: "
                  f"{resources(compile_oneshot(block_n, block_k, warps, pair))}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(1 if check() else 0)
    main()
