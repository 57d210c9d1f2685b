#!/usr/bin/env bash
# jcaffe's device check: the GPU-relevant tests and the benchmarks on a GPU machine, in one
# command of at most 8 minutes, from a copy of the working tree, with no network.
#
#   bash benchmarks/gpu_check.sh                    # OUT=./gpu_check_out by default
#   OUT=/some/dir GPU_CHECK_BUDGET=480 bash benchmarks/gpu_check.sh
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh  # the script itself on a CPU, ~2-3 minutes
#
# Needs a Python with JAX (+ its CUDA plugin), numpy, optax, tensorstore, protobuf, h5py,
# pillow, pytest; optional matplotlib (chart) and PyTorch with CUDA (the peer). jcaffe itself
# is used from this tree (PYTHONPATH), not installed; lmdb / plyvel are not needed.
#
# Every stage runs in its own process under `timeout`, capped by what is left of the budget;
# a stage that fails or times out is recorded and the next one runs. Stages that no longer fit
# are skipped. Writes under $OUT: gpu_check.log (everything), logs/<stage>.log, stages.tsv,
# parts/<stage>.json, pytest*.log, full_lenet_run.log, and the merged gpu_check.json / .md /
# .png.
set -u

cd "$(dirname "$0")/.."
REPO=$(pwd)
export OUT=$(mkdir -p "${OUT:-$REPO/gpu_check_out}" && cd "${OUT:-$REPO/gpu_check_out}" && pwd)
mkdir -p "$OUT/logs" "$OUT/parts"
: > "$OUT/stages.tsv"
PY=${PYTHON:-python}
SMOKE=${GPU_CHECK_SMOKE:-0}
[ "$SMOKE" = "0" ] && SMOKE=""
export GPU_CHECK_SMOKE=${SMOKE:-0}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Several processes may hold the GPU at once (pytest's subprocesses): allocate on demand.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -n "$SMOKE" ]; then
    export GPU_CHECK_BACKEND=cpu JAX_PLATFORMS=cpu TEST_PLATFORM=cpu
    BUDGET=${GPU_CHECK_BUDGET:-240}
else
    export GPU_CHECK_BACKEND=gpu TEST_PLATFORM=cuda
    BUDGET=${GPU_CHECK_BUDGET:-450}
fi
REPORT_RESERVE=25
START=$(date +%s)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

left() { echo $(( BUDGET - REPORT_RESERVE - ($(date +%s) - START) )); }

# stage NAME SECONDS COMMAND...: runs COMMAND under a timeout of min(SECONDS, budget left).
stage() {
    local name=$1 limit=$2
    shift 2
    local rest
    rest=$(left)
    if [ "$rest" -lt 15 ]; then
        echo "=== $name: skipped (budget spent)"
        printf '%s\t%s\t%s\n' "$name" "-1" "0" >> "$OUT/stages.tsv"
        return 0
    fi
    [ "$limit" -gt "$rest" ] && limit=$rest
    echo "=== $name (timeout ${limit}s, $(( $(date +%s) - START ))s elapsed)"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    tail -n 4 "$OUT/logs/$name.log" | cut -c1-300
    echo "=== $name: exit $rc after ${dt}s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >> "$OUT/stages.tsv"
    return 0
}

G="$PY benchmarks/gpu_check.py"

stage env 30 $G env
command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
stage import 30 $PY -c "import sys; sys.modules['lmdb'] = sys.modules['plyvel'] = None
import jcaffe.train, jcaffe.commands, jcaffe.data.sources, jcaffe.layers.vision; print('ok')"
stage mnist 90 $PY datasets/mnist/prepare_mnist.py
stage probe 60 $G probe

if [ -n "$SMOKE" ]; then
    stage pytest 120 env JCAFFE_TEST_PLATFORM=cpu $PY -m pytest -p no:cacheprovider -o addopts= \
        tests/test_precision.py -k "gradient and lenet" -q -rfE
    cp "$OUT/logs/pytest.log" "$OUT/pytest.log" 2>/dev/null
    stage step-lenet-1 60 $G step lenet 1 float32
    stage step-lenet-10 60 $G step lenet 10 float32
    stage step-lenet-10-bf16 60 $G step lenet 10 bf16
    stage full 120 $G full 100
    stage layers 60 $G layers
    stage torch-lenet-eager 30 $G torch-step lenet eager
else
    # (a) the GPU-relevant tests on the GPU (JCAFFE_TEST_PLATFORM: see tests/conftest.py)
    stage pytest 150 env JCAFFE_TEST_PLATFORM=cuda $PY -m pytest -p no:cacheprovider -o addopts= \
        tests/test_precision.py tests/test_train.py tests/test_net.py -v -rfE --durations=10
    cp "$OUT/logs/pytest.log" "$OUT/pytest.log" 2>/dev/null
    # (b) jcaffe's train step: 1, 10 and 100 iterations per dispatch, Caffe's float32
    for net in lenet cifar10_quick; do
        for k in 1 10 100; do
            stage "step-$net-$k" 45 $G step $net $k float32
        done
    done
    stage full 120 $G full
    stage torch-lenet-eager 40 $G torch-step lenet eager
    stage torch-cifar10_quick-eager 40 $G torch-step cifar10_quick eager
    stage torch-lenet-compile 70 $G torch-step lenet compile
    stage layers 45 $G layers
    stage pytest-vision 90 env JCAFFE_TEST_PLATFORM=cuda $PY -m pytest -p no:cacheprovider -o addopts= \
        tests/test_layers_vision.py -q -rfE
    cp "$OUT/logs/pytest-vision.log" "$OUT/pytest-vision.log" 2>/dev/null
    # the opt-in precisions, 100 iterations per dispatch
    for p in tf32 bf16; do
        for net in lenet cifar10_quick; do
            stage "step-$net-100-$p" 40 $G step $net 100 $p
        done
    done
    stage torch-cifar10_quick-compile 70 $G torch-step cifar10_quick compile
    stage torch-full-eager 60 $G torch-full eager
    stage torch-full-compile 90 $G torch-full compile
fi

# The report always gets its reserve.
BUDGET=$(( BUDGET + REPORT_RESERVE ))
stage report 25 $G report
cp "$OUT/logs/report.log" "$OUT/summary.txt" 2>/dev/null
echo "=== done in $(( $(date +%s) - START ))s; results in $OUT"
