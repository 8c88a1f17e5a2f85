"""Programmatic dependent launch: off where it cannot run, and on a GPU that can, a CUDA graph of dependent
sparse ops launched with it gives what the same ops give launched plainly (a kernel reading before its
predecessor finished would show as stale sums, far outside the tolerance)."""

import os

import pytest
import torch

from actsparse.engine import TINY, Engine
from actsparse.kernels import (GatherConfig, OneshotConfig, override_config, pdl_enabled, sparse_gated_mlp,
                               sparse_gemv, use_pdl)
from actsparse.kernels.pdl import pdl_args

from .checks import rel_err


def _capable() -> bool:
    if not torch.cuda.is_available():
        return False
    with use_pdl(True):
        return pdl_enabled(torch.device("cuda"))


hopper = pytest.mark.skipif(not _capable(), reason="needs a GPU with programmatic dependent launch (sm_90+)")


def test_off_on_the_cpu_and_the_switch_restores_itself():
    cpu = torch.device("cpu")
    with use_pdl(True):
        assert not pdl_enabled(cpu) and pdl_args(cpu) == {"PDL": False}
        with use_pdl(False):
            assert not pdl_enabled(cpu)
    from actsparse.kernels import pdl

    assert pdl._enabled or os.environ.get("ACTSPARSE_PDL") == "0"  # on unless turned off
    before = pdl._enabled
    with use_pdl(not before):
        assert pdl._enabled is (not before)
    assert pdl._enabled is before


def _chain(layers, h, sums, pair, impl):
    """Per layer: q|k|v-like raw sums (out=, RMSNorm fused), an op adding them into the stream, gate|up's raw
    pair, down forming act(gate)·up and adding into the stream: each reads what the one before wrote."""
    for w1, w2, wg, wu, wd, g in layers:
        sparse_gemv(h, w1, torch.full((1,), 0.4, device=h.device), norm_weight=g, out=sums, impl=impl)
        sparse_gemv(sums, w2, torch.full((1,), 0.3, device=h.device), accumulate=h, impl=impl)
        sparse_gated_mlp(h, wg, wu, torch.full((2,), 0.4, device=h.device), norm_weight=g, out=pair, impl=impl)
        sparse_gemv(pair, wd, torch.full((1,), 0.05, device=h.device), gated="silu", accumulate=h, impl=impl)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("impl", ["oneshot", "gather"])
def test_a_graph_of_dependent_ops_under_pdl_matches_plain_launches(impl):
    k, n, inter, depth = 256, 192, 512, 6
    dev = torch.device("cuda")
    layers = [(torch.randn(k, n, device=dev) / k**0.5, torch.randn(n, k, device=dev) / n**0.5,
               torch.randn(k, inter, device=dev) / k**0.5, torch.randn(k, inter, device=dev) / k**0.5,
               torch.randn(inter, k, device=dev) / inter**0.5, 1 + 0.1 * torch.randn(k, device=dev))
              for _ in range(depth)]
    x0 = torch.randn(1, k, device=dev)
    cfg = OneshotConfig(block_n=32, block_k=32) if impl == "oneshot" else GatherConfig(block_n=32, seg_k=64,
                                                                                         block_k=32)

    def run(pdl: bool, reps: int) -> list[torch.Tensor]:
        h, sums, pair = x0.clone(), torch.empty(1, n, device=dev), torch.empty(2, 1, inter, device=dev)
        with use_pdl(pdl), override_config(cfg):
            _chain(layers, h, sums, pair, impl)  # compiles and allocates before capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                _chain(layers, h, sums, pair, impl)
        outs = []
        for _ in range(reps):
            h.copy_(x0)
            g.replay()
            outs.append(h.clone())
        torch.cuda.synchronize()
        return outs

    want = run(False, 1)[0]
    for got in run(True, 20):
        assert rel_err(got, want) < 1e-4


@pytest.mark.gpu
@hopper
def test_engine_decode_under_pdl_gives_the_same_tokens():
    th = {f"layers.{i}.{r}": 0.3 for i in range(TINY.n_layers) for r in ("q", "k", "v", "o", "gate", "up", "down")}
    prompt = torch.randint(0, TINY.vocab_size, (1, 5))
    toks = {}
    for pdl in (False, True):
        with use_pdl(pdl):
            eng = Engine.random(TINY, device="cuda", dtype=torch.float32, kernels="triton", max_batch=1,
                                max_seq_len=64, fallback_below=0.0)
            eng.set_thresholds(th)
            eng.decode(prompt, 24)
            toks[pdl] = eng.last_tokens.cpu()
    assert torch.equal(toks[True], toks[False])
