#!/usr/bin/env bash
# Check hf_weightstream on a machine with an NVIDIA GPU: run the GPU tests, then the GPU benchmark.
#
# Usage, from anywhere in a clone of the repository, on a machine with an NVIDIA GPU and a CUDA build of PyTorch:
#   bash scripts/gpu_check.sh            # results go to benchmarks/results/
#   OUT=/some/folder bash scripts/gpu_check.sh
#   PYTHON=.venv/bin/python bash scripts/gpu_check.sh   # a Python other than python3 on PATH
#
# What it does, in about 8 minutes at most (each step has a time limit):
#   1. records the GPU's name, memory and driver version (nvidia-smi) in $OUT/gpu_info.txt;
#   2. runs the tests that need a GPU (tests/test_cuda.py) and the output-equality tests on it
#      (tests/test_outputs.py), logged to $OUT/gpu_tests.log;
#   3. runs benchmarks/bench_gpu.py: it writes an 8 GB random-weight model to /tmp/hfws-gpu-model and compares
#      streaming, accelerate offload and a fully loaded model; the table goes to $OUT, the log to $OUT/gpu_bench.log.
#
# Machines without internet access: put wheel files (*.whl) of whatever Python packages are missing into a folder
# named .whl at the root of the clone; they are installed into /tmp/site first, without contacting any index.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
if [[ $# -gt 0 ]]; then
  echo "gpu_check.sh: unknown argument '$1' (it takes none; set OUT to choose where results go; --help)" >&2
  exit 2
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check.sh: no NVIDIA GPU here (nvidia-smi not found). Run this on a machine with one." >&2
  exit 1
fi

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_info.txt"
timeout 180 "$PYTHON" -m pytest -q tests/test_cuda.py tests/test_outputs.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 280 "$PYTHON" benchmarks/bench_gpu.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"
