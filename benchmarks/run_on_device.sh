#!/usr/bin/env bash
# One device call: install, GPU tests, kernel tuning + microbenchmark, decode benchmark.
#   COMMIT=<sha> bash benchmarks/run_on_device.sh [extra bench_kernels.py args, e.g. --tune-v6 --tune-batches 1]
# (the kernels in --impls, default v2 and v6, are timed side by side; the per-op winner drives the decode rows.)
# Next run (BENCHMARKS.md, Session 5): --impls v2,v6,v6-pdl --profile --tune-v6 --tune-batches 4
#   --tune-weights 0:0,0.5:1,0.9:1  (PDL on vs off per op and block, each kernel's device time, the batch-4
#   tensor-core walk tuned); BENCH_BUDGET=420.
# Everything lands in $OUT (at most 8 files come back): env.txt, tests.log, bench.log,
# results.json, BENCHMARKS_fragment.md, tuned.json.
set -uo pipefail
OUT=${OUT:-/tmp/actsparse_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TEST_TIMEOUT=${TEST_TIMEOUT:-130}
BENCH_BUDGET=${BENCH_BUDGET:-360}

{
  date -u; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -2
  python3 -c "import actsparse.kernels" 2>&1 | tail -1 || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Correctness first: every kernel test (compiled for the GPU) and the engine tests.
TRITON_INTERPRET=0 timeout "$TEST_TIMEOUT" python3 -m pytest -q -p no:cacheprovider -n 8 tests/kernels tests/engine 2>&1 \
  | tee "$OUT/tests.log" | tail -25

python3 benchmarks/bench_kernels.py --out "$OUT" --budget-s "$BENCH_BUDGET" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^  tune .*failed" | tail -150
