#!/usr/bin/env bash
# The SDK as a researcher uses it, from outside the project:
#
#   out_of_tree.sh BUILD_DIR SOURCE_DIR
#
#  1. `cmake --install BUILD_DIR --prefix P` into a temporary prefix; the
#     programs, built-in plugins, headers, CMake package and .pc are there;
#  2. pkg-config: Cflags and plugindir point into P;
#  3. examples/loss_free_bias configured from its own folder against P
#     (CMAKE_PREFIX_PATH=P, no package registry), built, its tests run;
#  4. the installed moe-conform passes the built .so; the same router built
#     with nothing but `pkg-config --cflags` passes too;
#  5. the installed moehost trains a tiny model with the example selected by
#     path, and by name through MOE_PLUGIN_PATH;
#  6. the installed moehost finds the built-in plugins with no environment
#     variable (router.plugin = "softk"), from P/lib/moe/plugins.
# In a sanitizer build (MOE_SANITIZE=ON) the example is built with the same
# sanitizer flags, so it runs inside the instrumented moehost and moe-conform.
set -u
build=$(cd "$1" && pwd)
src=$(cd "$2" && pwd)
example="$src/examples/loss_free_bias"
unset MOE_PLUGIN_PATH

tmp=$(mktemp -d "${TMPDIR:-/tmp}/moe-out-of-tree.XXXXXX")
n_fail=0
n_pass=0
trap 'if [ "$n_fail" -eq 0 ] && [ -z "${KEEP_TMP:-}" ]; then rm -rf "$tmp"; else echo "(files kept in $tmp)" >&2; fi' EXIT
fail() {
    n_fail=$((n_fail + 1))
    echo "FAIL: $*" >&2
}
ok() {
    n_pass=$((n_pass + 1))
    echo "ok: $*"
}
# run LOG DESCRIPTION COMMAND...: COMMAND must succeed; its output goes to LOG
run() {
    local log=$1 what=$2
    shift 2
    if "$@" >"$log" 2>&1; then ok "$what"; return 0; fi
    fail "$what (exit $?): $*"
    tail -n 40 "$log" >&2
    return 1
}
cache() { sed -n "s/^$1:[A-Z]*=//p" "$build/CMakeCache.txt" | head -n 1; }

cmake_bin=$(cache CMAKE_COMMAND)
ctest_bin=$(dirname "$cmake_bin")/ctest
[ -x "$cmake_bin" ] || cmake_bin=cmake
[ -x "$ctest_bin" ] || ctest_bin=ctest
sanitize=$(cache MOE_SANITIZE)
cuda_compiler=$(cache CMAKE_CUDA_COMPILER)
moe_cuda=$(cache MOE_CUDA)

# ---- 1. install ----
prefix="$tmp/prefix"
run "$tmp/install.log" "cmake --install into $prefix" "$cmake_bin" --install "$build" --prefix "$prefix" || exit 1
for f in bin/moehost bin/moe-conform include/moe/router.h include/moe/abi.h include/moe/philox.h \
    include/moe/router_util.h lib/moe/plugins/top1.so lib/moe/plugins/topk_hard.so lib/moe/plugins/softk.so \
    lib/moe/plugins/hash.so lib/moe/plugins/expert_choice.so lib/moe/plugins/noisy_topk.so; do
    [ -e "$prefix/$f" ] || fail "not installed: $f"
done
config=$(find "$prefix" -name MoeRoutingBenchConfig.cmake | head -n 1)
pc=$(find "$prefix" -name moe-routing-bench.pc | head -n 1)
[ -n "$config" ] && ok "CMake package installed ($config)" || fail "no MoeRoutingBenchConfig.cmake under $prefix"
[ -n "$pc" ] && ok "pkg-config file installed ($pc)" || fail "no moe-routing-bench.pc under $prefix"
if [ -n "$(find "$prefix" -path '*/fixtures/*')" ]; then fail "test fixtures were installed"; fi

# ---- 2. pkg-config ----
if [ -n "$pc" ] && command -v pkg-config >/dev/null 2>&1; then
    export PKG_CONFIG_PATH="$(dirname "$pc")"
    cflags=$(pkg-config --cflags moe-routing-bench | sed "s/ *$//")
    plugindir=$(pkg-config --variable=plugindir moe-routing-bench)
    [ "$cflags" = "-I$prefix/include" ] && ok "pkg-config --cflags = $cflags" ||
        fail "pkg-config --cflags gives '$cflags', want '-I$prefix/include'"
    [ "$plugindir" = "$prefix/lib/moe/plugins" ] && [ -f "$plugindir/softk.so" ] && ok "pkg-config plugindir = $plugindir" ||
        fail "pkg-config plugindir gives '$plugindir', want $prefix/lib/moe/plugins (with the built-in plugins)"
else
    echo "note: pkg-config not found; its checks are skipped"
fi

# ---- 3. the example, from its own folder, against the prefix ----
flags=()
if [ "$sanitize" = ON ]; then
    san="-fsanitize=address,undefined -fno-omit-frame-pointer"
    flags+=("-DCMAKE_C_FLAGS=$san" "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined"
        "-DCMAKE_MODULE_LINKER_FLAGS=-fsanitize=address,undefined")
    echo "note: sanitizer build: the example is built with $san (CPU path only)"
    flags+=(-DWITH_CUDA=OFF)
elif [ -n "$cuda_compiler" ] && [ "${cuda_compiler%NOTFOUND}" = "$cuda_compiler" ] && [ "$moe_cuda" != OFF ]; then
    flags+=(-DWITH_CUDA=ON)
