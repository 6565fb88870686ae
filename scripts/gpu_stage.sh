#!/usr/bin/env bash
# Build what the GPU suite needs (Release, CUDA on) and copy it, stripped,
# into a small folder that can travel to a GPU machine:
#   scripts/gpu_stage.sh [STAGE]      (default gpu-stage/, ignored by git)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
stage=${1:-$root/gpu-stage}
build=$root/build-gpu
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOE_CUDA=ON -DMOE_WERROR=ON >/dev/null
targets=(moehost moe-conform test_gpu_ops test_gpu_routers)
for p in top1 topk_hard softk hash expert_choice noisy_topk; do targets+=("moe_plugin_$p"); done
cmake --build "$build" -j "${JOBS:-2}" --target "${targets[@]}"
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/tests" "$stage/lib/moe/plugins"
cp "$build/bin/moehost" "$build/bin/moe-conform" "$stage/bin/"
cp "$build/tests/test_gpu_ops" "$build/tests/test_gpu_routers" "$stage/tests/"
cp "$build"/lib/moe/plugins/*.so "$stage/lib/moe/plugins/"
strip --strip-debug "$stage"/bin/* "$stage"/tests/* "$stage"/lib/moe/plugins/*.so
# The GPU machine may lack gcc's OpenMP runtime: bring it along (gpu_suite.sh
# puts stage/lib on LD_LIBRARY_PATH).
cp "$(gcc -print-file-name=libgomp.so.1)" "$stage/lib/"
du -sh "$stage"
