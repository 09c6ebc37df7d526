#!/usr/bin/env bash
# GPU check, one call on the lent GPU machine (torch 2.11, Python 3.12, no
# installs there), under 8 minutes in all:
#   1. JIT-build fastbn from this checkout (CPU and CUDA sources);
#   2. the test suite on CUDA (auto path), and test_correctness again with
#      FASTBN_CUDA_PATH=two_pass, while compute-sanitizer's memcheck and
#      racecheck run benchmarks/gpu_paths_check.py --small (a few tiny shapes,
#      both paths) beside them;
#   3. benchmarks/gpu_paths_check.py: every path against the float64 reference,
#      kernels per operator (torch.profiler), CUDA-graph capture and replay;
#   4. the kernel benchmark: fastbn (auto and each forced path) beside torch
#      (cuDNN), torch without cuDNN and torch.compile;
#   5. SyncBatchNorm over NCCL (tests and bench_sync at world size 1 on one GPU);
#   6. the tutorial's training-step timings, if time is left.
# Each step has a time limit, clipped to what is left of the overall budget.
# The results folder ($OUT, default results/gpu) comes back from the device
# machine whole: at most 8 files, no folder (pack_results): summary.txt, a few
# short reports, and results.tar.gz with every log and result file.
#
#   OUT=$OUT bash benchmarks/gpu_check.sh
set -uo pipefail

BUDGET_SECONDS=${GPU_CHECK_BUDGET:-465}  # leaves time to pack under 8 minutes
# Reports copied to the top of the results folder, the first 7 that exist
# (the rest is in the archive; build.log shows when the build failed).
KEEP_FILES=(summary.txt tests.log paths_check.log memcheck.log racecheck.log paths.txt bench_summary.md build.log)

# pack_results DIR FILE...: DIR ends up holding results.tar.gz (all of DIR)
# and, flattened to its top level, those of the named files that exist
# (at most 7): never more than 8 files and no folders.
pack_results() {
  local dir=$1
  shift
  local tmp
  tmp=$(mktemp -d) || return 1
  tar -czf "$tmp/results.tar.gz" -C "$dir" . || { rm -rf "$tmp"; return 1; }
  local kept=0 name found
  for name in "$@"; do
    [ "$kept" -lt 7 ] || break
    found=$(find "$dir" -type f -name "$name" -print -quit)
    if [ -n "$found" ] && [ ! -e "$tmp/$name" ]; then
      cp "$found" "$tmp/$name" && kept=$((kept + 1))
    fi
  done
  find "$dir" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
  mv "$tmp"/* "$dir"/
  rmdir "$tmp"
}

# run_step NAME LIMIT COMMAND...: runs COMMAND with a time limit (clipped to
# the budget left), its output to $WORK/NAME.log (last lines echoed), and
# records "NAME status seconds" in $WORK/steps.txt.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 10 ]; then
    echo "$name skipped (budget spent)" | tee -a "$WORK/steps.txt"
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit}s, $(date +%T))"
  local start=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  tail -n 8 "$WORK/$name.log"
  echo "$name rc=$rc $((SECONDS - start))s$([ "$rc" = 124 ] && echo ' (time limit)')" | tee -a "$WORK/steps.txt"
  [ "$rc" = 0 ] || STATUS=1
  return 0
}

main() {
  cd "$(dirname "$0")/.." || exit 1
  OUT=${OUT:-results/gpu}
  mkdir -p "$OUT"
  WORK="$OUT/work"
  mkdir -p "$WORK"
  DEADLINE=$((SECONDS + BUDGET_SECONDS))
  STATUS=0
  export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  export FASTBN_JIT=1 FASTBN_BUILD_DIR=${FASTBN_BUILD_DIR:-/tmp/fastbn-jit}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  # The real GPU runs the CUDA tests; the SIMT backend (the same kernels on
  # the CPU) is for machines without one and would only spend device time here.
  export FASTBN_SIMT=0
  unset FASTBN_CUDA_PATH FASTBN_CUDA_PATH_TABLE
  export XDG_CACHE_HOME="$WORK/cache"  # no tuned table from elsewhere: the defaults are checked

  {
    date -u
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>&1
    python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
  } > "$WORK/environment.txt" 2>&1

  run_step build 240 python -c "import fastbn, json; print(json.dumps(fastbn.build_info()))"
  if ! grep -q "build rc=0" "$WORK/steps.txt"; then
    echo "build failed: nothing else can run"
  else
    # Correctness and sanitizers side by side (none of them is timed).
    for tool in memcheck racecheck; do
      run_step "$tool" 150 compute-sanitizer --tool "$tool" --error-exitcode 3 --print-limit 20 \
        python benchmarks/gpu_paths_check.py --small &
    done
    run_step tests 150 python -m pytest tests -q -x -p no:cacheprovider --junitxml="$WORK/tests.xml" \
      -k "cuda and not jit_build and not mnist and not bench_quick"
    run_step tests_two_pass 60 env FASTBN_CUDA_PATH=two_pass \
      python -m pytest tests/test_correctness.py -q -x -p no:cacheprovider -k cuda
    # SyncBatchNorm over NCCL at world size 1 (and the multi-rank test where
    # two or more GPUs exist; it skips otherwise).
    run_step sync 60 python -m pytest tests/test_sync_batch_norm.py -q -x -p no:cacheprovider \
      -k "nccl or cuda"
    wait
    grep -q "memcheck rc=0" "$WORK/steps.txt" || STATUS=1
    grep -q "racecheck rc=0" "$WORK/steps.txt" || STATUS=1
    run_step paths_check 60 python benchmarks/gpu_paths_check.py
    run_step bench 120 python -m fastbn.bench --device cuda --quick --out "$WORK/bench" --no-progress \
      --no-plots --min-run-time 0.03 --dtypes fp32,bf16
    [ -f "$WORK/bench/summary.md" ] && cp "$WORK/bench/summary.md" "$WORK/bench_summary.md"
    run_step bench_sync 30 python -m fastbn.bench_sync --device cuda
    run_step mnist 45 python -m fastbn.mnist --device cuda --skip-training --step-min-run-time 0.2 \
      --out "$WORK/mnist"
  fi

  {
    cat "$WORK/environment.txt"
    echo
    cat "$WORK/steps.txt"
    echo "status $STATUS, $SECONDS s"
    [ -f "$WORK/bench/paths.txt" ] && { echo; cat "$WORK/bench/paths.txt"; }
  } > "$WORK/summary.txt"
  cat "$WORK/summary.txt"
  pack_results "$OUT" "${KEEP_FILES[@]}"
  ls -l "$OUT"
  exit "$STATUS"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
