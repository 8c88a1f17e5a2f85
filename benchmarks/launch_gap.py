"""What a kernel boundary costs inside a CUDA graph, and what programmatic dependent launch (PDL) buys back.

A decode step is a chain of dependent launches (per block: norm pre-passes, q|k|v, attention, o, gate|up, down,
and the gather walk's compaction passes). This times a graph of CHAIN dependent kernels, each adding 1 to every
element its predecessor wrote (ping-pong buffers), at several grid sizes, launched plainly or with PDL (every
kernel waits for its predecessor first: `gdc_wait`, then lets its successor be scheduled). The chain's result
must equal CHAIN exactly after every replay: a kernel that read before its predecessor finished shows as a
wrong count (the race test a PDL path needs).

  python benchmarks/launch_gap.py --out DIR      # on the GPU machine: prints the table, writes DIR/launch_gap.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import torch
import triton
import triton.language as tl

CHAIN = 200


@triton.jit
def _add_one(src, dst, n, PDL: tl.constexpr, BLOCK: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=m) + 1.0, mask=m)


def chain(bufs, programs: int, block: int, pdl: bool) -> None:
    n = programs * block
    extra = {"launch_pdl": True} if pdl else {}
    for i in range(CHAIN):
        _add_one[(programs,)](bufs[i % 2], bufs[(i + 1) % 2], n, PDL=pdl, BLOCK=block, num_warps=4, **extra)


def measure(programs: int, block: int, pdl: bool, reps: int = 20) -> dict:
    n = programs * block
    bufs = [torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")]
    chain(bufs, programs, block, pdl)  # compile
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain(bufs, programs, block, pdl)
    times, wrong = [], 0
    for _ in range(reps):
        bufs[0].zero_()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / CHAIN)
        wrong += int((bufs[CHAIN % 2] != CHAIN).sum())
    return {"programs": programs, "elements": n, "pdl": pdl, "us_per_kernel": round(statistics.median(times), 3),
            "wrong_elements": wrong}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="launch_gap_out")
    args = ap.parse_args()
    rows = []
    for programs in (1, 132, 1056, 8448):
        for pdl in (False, True):
            try:
                r = measure(programs, 1024, pdl)
            except Exception as e:  # a Triton without PDL support: say so, keep the plain rows
                r = {"programs": programs, "pdl": pdl, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append(r)
            print(r, flush=True)
    print("\n| programs | plain µs/kernel | PDL µs/kernel | wrong elements (PDL) |\n|---|---|---|---|")
    for programs in (1, 132, 1056, 8448):
        a, b = (next(r for r in rows if r["programs"] == programs and r["pdl"] == p) for p in (False, True))
        print(f"| {programs} | {a.get('us_per_kernel', a.get('error'))} | {b.get('us_per_kernel', b.get('error'))} "
              f"| {b.get('wrong_elements', '')} |")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "launch_gap.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "chain": CHAIN,
                                                     "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
