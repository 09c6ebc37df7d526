#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite, with the
# micro-benchmarks in benchmarks/ run once each. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# When a CUDA toolkit was found, the build must contain the CUDA kernels.
if [ -n "${CUDA_HOME:-}" ] || [ -x /usr/local/cuda-13.0/bin/nvcc ]; then
  if [ "${FASTBN_FORCE_CPU:-0}" != "1" ]; then export FASTBN_EXPECT_CUDA=1; fi
fi
exec .venv/bin/python -m pytest tests benchmarks --benchmark-disable "$@"
