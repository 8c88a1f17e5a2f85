"""Which implementation runs each op of the engine, measured on the GPU it runs on.

The kernels' fixed costs (launches, selection, split-K reduction) against the GPU's memory speed decide, per
op, which of cuBLAS, the one-shot tiles and the gather walk is fastest at a given fraction of skipped weight
rows. They differ by GPU (an H200's faster memory leaves less time to hide those costs than an H100's) and by
shape, so they are measured, not tabled: per op and batch, each sparse kernel that can run the batch over
several layers' weights at a few skipped-row fractions, and the dense op the engine would run instead (norm
and act·mul launches included), all timed as CUDA-graph replays. `OpTimes.choice` interpolates those times
at an op's expected skip and takes the least; the crossover is where the best kernel's speedup over cuBLAS
crosses 1. With the engine's fp32 residual stream, o and down also time adding into the stream in place
("accumulate": the one-shot tiles, "gather-accumulate": the gather walk), q|k|v its raw fp32 sums for the
attention kernel likewise, "pair" gate|up writing its two raw sums and "gated" down forming act(gate)·up from
them while adding into the stream (each on both kernels; the engine compares the fastest pair + gated with
gate|up's and down's best), "mlp" the whole MLP in two launches (`sparse_mlp`, batch ≤ 4), o at batch 1 over the lists the attention kernel
writes ("gather-listed": no compaction launch), a mixture of experts' routed gate|up and down at batch 1 on the
one-shot tiles or the gather walk ("experts_gu", "experts_down"), at batch 1 the raw pair also writing down's lists
and down walking them ("pair-listing", "gated-listed"), and everything reads and adds the fp32 stream as the engine
does. Cached per
(device name, shapes, dtype, stream dtype, batch) for the process.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch

LEVELS = (0.0, 0.25, 0.4, 0.55, 0.7, 0.85)  # skipped-row fractions the speedup line is sampled at
MAX_LAYERS = 8  # weight sets rotated per timing: several times the L2, so nothing is served from it
OPS = ("qkv", "o", "gu", "down")
KERNELS = ("oneshot", "gather")  # the sparse kernels the engine chooses among (the masked walk never wins at b ≤ 4)
# An op adding into a given fp32 tensor (the stream, or raw sums for the next op), by the kernel that runs it.
ACCUMULATE = {"accumulate": "oneshot", "gather-accumulate": "gather"}
# o at batch 1 adding into the stream by the gather walk over the lists the attention kernel wrote while producing
# its input (`decode_attention(lists=)`, `gather_lists`): the walk without its compaction launch. Timed as that
# walk alone; the attention's selection epilogue (a few hundred ns on its own programs) is not in the figure.
LISTED = "gather-listed"
RUNS_ON = {**ACCUMULATE, LISTED: "gather"}  # a choice's kernel, where the op runs it as a plain add into a tensor
UP_KERNELS = ("walk", "oneshot", "rows")  # CATS's up rows gathered by the gate's mask (`cats_up`); no dense rival

_cache: dict[tuple, dict[str, "OpTimes"]] = {}


@dataclass(frozen=True)
class OpTimes:
    """One op's measured times (ms, over the timed layers): dense, and each kernel at each skipped-row level."""

    dense_ms: float
    levels: tuple[float, ...]
    kernel_ms: dict[str, tuple[float, ...]]

    def at(self, kernel: str, s: float) -> float:
        """The kernel's time at skipped-row fraction s, linearly interpolated between the levels (clamped)."""
        ts = self.kernel_ms[kernel]
        if s <= self.levels[0]:
            return ts[0]
        for (s0, t0), (s1, t1) in zip(zip(self.levels, ts), zip(self.levels[1:], ts[1:])):
            if s <= s1:
                return t0 + (s - s0) * (t1 - t0) / (s1 - s0)
        return ts[-1]

    def best(self, s: float) -> tuple[str, float]:
        """The fastest kernel at skipped-row fraction s and its time."""
        name = min(self.kernel_ms, key=lambda k: self.at(k, s))
        return name, self.at(name, s)

    def choice(self, s: float, exclude: tuple[str, ...] = ()) -> str:
        """The fastest at skipped-row fraction s: "dense" (cuBLAS) or a kernel's name (none of `exclude`)."""
        names = [k for k in self.kernel_ms if k not in exclude]
        if not names:
            return "dense"
        name = min(names, key=lambda k: self.at(k, s))
        return "dense" if self.dense_ms <= self.at(name, s) else name

    def crossover(self) -> float:
        """Skipped-row fraction under which even the best kernel is slower than cuBLAS."""
        if not self.kernel_ms:
            return 1.0
        return crossing([(s, self.dense_ms / min(ts[i] for ts in self.kernel_ms.values()))
                         for i, s in enumerate(self.levels)])


