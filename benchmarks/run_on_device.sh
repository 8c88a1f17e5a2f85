#!/usr/bin/env bash
# One device call, one run: install, GPU tests, kernel table (cuBLAS, our kernels, the TEAL-design baseline
# side by side) and decode table.
#   COMMIT=<sha> bash benchmarks/run_on_device.sh [extra bench_kernels.py args, e.g. --tune --tune-batches 1]
# The args pass through as they are: --hf-baseline (opt-in) adds Hugging Face generate's tok/s beside our dense
# decode at batch 1, e.g. TESTS=none ... --skip-kernels --decode-dense-only --hf-baseline --decode-families qwen3-8b
# Everything lands in $OUT (at most 8 files come back): env.txt, tests.log, bench.log, results.json,
# BENCHMARKS_fragment.md, tuned.json. Here, afterwards: python benchmarks/bench_kernels.py --merge <that dir>.
# TESTS: pytest selection (default: every kernel and engine test); TEST_TIMEOUT, BENCH_BUDGET in seconds.
set -uo pipefail
OUT=${OUT:-/tmp/actsparse_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TEST_TIMEOUT=${TEST_TIMEOUT:-130}
BENCH_BUDGET=${BENCH_BUDGET:-360}
TESTS=${TESTS:-tests/kernels tests/engine}

{
  date -u; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -2
  python3 -c "import actsparse.kernels" 2>&1 | tail -1 || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Correctness first: the kernel tests (compiled for the GPU) and the engine tests.
if [ "$TESTS" != "none" ]; then
  TRITON_INTERPRET=0 timeout "$TEST_TIMEOUT" python3 -m pytest -q -p no:cacheprovider -n 16 $TESTS 2>&1 \
    | tee "$OUT/tests.log" | tail -25
fi

python3 benchmarks/bench_kernels.py --out "$OUT" --budget-s "$BENCH_BUDGET" "$@" 2>&1 | tee "$OUT/bench.log" \
  | grep -v "^  tune .*failed" | tail -150
