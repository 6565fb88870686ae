#!/usr/bin/env bash
# The test command: build with warnings as errors (the CUDA code too, when
# nvcc is present) and run the whole suite, then again on the CPU path under
# AddressSanitizer + UndefinedBehaviorSanitizer.
#   scripts/test.sh            both builds (build-test/, build-asan/)
#   scripts/test.sh --fast     the first build only
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
jobs=${JOBS:-$(nproc)}
cd "$root"

run_suite() {
  local dir=$1; shift
  cmake -S . -B "$dir" -DMOE_WERROR=ON "$@" >/dev/null
  cmake --build "$dir" -j "$jobs"
  # Tests labelled "gpu" need a CUDA device: tests/gpu/run.sh runs them there.
  ctest --test-dir "$dir" --output-on-failure -j "$jobs" -LE gpu
}

echo "== build and test (-Werror) =="
run_suite build-test -DCMAKE_BUILD_TYPE=RelWithDebInfo
if [ "${1:-}" != "--fast" ]; then
  echo "== build and test under ASan + UBSan =="
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_suite build-asan -DCMAKE_BUILD_TYPE=Debug -DMOE_SANITIZE=ON -DMOE_CUDA=OFF
fi
