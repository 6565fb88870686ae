#!/usr/bin/env bash
# Malformed [sweep] tables are refused before anything runs, with exit 1 and
# a message naming file:line, the key and the problem: an unknown axis key,
# an empty list, an unknown reserved key, an axis that is not a list, a
# value of the wrong type, a bare dotted key, a router option the plugin
# does not have, a plugin that does not exist, and a grid point whose keys
# do not fit together.
#
#   errors.sh MOEHOST
set -euo pipefail
MOEHOST=$1
source "$(dirname "$0")/common.sh"

gen_text "$TMP/data.txt" 5000
# bad NAME 'SWEEP TABLE' PATTERN...: the table's first line is line 39 of the file.
bad() {
    local name=$1 table=$2
    shift 2
    write_sweep "$TMP/$name.toml" "$TMP/runs" "$TMP/data.txt" "$table"
    mh_fail "$name" "$@" -- --config "$TMP/$name.toml"
}
write_sweep "$TMP/probe.toml" "$TMP/runs" "$TMP/data.txt" 'seeds = [1]'
LINE=$(grep -n '^seeds = \[1\]$' "$TMP/probe.toml" | cut -d: -f1)

bad unknown_axis '"moe.capacity_fator" = [1.0, 1.25]' "unknown_axis.toml:$LINE: \[sweep\]" \
    'axis "moe.capacity_fator"' "unknown key 'capacity_fator' in \[moe\]; did you mean 'capacity_factor'\?"
bad unknown_section '"modle.d_model" = [32]' "unknown_section.toml:$LINE:" 'unknown section \[modle\]; did you mean \[model\]'
bad empty_list '"router.plugin" = []' "empty_list.toml:$LINE:" 'axis "router.plugin" is an empty list'
bad unknown_reserved 'seed = [1, 2]' "unknown_reserved.toml:$LINE:" "unknown key 'seed' in \[sweep\]; did you mean 'seeds'\?"
bad unknown_reserved2 'workers = 2' "unknown_reserved2.toml:$LINE:" "unknown key 'workers' in \[sweep\]" \
    'seeds, name, parallel, csv'
bad not_a_list '"moe.capacity_factor" = 1.25' "not_a_list.toml:$LINE:" \
    'axis "moe.capacity_factor" = 1.25 is not a list' '"moe.capacity_factor" = \[1.25\]'
bad wrong_type '"moe.top_k" = [1, "two"]' "wrong_type.toml:$LINE:" 'axis "moe.top_k", value 2 \("two"\)' \
    'moe.top_k must be an integer, got a string'
bad out_of_range '"moe.capacity_factor" = [1.0, -1.0]' "out_of_range.toml:$LINE:" 'value 2 \(-1.0\)' 'out of range'
bad bare_dotted 'router.plugin = ["top1"]' "bare_dotted.toml:$LINE:" 'nested table \[sweep.router\]' \
    'write a grid axis as a quoted key'
bad router_option $'"router.plugin" = ["top1", "softk"]\n"router.temperature" = [0.5]' \
    "router_option.toml:$((LINE + 1)):" 'point 1/2 "top1-temperature0.5-s7"' "router 'top1': unknown option 'temperature'"
bad no_plugin '"router.plugin" = ["softk", "no_such_router"]' "no_plugin.toml:$LINE:" \
    "router plugin 'no_such_router' not found"
bad combination $'"moe.top_k" = [2, 4]\n"moe.num_experts" = [4, 2]' "combination.toml:$((LINE - 1)):" \
    'point 4/4 "tk4-ne2-s7"' 'moe.top_k = 4 exceeds moe.num_experts = 2'
bad seeds_type 'seeds = [1, 2.5]' "seeds_type.toml:$LINE:" 'seeds: item 2 \(2.5\) is not a whole number'
bad csv_value 'csv = "xlsx"' "csv_value.toml:$LINE:" 'csv = "xlsx" is not one of: "standard", "noise"'
bad csv_noise 'csv = "noise"' "csv_noise.toml:$((LINE - 1)):" "router 'softk' has no noise_std option"
bad duplicate '"router.plugin" = ["softk", "top1", "softk"]' "duplicate.toml:$LINE:" 'lists "softk" twice'
# The table changed from the command line: the same checks, named by the --set.
mh_fail "--set sweep.seeds not a list" '--set sweep.seeds: seeds = 3 is not a list' \
    -- --config "$TMP/probe.toml" --set sweep.seeds=3
mh_fail "--set of an unknown axis" '--set sweep.moe.top_kk: axis "moe.top_kk", value 1 \(2\)' "did you mean 'top_k'" \
    -- --config "$TMP/probe.toml" --set 'sweep.moe.top_kk=[2]'
mh_fail "--set of an unknown sweep key" "--set sweep.worker: unknown key 'worker' in \[sweep\]" \
    -- --config "$TMP/probe.toml" --set sweep.worker=2
write_config "$TMP/single.toml" single "$TMP/runs" "$TMP/data.txt" softk
mh_fail "--set sweep.x without [sweep]" '--set sweep.seeds: \[sweep\] belongs to sweeps' \
    -- --config "$TMP/single.toml" --set 'sweep.seeds=[1,2]'
check "nothing ran" test ! -e "$TMP/runs"
finish
