#!/usr/bin/env bash
# Every GPU check of the project in one run of at most 8 minutes.
#
# For a GPU host with Python 3.12, jax (CUDA), flax, optax, orbax-checkpoint and
# tensorboard, but no TensorFlow, tensorflow-datasets, ml-collections or clu, and
# no internet. Prepare on a machine with PyPI access and the project's data
# dependencies, then carry the two ignored paths with the call (~38 MiB):
#
#   bash benchmarks/fetch_gpu_wheels.sh                          # .whl/ (~9 MiB)
#   python -m benchmarks.gpu_train_check \
#       --make_data benchmarks/cache/gpu_check/synthetic_lt_224.npz   # ~30 MiB
#
# On the GPU host, from the repository root:
#
#   bash benchmarks/gpu_check.sh [OUTDIR]     # OUTDIR: $OUT if set, else benchmarks/results/gpu
#
# It (1) installs the carried wheels the host lacks, (2) checks that the whole
# training path imports with TensorFlow blocked, (3) trains ResNet-50 + MLC-NC on
# synthetic_lt at 224 px in bfloat16 through the project's Trainer (numpy batches
# from the project's class-aware sampler) for 500 steps at batch 64 (about 29
# epochs of the 1,104 training images; from scratch: no pretrained weights travel),
# checks that the loss falls and the test mAP beats chance, and reports images/s,
# step and compile time, peak memory, MFU against the bf16 dense peak and whether
# the host keeps up: the Trainer's images/s with the real input beside the host
# input alone and the same compiled step on a device-resident batch. The "real
# input" on this host is numpy batches of the project's sampler over images
# decoded once (no TensorFlow here, so no tf.data JPEG decoding; its cost per host
# core is measured by python -m benchmarks.input_pipeline where TensorFlow is).
# (4) measures the loop overhead: the real Trainer against a bare loop of the same
# step (python -m benchmarks.loop_overhead), (5) times bfloat16 against float32:
# the full model's train step at batch 128 and 80 classes (benchmarks.speed; also
# images/s, compile time, peak memory and MFU at batch 128) with the time that is
# left. The head + losses alone against the authors' release is not part of this
# run (python -m benchmarks.speed --no-full). Results land in OUTDIR:
# gpu_check.log, gpu_train_check.json, loop_overhead.md, speed.md (the
# repository's speed.md with this GPU's section added or replaced).
# Exit status 0 only when every check passed (a checkout without
# benchmarks/loop_overhead.py says so and skips that stage).
# GPU_CHECK_SMOKE=1 runs the same stages with tiny settings (a few minutes on a CPU).
# GPU_CHECK_BASELINE=1 first trains the BCE baseline the same way, as a reference.
# LOOP_OVERHEAD_ARGS: extra arguments for benchmarks.loop_overhead.
set -uo pipefail

cd "$(dirname "$0")/.."
TOTAL_S="${GPU_CHECK_TOTAL_S:-460}"  # stay under 8 minutes, whatever happens
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
DATA="${DATA:-benchmarks/cache/gpu_check/synthetic_lt_224.npz}"
OUTDIR="${1:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
status=0

left() { echo $((TOTAL_S - SECONDS)); }
section() { echo; echo "=== [$SECONDS s] $*"; }

section "host"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c "import sys, jax; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices())"

section "install what the host lacks (from $WHEELS, no index)"
missing=()
for pair in ml_collections:ml-collections clu:clu PIL:pillow; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
    [ -d "$WHEELS" ] || { echo "ERROR: $WHEELS/ is missing: run benchmarks/fetch_gpu_wheels.sh and carry it."; exit 2; }
    # Resolve dependencies against what is installed; missing ones come from the folder.
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "${missing[@]}" ||
        "$PY" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl ||
        { echo "ERROR: could not install ${missing[*]} from $WHEELS"; exit 2; }
fi
echo "installed: ${missing[*]:-nothing needed}"

section "import check: the whole training path without TensorFlow"
if ! "$PY" - <<'EOF'
import importlib.abc
import sys


