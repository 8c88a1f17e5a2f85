#!/usr/bin/env bash
# Train both bundled reference models on the GPU machine in ONE device call.
#
# Needs .corpus/tokens/ (from `python scripts/train_reference_models.py prepare`), carried to the
# device with `carry: [".corpus/tokens"]`. Writes under $OUT (at most 8 files come back):
#   train.log, env.txt, tiny-llama.tar, tiny-gelu.tar  (each tar: <name>/ + <name>.metrics.json)
# Then, here:  for m in tiny-llama tiny-gelu; do tar xf <files_at>/$m.tar -C build/reference_models; done
#              python scripts/train_reference_models.py finalize --trained build/reference_models
set -euo pipefail
OUT=${OUT:-build/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
TRAINED=${TRAINED:-/tmp/reference_models}
rm -rf "$TRAINED"
mkdir -p "$TRAINED"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c 'import sys, torch, transformers, numpy; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "numpy", numpy.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$OUT/env.txt"

test -f .corpus/tokens/train.npy || { echo "missing .corpus/tokens/train.npy: run the prepare stage and carry .corpus/tokens" >&2; exit 2; }

# One process per model: a model's tar lands in $OUT as soon as it is trained, so a later failure
# or time-out still returns the earlier model. Each gets half of the ~9.5 minutes a call may run.
for m in tiny-llama tiny-gelu; do
    # shellcheck disable=SC2086  # TRAIN_ARGS is a word list (e.g. "--steps 2 --smoke" for a CPU check)
    "$PY" scripts/train_reference_models.py train --models "$m" --device "${DEVICE:-cuda}" --out "$TRAINED" \
        --budget-s "${BUDGET_S:-180}" --deadline-s "${DEADLINE_S:-260}" ${TRAIN_ARGS:-} 2>&1 | tee -a "$OUT/train.log"
    tar cf "$OUT/$m.tar" -C "$TRAINED" "$m" "$m.metrics.json"
done
ls -la "$OUT" | tee -a "$OUT/train.log"
