"""Programmatic dependent launch (kernels/pdl.py): when it is on, and that chains of dependent launches stay
correct with it (every kernel waits for its predecessor before touching memory)."""

import os
import subprocess
import sys

import pytest
import torch

from actsparse.kernels import decode_attention, poison_outputs, ref, sparse_gated_mlp, sparse_gemv
from actsparse.kernels.pdl import launch_kwargs, pdl_enabled, use_pdl

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_off_on_cpu_and_under_the_interpreter():
    cpu = torch.device("cpu")
    assert not pdl_enabled(cpu)
    with use_pdl(True):
        assert not pdl_enabled(cpu)  # no CUDA device: never on
        assert launch_kwargs(cpu) == {"PDL": False}  # no launch option the interpreter would not know


def test_use_pdl_restores_the_previous_setting():
    import actsparse.kernels.pdl as pdl

    before = pdl._enabled
    with use_pdl(False):
        assert pdl._enabled is False
        with use_pdl(True):
            assert pdl._enabled is True
        assert pdl._enabled is False
    assert pdl._enabled is before


@pytest.mark.parametrize("value, on", [("0", False), ("off", False), ("", False), ("1", True), ("on", True),
                                       ("True", True)])
def test_environment_switch_opt_in(value, on):
    code = "import actsparse.kernels.pdl as p; print(p._enabled)"
    env = {**os.environ, "ACTSPARSE_PDL": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(on)


def test_the_installed_triton_offers_the_launch_option():
    from actsparse.kernels.pdl import _gdc_available

    assert _gdc_available()


@pytest.mark.gpu
@gpu
def test_gpu_on_exactly_on_hopper_and_newer_when_asked_for():
    dev = torch.device("cuda")
    with use_pdl(True):
        assert pdl_enabled(dev) == (torch.cuda.get_device_capability()[0] >= 9)
    with use_pdl(False):
        assert not pdl_enabled(dev)


def _chain(x, p):
    """One sparse decode block as the engine chains it: each launch reads what the previous ones wrote."""
    qkv = sparse_gemv(x, p["wqkv"], p["tq"], norm_weight=p["g"], segments=(p["nq"], p["nq"] + p["nkv"]))
    a = decode_attention(qkv, p["kc"], p["vc"], p["pos"], p["inv_freq"], p["hq"], p["hkv"])
    x2 = sparse_gemv(a, p["wo"], p["to"], residual=x)
    h = sparse_gated_mlp(x2, p["wg"], p["wu"], p["tgu"], norm_weight=p["g"])
    return sparse_gemv(h, p["wd"], p["td"], residual=x2)


def _reference(x, p):
    qkv = ref.sparse_gemv_ref(x, p["wqkv"], p["tq"], norm_weight=p["g"], segments=(p["nq"], p["nq"] + p["nkv"]))
    kc, vc = p["kc"].clone(), p["vc"].clone()
    a = ref.decode_attention_ref(qkv, kc, vc, p["pos"], p["inv_freq"], p["hq"], p["hkv"])
    x2 = ref.sparse_gemv_ref(a, p["wo"], p["to"], residual=x)
    h = ref.sparse_gated_mlp_ref(x2, p["wg"], p["wu"], p["tgu"], norm_weight=p["g"])
    return ref.sparse_gemv_ref(h, p["wd"], p["td"], residual=x2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_dependent_chain_under_graph_replay_with_and_without_pdl(batch):
    """Four blocks chained in one CUDA graph, fresh inputs per replay: PDL on gives the reference's result and
    the very same bits as PDL off (the kernels are deterministic; a launch reading before its producer finished
    would differ)."""
    torch.manual_seed(0)
    dt, dev = torch.bfloat16, "cuda"
    d, hq, hkv, hd, inter, seq = 1024, 8, 2, 128, 3584, 64
    nq, nkv = hq * hd, hkv * hd

    def w(k, n):
        return (torch.randn(k, n, device=dev) / k**0.5).to(dt)

    p = dict(wqkv=w(d, nq + 2 * nkv), wo=w(nq, d), wg=w(d, inter), wu=w(d, inter), wd=w(inter, d),
             g=(torch.rand(d, device=dev) + 0.5).to(dt), nq=nq, nkv=nkv, hq=hq, hkv=hkv,
             tq=torch.tensor([0.6, 0.5, 0.7], device=dev), to=torch.tensor([0.3], device=dev),
             tgu=torch.tensor([0.6, 0.6], device=dev), td=torch.tensor([0.05], device=dev),
             kc=torch.randn(batch, hkv, seq, hd, device=dev, dtype=dt),
             vc=torch.randn(batch, hkv, seq, hd, device=dev, dtype=dt),
             pos=torch.full((batch,), 17, device=dev, dtype=torch.int32),
             inv_freq=1.0 / (10000 ** (torch.arange(0, hd, 2, device=dev).float() / hd)))
    x = torch.randn(batch, d, device=dev, dtype=dt)
    outs = {}
    for on in (True, False):
        with use_pdl(on), poison_outputs():
            assert pdl_enabled(torch.device(dev)) == (on and torch.cuda.get_device_capability()[0] >= 9)

            def step():
                y = x
                for _ in range(4):
                    y = _chain(y, p)
                return y

            step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = step()
        got = []
        for seed in range(3):  # fresh inputs each replay
            x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(dev, dt))
            y.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            want = x
            for _ in range(4):
                want = _reference(want, p)
            err = ((y.double() - want.double()).norm() / want.double().norm()).item()
            assert err < 3e-2, f"pdl={on} replay {seed}: rel err {err:.2e}"
            got.append(y.clone())
        outs[on] = got
        del graph
    for a, b in zip(outs[True], outs[False]):
        assert torch.equal(a, b)