def graph_ms(fn: Callable[[], None], reps: int = 5, warmup: int = 1) -> float:
    """Median replay time (ms, CUDA events) of fn captured in a CUDA graph, warmed up first on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    return statistics.median(times)


def union_threshold(v: torch.Tensor, s: float) -> float:
    """|v| level that skips a fraction s of the channels for every row of v [B, K] (the rows a batch reads).

    Midway between two distinct sorted values, so that no input sits on it, where a kernel's and its
    reference's last-bit rounding could disagree about the input; bf16 inputs repeat values, so it steps
    past ties (skipping slightly more than s)."""
    if s <= 0:
        return 0.0
    u = v.float().abs().amax(dim=0).sort().values
    i = max(1, min(int(s * u.numel()), u.numel() - 1))
    while i < u.numel() - 1 and u[i] == u[i - 1]:
        i += 1
    return float((u[i - 1] + u[i]) / 2)


def crossing(points: list[tuple[float, float]]) -> float:
    """Skipped-row fraction where the speedup line [(fraction, sparse/dense speedup)] reaches 1 (linear
    interpolation); 0.0 when the sparse op wins everywhere, 1.0 when it never wins."""
    pts = sorted(points)
    if not pts or pts[0][1] >= 1.0:
        return 0.0
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if v0 < 1.0 <= v1:
            return round(s0 + (1.0 - v0) * (s1 - s0) / (v1 - v0), 3)
    return 1.0


@torch.no_grad()
def measure(engine, batch: int) -> dict[str, OpTimes]:
    """Return {op: its OpTimes} at this batch: cuBLAS and every kernel of KERNELS that runs the batch."""
    from actsparse.kernels import configs

    kernels = [k for k in KERNELS if not configs.why_not(k, batch, False, False, False)]
    cfg, ops, eps = engine.cfg, engine.ops, engine.cfg.rms_eps
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    layers = engine.w.layers[:MAX_LAYERS]
    gen = torch.Generator().manual_seed(0)

    def rnd(n: int) -> torch.Tensor:
        return torch.randn(batch, n, generator=gen).to(engine.device, engine.dtype)

    x, a, h = rnd(cfg.hidden_size), rnd(q), rnd(inter)  # residual stream, attention output, MLP hidden
    if engine.residual_fp32:
        x = x.float()
    acc = x.clone()  # what "accumulate" adds into (grows over the replays: only its time counts)
    sums = torch.empty(batch, q + 2 * kv, device=engine.device)  # q|k|v's raw sums

    def dense(op: str, lw) -> None:
        if op == "qkv":
            engine._linear(engine._norm(x, lw.attn_norm), lw.wqkv, lw.wqkv_t)
        elif op == "o":
            engine._linear(a, lw.wo, lw.wo_t, res=x)
        elif op == "gu":
            xn = engine._norm(x, lw.mlp_norm)
            if lw.w13 is not None:
                ops.silu_mul(xn @ lw.w13.t(), act=cfg.act)
            else:
                engine._act(xn @ lw.wg_t) * (xn @ lw.wu_t)
        else:
            engine._linear(h, lw.wd, lw.wd_t, res=x)

    def sparse(op: str, lw, s: float, impl: str) -> Callable[[], None]:
        dev = engine.device
        if op in ("qkv", "gu"):
            norm = lw.attn_norm if op == "qkv" else lw.mlp_norm
            t = union_threshold(engine._norm(x, norm), s)
            if op == "qkv":
                th = torch.full((3,), t, device=dev)
                if impl in ACCUMULATE:  # the raw fp32 sums the attention kernel reads
                    return lambda: ops.sparse_gemv(x, lw.wqkv_t, th, norm_weight=norm, eps=eps,
                                                   segments=(q, q + kv), impl=ACCUMULATE[impl], out=sums)
                return lambda: ops.sparse_gemv(x, lw.wqkv_t, th, norm_weight=norm, eps=eps, segments=(q, q + kv),
                                               impl=impl)
            th = torch.full((2,), t, device=dev)
            return lambda: ops.sparse_gated_mlp(x, lw.wg_t, lw.wu_t, th, norm_weight=norm, eps=eps, act=cfg.act,
                                                impl=impl)
        inp, wt = (a, lw.wo_t) if op == "o" else (h, lw.wd_t)
        th = torch.full((1,), union_threshold(inp, s), device=dev)
        if impl == LISTED:
            from actsparse.kernels import active_lists, compact_lists

            lists = compact_lists(inp, th, active_lists(q, q // cfg.n_kv_heads, dev))
            return lambda: ops.gather_lists(lists, wt, accumulate=acc)
        if impl in ACCUMULATE:
            return lambda: ops.sparse_gemv(inp, wt, th, impl=ACCUMULATE[impl], accumulate=acc)
        return lambda: ops.sparse_gemv(inp, wt, th, residual=x, impl=impl)

    act = engine._act(rnd(inter).float()).to(engine.dtype)  # CATS's gate activations, whose mask picks the up rows

    def up(lw, s: float, impl: str) -> Callable[[], None]:
        th = torch.tensor(union_threshold(act, s), device=engine.device)
        return lambda: ops.cats_up(x, lw.wu, act, th, norm_weight=lw.mlp_norm, eps=eps, impl=impl)

    def timed(impls, make) -> dict[str, tuple[float, ...]]:
        """Each implementation's time at each level, over all timed layers."""
        out = {}
        for impl in impls:
            ts = []
            for s in LEVELS:
                calls = [make(lw, s, impl) for lw in layers]
                ts.append(graph_ms(lambda: [c() for c in calls]))
            out[impl] = tuple(ts)
        return out

    # Adding into an fp32 tensor: the stream, or behind a post-norm (Gemma) the zeroed buffer one `add_normed`
    # launch then normalises into the stream (in place of the norm and add the op's own output would need).
    accs = [a for a, kern in ACCUMULATE.items() if kern in kernels] if engine.residual_fp32 else []
    accumulating = {"qkv", "o", "down"} if accs else set()
    out = {}
    moe = cfg.moe  # the experts run the expert-indexed kernels (dense: at threshold 0): timed below, not vs cuBLAS
    if moe:
        accumulating.discard("down")
    for op in OPS[:2] if moe else OPS:
        t_dense = graph_ms(lambda: [dense(op, lw) for lw in layers])
        impls = kernels + accs if op in accumulating else kernels
        if op == "o" and listable(engine, batch) and "gather-accumulate" in impls:
            impls = impls + [LISTED]
        out[op] = OpTimes(t_dense, LEVELS, timed(impls, lambda lw, s, impl: sparse(op, lw, s, impl)))
    if "down" in accumulating:  # gate|up's raw sums, and down forming act(gate)·up from them into the stream
        sums = {}  # per layer and level: the pair's raw sums and down's threshold on act(gate)·up

        def pair_sums(lw, s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if (id(lw), s) not in sums:
                norm, dev = lw.mlp_norm, engine.device
                th = torch.full((2,), union_threshold(engine._norm(x, norm), s), device=dev)
                buf = torch.empty(2, batch, inter, device=dev)
                ops.sparse_gated_mlp(x, lw.wg_t, lw.wu_t, th, norm_weight=norm, eps=eps, impl="oneshot", out=buf)
                td = torch.full((1,), union_threshold(engine._act(buf[0]) * buf[1], s), device=dev)
                sums[id(lw), s] = th, buf, td
            return sums[id(lw), s]

        def pair(lw, s: float, impl: str) -> Callable[[], None]:
            th, buf, _ = pair_sums(lw, s)
            return lambda: ops.sparse_gated_mlp(x, lw.wg_t, lw.wu_t, th, norm_weight=lw.mlp_norm, eps=eps, impl=impl,
                                                out=buf)

        def gated(lw, s: float, impl: str) -> Callable[[], None]:
            _, buf, td = pair_sums(lw, s)
            return lambda: ops.sparse_gemv(buf, lw.wd_t, td, impl=impl, gated=cfg.act, accumulate=acc)

        # No dense rival of their own: the engine weighs the fastest of each against gate|up's and down's best.
        out["pair"] = OpTimes(float("inf"), LEVELS, timed(kernels, pair))
        out["gated"] = OpTimes(float("inf"), LEVELS, timed(kernels, gated))
        seg = down_layout(engine, batch)[0]
        if seg:  # batch 1: the pair's last programs write down's lists, and down walks them (no compaction launch)
            from actsparse.kernels import active_lists

            dl = {}  # per layer and level: the lists the pair writes and down reads

            def listing(lw, s: float, impl: str) -> Callable[[], None]:
                th, buf, td = pair_sums(lw, s)
                if (id(lw), s) not in dl:
                    dl[id(lw), s] = active_lists(inter, seg, engine.device)
                lists = dl[id(lw), s]
                return lambda: ops.sparse_gated_mlp(x, lw.wg_t, lw.wu_t, th, norm_weight=lw.mlp_norm, eps=eps,
                                                    act=cfg.act, impl="gather", out=buf, down_lists=lists,
                                                    down_thresh=td)

            def listed(lw, s: float, impl: str) -> Callable[[], None]:
                listing(lw, s, impl)()  # the lists, written once
                lists = dl[id(lw), s]
                return lambda: ops.gather_lists(lists, lw.wd_t, accumulate=acc)

            out["pair-listing"] = OpTimes(float("inf"), LEVELS, timed(["gather"], listing))
            out["gated-listed"] = OpTimes(float("inf"), LEVELS, timed(["gather"], listed))
        if batch <= configs.GATHER_MAX_BATCH:  # the whole MLP in two launches, both selections at the level
            def mlp(lw, s: float, impl: str) -> Callable[[], None]:
                th, _, td = pair_sums(lw, s)
                return lambda: ops.sparse_mlp(x, lw.wg_t, lw.wu_t, lw.wd_t, th, td, norm_weight=lw.mlp_norm,
                                              eps=eps, act=cfg.act, accumulate=acc)

            out["mlp"] = OpTimes(float("inf"), LEVELS, timed(["fused"], mlp))
    if moe and batch == 1 and "gather" in kernels and engine.kernels == "triton":
        # the routed experts at batch 1: the one-shot tiles (a tile a program) or the gather walk (gate|up: the
        # normed state's two lists, walked by every routed expert; down: each routed expert's own list); no dense
        # rival (the dense engine runs the faster of the two at threshold 0)
        top = cfg.top_k
        ids = torch.randperm(cfg.n_experts, generator=gen)[:top].reshape(1, top).to(engine.device)
        wts = torch.rand(1, top, generator=gen).to(engine.device)
        into = torch.zeros(1, cfg.hidden_size, device=engine.device)  # down adds into an fp32 row (the stream)
        esums = {}

        def routed(lw, s: float):
            if (id(lw), s) not in esums:
                xn = engine._norm(x, lw.mlp_norm)
                th = torch.full((2,), union_threshold(xn, s), device=engine.device)
                buf = torch.empty(1, top, 2, cfg.moe_intermediate_size, device=engine.device)
                ops.sparse_gated_mlp(xn, lw.weg_t, lw.weu_t, th, experts=ids, out=buf, impl="oneshot")
                h = (engine._act(buf[:, :, 0]) * buf[:, :, 1]).reshape(1, -1)  # every routed expert's input
                td = torch.full((1,), union_threshold(h, s), device=engine.device)
                esums[id(lw), s] = xn, th, buf, td
            return esums[id(lw), s]

        def experts_gu(lw, s: float, impl: str) -> Callable[[], None]:
            xn, th, buf, _ = routed(lw, s)
            return lambda: ops.sparse_gated_mlp(xn, lw.weg_t, lw.weu_t, th, experts=ids, out=buf, impl=impl)

        def experts_down(lw, s: float, impl: str) -> Callable[[], None]:
            _, _, buf, td = routed(lw, s)
            return lambda: ops.sparse_gemv(buf, lw.wed_t, td, gated=cfg.act, accumulate=into, experts=ids,
                                           expert_weights=wts, impl=impl)

        out["experts_gu"] = OpTimes(float("inf"), LEVELS, timed(["oneshot", "gather"], experts_gu))
        out["experts_down"] = OpTimes(float("inf"), LEVELS, timed(["oneshot", "gather"], experts_down))
    # CATS: its gate alone (RMSNorm, cuBLAS and the activation, or a kernel with both fused) and which cats_up
    # kernel, at the fraction of up rows skipped
    if not moe and all(lw.wu is not None for lw in layers):
        def gate_dense(lw) -> None:
            wg = None if lw.w13 is None else lw.w13[:inter]
            engine._act(engine._linear(engine._norm(x, lw.mlp_norm), wg, lw.wg_t))

        def gate(lw, s: float, impl: str) -> Callable[[], None]:
            th = torch.full((1,), union_threshold(engine._norm(x, lw.mlp_norm), s), device=engine.device)
            return lambda: ops.sparse_gemv(x, lw.wg_t, th, norm_weight=lw.mlp_norm, eps=eps, act=cfg.act, impl=impl)

        out["gate"] = OpTimes(graph_ms(lambda: [gate_dense(lw) for lw in layers]), LEVELS, timed(kernels, gate))
        ups = [k for k in UP_KERNELS if k == "walk" or (k == "oneshot" and batch <= configs.ONESHOT_MAX_BATCH)
               or (k == "rows" and batch == 1)]
        out["up"] = OpTimes(float("inf"), LEVELS, timed(ups, up))  # no dense rival: CATS itself is the choice
    return out


def listable(engine, batch: int) -> bool:
    """Whether o can read lists the attention kernel writes: batch 1, the Triton kernels, a power-of-two head_dim
    (each kv head's channels one contiguous list). Measured so whatever the engine's `producer_lists`, which it
    applies when it runs (off: a "gather-listed" choice runs the gather walk with its compaction pass)."""
    hd = engine.cfg.head_dim
    return batch == 1 and engine.kernels == "triton" and hd & (hd - 1) == 0


def down_layout(engine, batch: int) -> tuple[int, int]:
    """(channels per list, the pair walk's column strip) of down's input lists that gate|up's raw pair writes at
    batch 1 (`sparse_gated_mlp(down_lists=)`): a multiple of the strip dividing I, at most down's own K slice;
    (0, strip) where that cannot run (another batch, not the Triton kernels, an MoE layer, no such size)."""
    if batch != 1 or engine.kernels != "triton" or engine.cfg.moe:
        return 0, 0
    from actsparse.kernels import configs

    cfg, inter = engine.cfg, engine.cfg.intermediate_size
    strip = configs.choose_impl("pair", cfg.hidden_size, inter, 1, "gather", accum=True)[1].block_n
    most = configs.choose_impl("gemv", inter, cfg.hidden_size, 1, "gather", accum=True)[1].seg_k
    fits = [m for m in range(strip, min(most, inter) + 1, strip) if inter % m == 0 and m >= 16]
    return (max(fits) if fits else 0), strip


def op_times(engine, batch: int) -> dict[str, OpTimes]:
    """`measure`, once per (device name, model shapes, dtype, batch) in this process."""
    key = (torch.cuda.get_device_name(engine.device), engine.cfg, engine.dtype, engine.residual_fp32, batch)
    if key not in _cache:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the engine measures its kernels against cuBLAS before capturing a decode graph; "
                               "call Engine.decode (or forward_step) once outside a capture first")
        _cache[key] = measure(engine, batch)
    return _cache[key]


def crossovers(engine, batch: int) -> dict[str, float]:
    """{op: skipped-row fraction under which the op runs on cuBLAS} at this batch (from `op_times`)."""
    return {op: t.crossover() for op, t in op_times(engine, batch).items() if op in OPS}
