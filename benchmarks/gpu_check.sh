#!/usr/bin/env bash
# GPU check, one call on the lent GPU machine (torch 2.11, no installs there):
# JIT-builds fastbn from this checkout, runs the test suite on CUDA, the kernel
# benchmark (full suite) and the MNIST training-step timings. Everything lands
# in $OUT (default results/gpu). Meant to finish in under 6 minutes on an H100;
# each step has a time limit, and the benchmark leaves results.partial.json
# behind if its limit cuts it short.
#
#   OUT=$OUT bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export FASTBN_JIT=1 FASTBN_BUILD_DIR=${FASTBN_BUILD_DIR:-/tmp/fastbn-jit}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
# The real GPU runs the CUDA tests; the SIMT backend (the same kernels on the
# CPU) is for machines without one and would only spend device time here.
export FASTBN_SIMT=0
status=0
step() { echo "== $* ($(date +%T))"; }

step "build (JIT)"
python -c "import fastbn, json; print(json.dumps(fastbn.build_info()))" 2>&1 | tee "$OUT/build.log" || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1

step "tests"
timeout 180 python -m pytest tests -q -x -p no:cacheprovider --junitxml="$OUT/tests.xml" \
  -k "not jit_build and not mnist and not bench_quick" 2>&1 | tee "$OUT/tests.log" | tail -n 30
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "kernel benchmark"
timeout 210 python -m fastbn.bench --device cuda --out "$OUT/bench" --no-progress --min-run-time 0.05 \
  2>&1 | tee "$OUT/bench.log" | tail -n 12
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "MNIST step timings"
timeout 60 python -m fastbn.mnist --device cuda --skip-training --step-min-run-time 0.2 --out "$OUT/mnist" \
  2>&1 | tee "$OUT/mnist.log" | tail -n 10
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "done, status $status"
exit $status
