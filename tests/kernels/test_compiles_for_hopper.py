"""The kernels compile for the GPU, checked without one.

Every other kernel test here runs in Triton's interpreter, which executes code the GPU compiler refuses (a
function returning tensors of two shapes from two branches ran in the interpreter and failed on the H200).
`benchmarks/kernel_resources.py --check` compiles the one-shot tiles and both walks for sm_90 over every branch of
their compile-time switches (pair, atomic sum, one K chunk, depth, tensor cores, routed experts, adding into a
given tensor, the compaction pass's gated input and zeroing, programmatic dependent launch), with the ptxas
that ships with Triton.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import triton

REPO = pathlib.Path(__file__).resolve().parents[2]
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton ships no ptxas (no NVIDIA backend)")
def test_both_walks_compile_for_sm90_on_every_switch():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_resources.py"), "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "95 of 95 configurations compiled for sm_90" in proc.stdout