class NoTensorFlow(importlib.abc.MetaPathFinder):
    """As on a host without TensorFlow, even if one is installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
            raise ImportError(f"{name} is blocked: the GPU check must run without TensorFlow")
        return None


sys.meta_path.insert(0, NoTensorFlow())
import benchmarks.gpu_train_check, mlcnc_jax.experiment, mlcnc_jax.trainer, mlcnc_jax.data.feeds  # noqa: E401,F401
print("ok: the trainer, the numpy input and the GPU check import without TensorFlow")
EOF
then
    echo "ERROR: the training path needs TensorFlow at import time (see the traceback above);"
    echo "       the GPU checks cannot run until it imports without it."
    exit 2
fi

train_args=(--backbone resnet50 --image_size 224 --dtype bfloat16 --batch_size 64 --steps 500
    --input_check 50)
# bfloat16 against float32, the full model (one batch size and class count, to fit the time).
# Time plan (GPU, 460 s): set-up ~30 s, train check <= left - 250 (compilation, 500 steps,
# evaluation, input check), loop overhead <= 70 s, then at least ~180 s for the speed
# stage's two cases (each a fresh process: about a minute of compilation, 20 steps).
speed_args=(--no-head --batch_sizes 128 --classes 80 --dtypes bfloat16,float32)
loop_timeout=70
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    train_args=(--smoke --input_check 3)
    speed_args=(--no-head --backbone resnet_small --image_size 32 --batch_sizes 8 --classes 20
        --dtypes bfloat16,float32 --steps 2 --cpu_peak_gflops 50)
    loop_timeout=90
fi

if [ "${GPU_CHECK_BASELINE:-0}" = 1 ]; then
    # Reference for the learning verdict: the same data, steps and backbone with
    # pooled features, a linear classifier and BCE (costs about a third of the budget).
    section "baseline (BCE) train check: ${train_args[*]} (left: $(left) s)"
    # Half of what the train check would get, so both fit.
    timeout $((($(left) - 250) / 2)) "$PY" -m benchmarks.gpu_train_check --model baseline \
        --data "$DATA" "${train_args[@]}" --out "$OUTDIR/gpu_train_check_baseline.json" ||
        echo "baseline train check: exit $? (reported, not part of the status)"
fi

section "train check: ${train_args[*]} (left: $(left) s)"
if timeout $(($(left) - 250)) "$PY" -m benchmarks.gpu_train_check \
    --data "$DATA" "${train_args[@]}" --out "$OUTDIR/gpu_train_check.json"; then
    [ "${GPU_CHECK_SMOKE:-0}" = 1 ] && echo "train check: ran (smoke: no learning verdict)" ||
        echo "train check: PASSED"
else
    echo "train check: FAILED (exit $?)"
    status=1
fi

results=("$OUTDIR"/gpu_train_check*.json)
[ -e "${results[0]}" ] && "$PY" -m benchmarks.gpu_train_check --summarize "${results[@]}"

section "loop overhead: python -m benchmarks.loop_overhead ${LOOP_OVERHEAD_ARGS:-} (left: $(left) s)"
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('benchmarks.loop_overhead') is None)"; then
    echo "loop overhead: SKIPPED: benchmarks/loop_overhead.py is not in this checkout"
else
    t=$(($(left) - 180))  # leave the speed stage its two compilations
    ((t > loop_timeout)) && t=$loop_timeout
    # shellcheck disable=SC2086 # LOOP_OVERHEAD_ARGS: split into words on purpose
    if ((t > 20)) && timeout "$t" "$PY" -m benchmarks.loop_overhead ${LOOP_OVERHEAD_ARGS:-} |
        tee "$OUTDIR/loop_overhead.md"; then
        echo "loop overhead: measured"
    else
        echo "loop overhead: FAILED, or cut off after $t s"
        status=1
    fi
fi

section "speed (left: $(left) s)"
[ -f benchmarks/results/speed.md ] && cp benchmarks/results/speed.md "$OUTDIR/speed.md"
# No new case once the budget is spent; a started case may run on, hence the margin.
budget=$(($(left) - 90))
if ((budget > 30)); then
    if ! timeout $(($(left) - 5)) "$PY" -m benchmarks.speed --time_budget_s "$budget" \
        --case_timeout_s 240 --out "$OUTDIR/speed.md" "${speed_args[@]}"; then
        echo "speed: FAILED or cut off"
        status=1
    fi
else
    echo "speed: skipped, too little time left"
    status=1
fi

section "done in $SECONDS s, status $status"
exit $status
