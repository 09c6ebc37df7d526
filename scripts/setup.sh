#!/usr/bin/env bash
# Sets up a fresh machine for fastbn: a virtual environment in .venv with
# torch 2.14.1 (its CUDA 13.0 build, so the CUDA sources compile even without a
# GPU), the test and benchmark dependencies, and fastbn built in place.
# Idempotent: a second run only rebuilds what changed (setup.py keeps the
# object files and ninja's log in build/temp between builds).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" numpy ninja "setuptools>=77" wheel \
  pytest pytest-benchmark expecttest tqdm matplotlib 2> >(grep -v "^WARNING: Location" >&2)

# Compile the CUDA sources when a toolkit is there (FASTBN_FORCE_CPU=1 skips them).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda-13.0/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda-13.0
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
# torch runs `ninja` from PATH: always the venv's, so that every build reads
# the log in build/temp that the last one wrote (another ninja version would
# discard it and recompile everything).
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e . 2> >(grep -v "^WARNING: Location" >&2)
.venv/bin/python -c "import fastbn; print('fastbn build:', fastbn.build_info())"