else
    flags+=(-DWITH_CUDA=OFF)
fi
exbuild="$tmp/example-build"
run "$tmp/configure.log" "configure examples/loss_free_bias against the prefix" \
    "$cmake_bin" -S "$example" -B "$exbuild" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF "${flags[@]}" || exit 1
found=$(sed -n 's/^MoeRoutingBench_DIR:[A-Z]*=//p' "$exbuild/CMakeCache.txt")
case "$found" in
"$prefix"/*) ok "find_package(MoeRoutingBench) used the prefix ($found)" ;;
*) fail "find_package(MoeRoutingBench) found '$found', not the install prefix" ;;
esac
if grep -rqs -- "-I$src" "$exbuild/CMakeFiles"; then fail "the example build includes headers from the source tree"; fi
run "$tmp/build.log" "build the example" "$cmake_bin" --build "$exbuild" || exit 1
so="$exbuild/loss_free_bias.so"
[ -f "$so" ] && ok "the plugin is in the example's build folder" || fail "no $so"
run "$tmp/ctest.log" "the example's own tests (test_loss_free_bias, conform_loss_free_bias)" \
    "$ctest_bin" --test-dir "$exbuild" --output-on-failure

# ---- 4. the installed moe-conform ----
if run "$tmp/conform.log" "installed moe-conform passes loss_free_bias.so" "$prefix/bin/moe-conform" "$so" --quick; then
    grep -q '^moe-conform: PASS$' "$tmp/conform.log" || fail "moe-conform printed no PASS verdict"
fi
if [ -n "$pc" ] && command -v pkg-config >/dev/null 2>&1; then
    mkdir -p "$tmp/pc"
    # shellcheck disable=SC2046
    run "$tmp/pc-build.log" "build the router with pkg-config flags only" \
        "${CC:-cc}" -std=c11 -O2 $(pkg-config --cflags moe-routing-bench) -shared -fPIC -fvisibility=hidden \
        -o "$tmp/pc/loss_free_bias.so" "$example/loss_free_bias.c" $(pkg-config --libs moe-routing-bench) &&
        run "$tmp/pc-conform.log" "installed moe-conform passes the pkg-config build" \
            "$prefix/bin/moe-conform" "$tmp/pc/loss_free_bias.so" --quick
fi

# ---- 5. train with the example: by path, then by name ----
. "$(dirname "${BASH_SOURCE[0]}")/tiny_config.sh"
mkdir -p "$tmp/run"
write_tiny_run "$tmp/run" "$so"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
run "$tmp/train-path.log" "installed moehost trains with router.plugin = <path of loss_free_bias.so>" \
    "$prefix/bin/moehost" --config "$tmp/run/tiny.toml" --set run.name=by_path --set router.update_rate=0.01 \
    --set moe.aux_loss_weight=0
grep -q 'loss_free_bias' "$tmp/run/runs/by_path/config.toml" 2>/dev/null || fail "the by-path run did not record its router"
run "$tmp/train-name.log" "installed moehost trains with router.plugin = \"loss_free_bias\" and MOE_PLUGIN_PATH" \
    env MOE_PLUGIN_PATH="$exbuild" "$prefix/bin/moehost" --config "$tmp/run/tiny.toml" --set run.name=by_name \
    --set router.plugin=loss_free_bias
out=$("$prefix/bin/moehost" --config "$tmp/run/tiny.toml" --set run.name=no_path --set router.plugin=loss_free_bias 2>&1)
rc=$?
[ "$rc" -eq 1 ] && grep -q "not found" <<<"$out" && ok "without MOE_PLUGIN_PATH the name is not found (exit 1)" ||
    fail "moehost without MOE_PLUGIN_PATH: exit $rc, output: $out"

# ---- 6. the built-in plugins from the prefix, no environment ----
run "$tmp/train-softk.log" "installed moehost trains with router.plugin = \"softk\" and no MOE_PLUGIN_PATH" \
    env -u MOE_PLUGIN_PATH "$prefix/bin/moehost" --config "$tmp/run/tiny.toml" --set run.name=builtin \
    --set router.plugin=softk
listing=$(env -u MOE_PLUGIN_PATH "$prefix/bin/moehost" plugins 2>&1)
first=$(grep -A1 '^softk ' <<<"$listing" | sed -n 2p | tr -d ' ')
[ "$first" = "$prefix/lib/moe/plugins/softk.so" ] && ok "the installed moehost resolves softk to $first" ||
    fail "the installed moehost resolves softk to '$first', not $prefix/lib/moe/plugins/softk.so"

# Relocated: the same tree moved elsewhere still finds its own plugins.
cp -a "$prefix" "$tmp/moved"
listing=$(env -u MOE_PLUGIN_PATH "$tmp/moved/bin/moehost" plugins 2>&1)
first=$(grep -A1 '^softk ' <<<"$listing" | sed -n 2p | tr -d ' ')
[ "$first" = "$tmp/moved/lib/moe/plugins/softk.so" ] && ok "a moved install resolves softk to its own copy" ||
    fail "a moved install resolves softk to '$first'"

if grep -Eqs 'AddressSanitizer|runtime error:|LeakSanitizer' "$tmp"/*.log; then
    fail "a sanitizer report in: $(grep -Els 'AddressSanitizer|runtime error:|LeakSanitizer' "$tmp"/*.log | tr '\n' ' ')"
fi
echo "out_of_tree: $n_pass passed, $n_fail failed"
[ "$n_fail" -eq 0 ]
