#!/usr/bin/env bash
# Router plugins that cannot be used: each training run must end with exit
# code 1 and a message naming the file and what is wrong (never a crash).
# The broken plugins are the fixtures of tests/cli/fixtures/.
#
#   plugin_errors.sh MOEHOST
set -euo pipefail
MOEHOST=$1
source "$(dirname "$0")/common.sh"
FIX=$MOE_CLI_FIXTURE_DIR
for f in cli_fixture v2_only no_symbol abi7 null_table; do require_file "$FIX/$f.so"; done

gen_text "$TMP/data.txt" 20000
write_config "$TMP/ok.toml" ok "$TMP/runs" "$TMP/data.txt" softk
cd "$TMP"
Q=(--quiet)

# A name found nowhere: the message lists every folder searched (the
# MOE_PLUGIN_PATH ones first) and says how to add one.
MOE_PLUGIN_PATH="$TMP/extra1:$TMP/extra2" mh_fail "plugin name not found" "'nosuchrouter' not found" \
    "$TMP/extra1, $TMP/extra2, " "$MOE_CLI_PLUGIN_DIR" "MOE_PLUGIN_PATH" \
    -- --config ok.toml --set router.plugin=nosuchrouter "${Q[@]}"
mh_fail "plugin name not found, no MOE_PLUGIN_PATH" "nosuchrouter" "$MOE_CLI_PLUGIN_DIR" "MOE_PLUGIN_PATH" \
    -- --config ok.toml --set router.plugin=nosuchrouter "${Q[@]}"
mh_fail "empty plugin name" "router\.plugin" "empty" -- --config ok.toml --set 'router.plugin=""' "${Q[@]}"

# Paths.
mh_fail "plugin path that does not exist" "$TMP/nowhere/router\.so" "does not exist" \
    -- --config ok.toml --set router.plugin="$TMP/nowhere/router.so" "${Q[@]}"
printf 'this is not a shared library\n' >junk.so
mh_fail "a .so that is no ELF file" "$TMP/junk\.so" "cannot load" -- --config ok.toml --set router.plugin="$TMP/junk.so" "${Q[@]}"

# ABI versions and tables.
mh_fail "plugin of ABI version 2 only" "$FIX/v2_only\.so" "version 2" "moe_router_plugin_v2" "supports version 1" \
    -- --config ok.toml --set router.plugin="$FIX/v2_only.so" "${Q[@]}"
mh_fail "shared library without a router symbol" "$FIX/no_symbol\.so" "not a router plugin" "moe_router_plugin_v1" \
    -- --config ok.toml --set router.plugin="$FIX/no_symbol.so" "${Q[@]}"
mh_fail "table saying abi_version 7" "$FIX/abi7\.so" "version 7" "supports version 1" \
    -- --config ok.toml --set router.plugin="$FIX/abi7.so" "${Q[@]}"
mh_fail "table pointer NULL" "$FIX/null_table\.so" "NULL" -- --config ok.toml --set router.plugin="$FIX/null_table.so" "${Q[@]}"

# A working plugin refusing options, and misbehaving in forward: the host
# names the plugin (the fixture's own messages do not).
mh_fail "fixture refuses an unknown option" "router 'cli_fixture'" "unknown option 'colour'" "fail_at_step" \
    -- --config ok.toml --set router.plugin="$FIX/cli_fixture.so" --set router.colour=1 "${Q[@]}"
mh_fail "fixture refuses a bad option value" "router 'cli_fixture'" "fail_at_step" \
    -- --config ok.toml --set router.plugin="$FIX/cli_fixture.so" --set router.fail_at_step=-3 "${Q[@]}"
mh_fail "fixture writes an expert index out of range" "router 'cli_fixture'" "expert\[" "outside" \
    -- --config ok.toml --set router.plugin="$FIX/cli_fixture.so" --set router.bad_expert=true "${Q[@]}"
mh_fail "fixture fails in step 1" "router 'cli_fixture'" "forward failed" "injected failure at step 1" \
    -- --config ok.toml --set router.plugin="$FIX/cli_fixture.so" --set router.fail_at_step=1 "${Q[@]}"
finish
