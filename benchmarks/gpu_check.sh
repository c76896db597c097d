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
# epochs of the 1,104 training images; from scratch: no pretrained weights travel)
# and checks that the loss falls and the test mAP beats chance, (4) measures the
# same at batch 128 (150 steps): images/s, step time, compile time, peak memory and
# MFU against the bf16 dense peak, (5) runs benchmarks.speed (among its cases the
# head + loss alone at 20 and 80 classes) with the time that is left. Results land
# in OUTDIR: gpu_check.log, gpu_train_check.json, gpu_train_check_b128.json,
# speed.md (the repository's speed.md with this GPU's section added or replaced).
# Exit status 0 only when every check passed.
# GPU_CHECK_SMOKE=1 runs the same stages with tiny settings (about 2 minutes on a CPU).
# GPU_CHECK_BASELINE=1 first trains the BCE baseline the same way, as a reference.
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
import benchmarks.gpu_train_check, mlcnc_jax.build, mlcnc_jax.trainer, mlcnc_jax.data.arrays  # noqa: E401,F401
print("ok: the trainer, the numpy input and the GPU check import without TensorFlow")
EOF
then
    echo "ERROR: the training path needs TensorFlow at import time (see the traceback above);"
    echo "       the GPU checks cannot run until it imports without it."
    exit 2
fi

train_args=(--backbone resnet50 --image_size 224 --dtype bfloat16 --batch_size 64 --steps 500)
# Throughput at batch 128: the same Trainer, fewer steps, no learning verdict.
big_args=(--backbone resnet50 --image_size 224 --dtype bfloat16 --batch_size 128 --steps 150
    --warmup_steps 20 --no_verdict)
speed_args=()
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    train_args=(--smoke)
    big_args=(--smoke --no_verdict)
    speed_args=(--no-full --classes 20 --head_steps 2)
fi

if [ "${GPU_CHECK_BASELINE:-0}" = 1 ]; then
    # Reference for the learning verdict: the same data, steps and backbone with
    # pooled features, a linear classifier and BCE (costs about a third of the budget).
    section "baseline (BCE) train check: ${train_args[*]} (left: $(left) s)"
    timeout $(($(left) - 250)) "$PY" -m benchmarks.gpu_train_check --model baseline \
        --data "$DATA" "${train_args[@]}" --out "$OUTDIR/gpu_train_check_baseline.json" ||
        echo "baseline train check: exit $? (reported, not part of the status)"
fi

section "train check: ${train_args[*]} (left: $(left) s)"
if timeout $(($(left) - 200)) "$PY" -m benchmarks.gpu_train_check \
    --data "$DATA" "${train_args[@]}" --out "$OUTDIR/gpu_train_check.json"; then
    [ "${GPU_CHECK_SMOKE:-0}" = 1 ] && echo "train check: ran (smoke: no learning verdict)" ||
        echo "train check: PASSED"
else
    echo "train check: FAILED (exit $?)"
    status=1
fi

section "throughput: ${big_args[*]} (left: $(left) s)"
timeout $(($(left) - 120)) "$PY" -m benchmarks.gpu_train_check \
    --data "$DATA" "${big_args[@]}" --out "$OUTDIR/gpu_train_check_b128.json" ||
    { echo "throughput run: FAILED (exit $?)"; status=1; }
results=("$OUTDIR"/gpu_train_check*.json)
[ -e "${results[0]}" ] && "$PY" -m benchmarks.gpu_train_check --summarize "${results[@]}"

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
