#!/usr/bin/env bash
# One device call (<= 8 min) on a lent H100/H200: CUDA tests, then the GPU benchmark.
# Run through the device tool from the repo root, carrying .whl (wheels for what the machine lacks):
#   for w in .whl/*.whl; do :; done; bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-benchmarks/results}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_info.txt"
timeout 180 python3 -m pytest -q tests/test_cuda.py tests/test_outputs.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 280 python3 benchmarks/bench_gpu.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"
