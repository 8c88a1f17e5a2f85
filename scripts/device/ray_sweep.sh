#!/usr/bin/env bash
# A real sweep on the two-GPU device (nvidia-h200-x2) with Ray scheduling one GPU per
# model worker, 1 GPU vs 2 GPUs on the same grid, both GPUs' utilisation sampled with nvidia-smi:
# what tests cannot show, that Ray's GPU placement spreads model workers and the second GPU pays off.
#
# That machine lacks hydra, omegaconf, ray and mlflow and has no network; scripts/device/build_wheelhouse.sh
# builds them here and packs them for it (build/wheelhouse/PLAN.txt says how they travel):
#   one call (the usual case): carry ["build/wheelhouse/site"] (site.tar.xz, ~30 MiB beside a ~28 MiB tree),
#                              command: bash scripts/device/ray_sweep.sh run   (or speed)
#   in parts, where the packed site does not fit beside the tree: wheels split over calls of the SAME warm machine,
#     call 1..n-1: carry ["build/wheelhouse/partK"]   command: bash scripts/device/ray_sweep.sh stash
#     call n:      carry ["build/wheelhouse/partN"]   command: bash scripts/device/ray_sweep.sh run
#   The machine stays warm only ~30 s after a call: make the next call at once.
# `stash` copies the carried part out of the working tree ($STASH, default ~/.actsparse_wheelhouse), where
# the next call finds it (a call naming only its own part must not rely on the previous part's folder),
# and uses the call to build the model the run sweeps: random weights, a Llama big enough to keep an
# H200 busy, the bundled tokenizer. `run` installs the site (unpacks site.tar.xz into /tmp/site, or collects
# every part, reassembles chunked wheels, checks each against MANIFEST.sha256 and installs them there with pip
# --no-index --no-deps --target), installs actsparse (editable, no deps), and runs benchmarks/sweep_bench.py
# --parts gpus --gpus 2: 4 methods x 4 sparsities on 1 GPU, then on 2 GPUs, then the finished sweep again.
# `all` = stash + run.
#
# `speed` (one GPU is enough): installs the same way, writes random-weight model folders at real shapes
# (scripts/device/random_model.py: SPEED_PRESETS, default qwen3-8b and gemma3-12b, SPEED_LAYERS layers, default 8,
# the bundled tokenizer) and runs a real sweep with eval=speed over them (SPEED_METHODS, default dense, teal,
# wina, scap, cats at 0.5), then lists each cell's decode/*, kernel/* and ppl metrics from MLflow, or why speed
# was skipped: models.log, speed_sweep.log, speed_cells.txt, speed_mlflow.db.
# $OUT gets (at most 8 files come back): env.txt, install.log, bench.log, sweep_bench.json, sweep_bench.md,
# smi_1gpu.csv, smi_2gpu.csv, logs.tar.gz. Knobs: MODEL_LAYERS MODEL_HIDDEN MODEL_INTER EVAL_TOKENS EVAL_STRIDE
# CALIB_TOKENS SEQ_LEN BATCH (defaults below: a ~1.5 B model, 16 cells each scoring all of bundled:eval (216 k
# tokens) in windows of 1024 moved by 256, i.e. ~860 k tokens of forward work per cell, so the
# cells, which two GPUs share, outweigh what does not parallelise: Ray start, worker start, calibration).
# Locally (no GPU), a check of the whole path with a wheelhouse built for this Python:
#   PYVER=3.11 OUT=/tmp/wh bash scripts/device/build_wheelhouse.sh && WHEELHOUSE=/tmp/wh STASH=/tmp/wh_stash \
#   SITE=/tmp/wh_site NO_EDITABLE=1 CPU_SMOKE=1 PYTHON=.venv/bin/python bash scripts/device/ray_sweep.sh run
# (or `speed`: CPU_SMOKE builds one-layer folders on the CPU, where the cells record why speed was skipped). Held to
# the device's packages: PYTHONPATH=$PWD/scripts/device/mimic DEVICE_MIMIC_CARRY=<the house's wheel names> first.
set -uo pipefail
cd "$(dirname "$0")/../.."
MODE=${1:-run}
OUT=${OUT:-build/device_out}
STASH=${STASH:-$HOME/.actsparse_wheelhouse}
WHEELHOUSE=${WHEELHOUSE:-build/wheelhouse}
SITE=${SITE:-/tmp/site}
PY=$(command -v "${PYTHON:-python3}") || { echo "no python: ${PYTHON:-python3}" >&2; exit 2; }
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute (a venv's link kept): some steps run elsewhere
mkdir -p "$OUT" "$STASH"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
# multicast stays off on shared multi-GPU hosts (KINDS.md): keep these set for every process we start
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

stash() {
    local n=0
    for d in "$WHEELHOUSE"/part*/; do
        [ -d "$d" ] || continue
        cp -f "$d"* "$STASH"/ && n=$((n + 1))
        echo "stashed $d ($(du -sh "$d" | cut -f1)) in $STASH"
    done
    [ "$n" -gt 0 ] || { echo "no $WHEELHOUSE/part*/ in the tree: name the part in carry" >&2; return 2; }
    ls -la "$STASH" | tail -n +2
}

install_site() {  # the one-call bundle: build/wheelhouse/site/site.tar.xz, a site tree packed for the device
    local d="$WHEELHOUSE/site"
    (cd "$d" && sha256sum -c --quiet SHA256) || { echo "site.tar.xz does not match its SHA256" >&2; return 2; }
    rm -rf "$SITE" && mkdir -p "$SITE"
    tar xJf "$d/site.tar.xz" -C "$SITE" || return 2
    echo "unpacked site.tar.xz ($(du -sm "$SITE" | cut -f1) MiB) into $SITE"
}

install_wheels() {
    if [ -f "$WHEELHOUSE/site/site.tar.xz" ]; then
        install_site || return 2
    else
        install_parts || return 2
    fi
    chmod +x "$SITE"/ray/core/src/ray/gcs/gcs_server "$SITE"/ray/core/src/ray/raylet/raylet 2>/dev/null || true
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    [ -n "${NO_EDITABLE:-}" ] || "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
    "$PY" -c "import ray, mlflow, hydra, omegaconf, sqlalchemy, alembic, actsparse.sweep.runner; \
print('imports ok: ray', ray.__version__, 'mlflow', mlflow.__version__, 'hydra', hydra.__version__)"
}

install_parts() {  # the wheels in parts over calls of one warm machine (stash), reassembled and checked here
    stash || true
    "$PY" - "$STASH" <<'EOF' || return 2
import hashlib, sys
from pathlib import Path
d = Path(sys.argv[1])
want = dict(line.split()[::-1] for line in (d / "MANIFEST.sha256").read_text().splitlines() if line.strip())
missing, bad = [], []
for name, sha in sorted(want.items()):
    chunks = sorted(d.glob(f"{name}.chunk*"))
    if chunks and not (d / name).exists():
        with open(d / name, "wb") as f:
            for c in chunks:
                f.write(c.read_bytes())
    if not (d / name).exists():
        missing.append(name)
    elif hashlib.sha256((d / name).read_bytes()).hexdigest() != sha:
        bad.append(name)
if missing or bad:
    sys.exit(f"wheelhouse incomplete: missing {missing}, checksum mismatch {bad}; carry every part "
             "(build/wheelhouse/PLAN.txt) to the same warm machine")
print(f"wheelhouse complete: {len(want)} wheels verified")
EOF
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$STASH"/*.whl || return 2
}

build_model() {  # random weights: the work (calibration, evaluation) is real, the perplexities are not
    "$PY" - "$1" <<'EOF'
import os, shutil, sys, time
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
dst = Path(sys.argv[1])
src = Path("actsparse/assets/models/tiny-llama")
t0 = time.time()
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if "token" in f.name:
        shutil.copy(f, dst / f.name)
from transformers import AutoTokenizer
vocab = len(AutoTokenizer.from_pretrained(dst))
cfg = LlamaConfig(vocab_size=vocab, hidden_size=int(os.environ.get("MODEL_HIDDEN", 2048)),
                  intermediate_size=int(os.environ.get("MODEL_INTER", 8192)),
                  num_hidden_layers=int(os.environ.get("MODEL_LAYERS", 24)), num_attention_heads=16,
                  num_key_value_heads=8, max_position_embeddings=4096, torch_dtype="bfloat16")
dev = "cuda" if torch.cuda.is_available() else "cpu"
with torch.device(dev):
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(dst)
n = sum(p.numel() for p in model.parameters())
print(f"built a random Llama of {n / 1e9:.2f} B parameters (vocab {vocab}) in {dst} ({time.time() - t0:.0f} s)")
EOF
}

run() {
    {
        date -u
        nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
        "$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available(), "gpus", torch.cuda.device_count())'
        nproc; free -g | head -2
    } 2>&1 | tee "$OUT/env.txt"
    if [ -z "${NO_INSTALL:-}" ]; then
        install_wheels 2>&1 | tee "$OUT/install.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "install failed: see install.log" >&2; return 2; }
        export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if [ -z "${CPU_SMOKE:-}" ]; then
        MODEL=$MODEL_DIR
        [ -f "$MODEL/config.json" ] || build_model "$MODEL" 2>&1 | tee -a "$OUT/env.txt"
        ARGS=(--device cuda --gpus 2 --dtype bfloat16 --calib-tokens "${CALIB_TOKENS:-16384}"
              --eval-tokens "${EVAL_TOKENS:-262144}" --seq-len "${SEQ_LEN:-1024}" --stride "${EVAL_STRIDE:-256}"
              --batch-size "${BATCH:-8}")
    else  # a CPU check of this script: the bench's gpus part needs GPUs, so run the CPU parts instead
        MODEL=tiny-llama
        ARGS=(--device cpu --parts grid,rerun --calib-tokens 1024 --eval-tokens 1024 --seq-len 128 --no-append)
    fi
    timeout "${BENCH_TIMEOUT:-520}" "$PY" benchmarks/sweep_bench.py --parts gpus --model "$MODEL" \
        --work /tmp/sweep_bench --out "$OUT" --no-append "${ARGS[@]}" 2>&1 | tee "$OUT/bench.log"
    cp /tmp/sweep_bench/smi_*gpu.csv "$OUT"/ 2>/dev/null || true
    tar czf "$OUT/logs.tar.gz" -C /tmp/sweep_bench --exclude='store_*' . 2>/dev/null || true
    ls -la "$OUT"
}

speed() {  # eval=speed in a real sweep on the GPU: decode/* and kernel/* metrics per cell, in MLflow
    [ -n "${NO_INSTALL:-}" ] || { install_wheels 2>&1 | tee "$OUT/install.log"; }
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    local ws=/tmp/speed_sweep dev=cuda launcher=gpu layers=${SPEED_LAYERS:-8} folders=() p
    [ -z "${CPU_SMOKE:-}" ] || { dev=cpu; launcher=local; layers=1; }
    rm -rf "$ws" && mkdir -p "$ws"
    # random weights at the presets' real shapes (fewer layers): the families users sweep most
    for p in ${SPEED_PRESETS:-qwen3-8b gemma3-12b}; do
        "$PY" scripts/device/random_model.py --preset "$p" --layers "$layers" --out "$ws/models/$p" --device "$dev" \
            2>&1 | grep -v "Writing model shards" | tee -a "$OUT/models.log"
        folders+=("$ws/models/$p")
    done
    local IFS=,
    (cd "$ws" && timeout "${BENCH_TIMEOUT:-480}" "$PY" -m actsparse.cli sweep -m model=hf "model.name=${folders[*]}" \
        "method=${SPEED_METHODS:-dense,teal,wina,scap,cats}" sparsity=0.5 eval=speed device=$dev launcher=$launcher \
        model.dtype=bfloat16 data.tokens="${SPEED_CALIB_TOKENS:-8192}" eval.max_tokens="${SPEED_EVAL_TOKENS:-8192}" \
        "tracking.uri=sqlite:///$ws/mlflow.db" "launcher.store=$ws/store" "report.dir=$ws/results") 2>&1 \
        | tee "$OUT/speed_sweep.log"
    unset IFS
    "$PY" - "$ws/mlflow.db" <<'EOF2' | tee "$OUT/speed_cells.txt"
import sys
from mlflow import MlflowClient
c = MlflowClient(f"sqlite:///{sys.argv[1]}")
exp = c.get_experiment_by_name("actsparse")
if exp is None:
    sys.exit("no 'actsparse' experiment in the store: the sweep recorded nothing (see speed_sweep.log)")
runs = c.search_runs([exp.experiment_id], "tags.run_kind = 'cell'")
for r in sorted(runs, key=lambda r: r.data.tags["mlflow.runName"]):
    m, t = r.data.metrics, r.data.tags
    figs = " ".join(f"{k}={m[k]:.4g}" for k in sorted(m) if k.startswith(("decode/", "kernel/", "ppl")))
    why = f" speed_skipped: {t['speed_skipped']}" if "speed_skipped" in t else ""
    print(f"{t['mlflow.runName']:40s} {figs}{why}")
print(f"{len(runs)} cell runs, {sum('decode/speedup' in r.data.metrics for r in runs)} with decode/speedup")
EOF2
    cp "$ws/mlflow.db" "$OUT/speed_mlflow.db" 2>/dev/null || true
}

MODEL_DIR=/tmp/actsparse-random-llama
case "$MODE" in
    stash)  # and use the call: build the model the run sweeps (GPU work, on the same warm machine)
        stash && { [ -n "${CPU_SMOKE:-}" ] || [ -f "$MODEL_DIR/config.json" ] || build_model "$MODEL_DIR" 2>&1 \
            | tee "$OUT/model.log"; } ;;
    run) run ;;
    all) stash && run ;;
    speed) speed ;;
    *) echo "usage: bash scripts/device/ray_sweep.sh {stash|run|all|speed}" >&2; exit 2 ;;
esac
