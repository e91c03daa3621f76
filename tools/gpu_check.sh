#!/usr/bin/env bash
# The GPU checks of one device session, prepared so that a session lent a GPU spends its minutes on
# running them. Run on the GPU machine, whose image holds torch, triton, pytest, transformers, ninja
# and nvcc (this script installs only merge_engine itself, editable, which builds both extensions):
#   OUT=folder bash tools/gpu_check.sh tests   # build both extensions, run every GPU test per GPU backend
#   OUT=folder bash tools/gpu_check.sh bench   # kernel benchmarks, CUDA and Triton backends
# Each stage fits one 10-minute device command; the build stays in the tree between stages on a
# machine that is still warm. Logs and benchmark tables go to $OUT (default gpu_out/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the Triton tests compile for the GPU
PY=${PYTHON:-python3}
stage=${1:-tests}

{ nvidia-smi -L; $PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/device.txt"

# every stage: a bench stage on a fresh machine (the tests stage's machine went back) builds too, rather than
# failing to import merge_engine or timing the references under --backend cuda
start=$SECONDS
$PY -c "import merge_engine._cuda_kernels" 2>/dev/null ||
  $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -5 | tee "$OUT/install.txt"
$PY -c "from merge_engine.ops import backends; import sys; sys.exit((backends.cpu_extension() is None) + 2 * (backends.cuda_extension() is None))"
echo "extensions built: exit $? in $((SECONDS - start)) s (1: CPU failed, 2: CUDA failed)" | tee "$OUT/build.txt"

if [ "$stage" = tests ]; then
  $PY -m pytest -q -ra -p no:cacheprovider tests/csrc/test_cuda_kernels.py tests/kernels tests/triton_kernels 2>&1 | tee "$OUT/tests.txt"
  for backend in cuda triton reference; do  # the whole engine on each GPU backend (MERGE_ENGINE_GPU_BACKEND)
    MERGE_ENGINE_GPU_BACKEND=$backend $PY -m pytest -q -ra -p no:cacheprovider \
      "tests/test_engine.py::test_cuda_merge_matches_cpu" 2>&1 | tee "$OUT/engine_$backend.txt"
  done
  $PY -m pytest -q -ra -p no:cacheprovider "tests/test_session.py::test_a_gpu_session_equals_the_gpu_engine" \
    "tests/test_session.py::test_a_gpu_session_with_factored_lora_experts_equals_the_gpu_engine" \
    tests/evaluation 2>&1 | tee "$OUT/session.txt"
elif [ "$stage" = bench ]; then
  for backend in cuda triton; do
    for b in task_vectors fisher gram permute; do
      echo "== bench_$b --backend $backend"
      $PY bench/bench_$b.py --device cuda --backend $backend 2>&1
    done
  done | tee "$OUT/bench.txt"
  # multiple-choice scoring (shared rows and prompts) against the straightforward scorer, bf16 on the GPU
  $PY bench/bench_evaluation.py --device cuda --dtype bfloat16 --questions 64 2>&1 | tee "$OUT/evaluation.txt"
  # seconds per search trial on the GPU (the 162M model: it fits the device time)
  $PY bench/bench_search.py --device cuda --small --trials 2 --budget 120 --skip-mergekit 2>&1 | tee "$OUT/search.txt"
else
  echo "usage: tools/gpu_check.sh tests|bench" >&2
  exit 2
fi
