#!/usr/bin/env bash
# `moehost plugins` and the plugin search:
#   - lists the six built-in routers with ABI v1, their file and options;
#   - with MOE_PLUGIN_PATH at the fixture folder it lists cli_fixture too and
#     reports each broken fixture as skipped, with its reason;
#   - a run selects a plugin by name through MOE_PLUGIN_PATH, and that path
#     comes before the built-in folder (a softk.so there wins);
#   - a moehost copied elsewhere falls back to the build's plugin folder.
#
#   plugins.sh MOEHOST
set -euo pipefail
MOEHOST=$1
source "$(dirname "$0")/common.sh"
FIX=$MOE_CLI_FIXTURE_DIR
require_file "$FIX/cli_fixture.so"

# The plugin's line, e.g. "softk          ABI v1  cpu:yes cuda:no  top-K ...".
listed() { grep -qE "^$1 +ABI v1 " "$OUT_TXT"; }
# An option line under that plugin (before the next plugin line).
has_option() {
    python3 - "$OUT_TXT" "$1" "$2" "$3" <<'EOF'
import re, sys
text, plugin, option, typ = open(sys.argv[1]).read().splitlines(), sys.argv[2], sys.argv[3], sys.argv[4]
block, inside = [], False
for line in text:
    if re.match(r"^\S", line):
        inside = re.match(r"^%s +ABI v1 " % re.escape(plugin), line) is not None
    elif inside:
        block.append(line)
sys.exit(0 if any(re.match(r"^ +%s +%s +default " % (option, typ), l) for l in block) else 1)
EOF
}

if mh plugins; then
    for r in top1 topk_hard softk hash expert_choice noisy_topk; do
        check "plugins lists $r with ABI v1" listed "$r"
        check "plugins shows the file of $r" grep -qx "  $MOE_CLI_PLUGIN_DIR/$r.so" "$OUT_TXT"
    done
    check "top1 option gate" has_option top1 gate string
    check "topk_hard option weight" has_option topk_hard weight string
    check "softk option temperature" has_option softk temperature float
    check "softk option normalize" has_option softk normalize string
    check "hash option key" has_option hash key string
    check "expert_choice option max_per_token" has_option expert_choice max_per_token int
    check "noisy_topk option learned" has_option noisy_topk learned bool
    check "noisy_topk option noise_std" has_option noisy_topk noise_std float
    check "nothing skipped among the built-ins" bash -c "! grep -q skipped '$OUT_TXT'"
fi

export MOE_PLUGIN_PATH="$FIX"
if mh plugins; then
    check "plugins lists the fixture from MOE_PLUGIN_PATH" listed cli_fixture
    check "the fixture's options" has_option cli_fixture fail_at_step int
    check "built-ins still listed" listed softk
    check "v2_only skipped with its version" grep -qE "^\(skipped\) .*v2_only\.so.*version 2" "$OUT_TXT"
    check "no_symbol skipped: not a router plugin" grep -qE "^\(skipped\) .*no_symbol\.so.*not a router plugin" "$OUT_TXT"
    check "abi7 skipped with its version" grep -qE "^\(skipped\) .*abi7\.so.*version 7" "$OUT_TXT"
    check "null_table skipped" grep -qE "^\(skipped\) .*null_table\.so" "$OUT_TXT"
fi

# Train with the fixture selected by name.
gen_text "$TMP/data.txt" 20000
write_config "$TMP/fix.toml" byname "$TMP/runs" "$TMP/data.txt" cli_fixture
# 10 steps, evaluations every 4 and at the end: steps 4, 8, 10.
if mh --config "$TMP/fix.toml" --set train.steps=10 --set eval.interval=4 --quiet; then
    check "metrics of the fixture run" python3 "$MOECHECK" metrics "$TMP/runs/byname" --router cli_fixture \
        --k-out 1 --steps 4,8,10 --batch 8 --seq 32 --experts 4 --top-k 2 --layers 2 --lr 0.01 --warmup 3 \
        --total-steps 10 --min-lr-ratio 0.1
    check "summary names cli_fixture" python3 "$MOECHECK" summary "$TMP/runs/byname" --router cli_fixture
    check "the run found it in MOE_PLUGIN_PATH" grep -q "\"router_path\": \"$FIX/cli_fixture.so\"" \
        "$TMP/runs/byname/summary.json"
fi

# MOE_PLUGIN_PATH comes first: a softk.so there is taken over the built-in.
mkdir -p "$TMP/override"
cp "$FIX/cli_fixture.so" "$TMP/override/softk.so"
if MOE_PLUGIN_PATH="$TMP/override" mh --config "$TMP/fix.toml" --set router.plugin=softk --set run.name=over \
    --set train.steps=5 --quiet; then
    check "MOE_PLUGIN_PATH's softk.so was used" \
        python3 "$MOECHECK" summary "$TMP/runs/over" --router cli_fixture --router-file softk
    check "from the MOE_PLUGIN_PATH folder" grep -q "\"router_path\": \"$TMP/override/softk.so\"" \
        "$TMP/runs/over/summary.json"
fi

# A moehost copied elsewhere (no lib/moe/plugins beside it) still finds the
# built-ins in the build's plugin folder, compiled in as the fallback.
mkdir -p "$TMP/lonely/bin"
cp "$MOEHOST" "$TMP/lonely/bin/moehost"
unset MOE_PLUGIN_PATH
MOEHOST="$TMP/lonely/bin/moehost"
if mh plugins; then
    check "a moehost elsewhere lists softk from the build folder" grep -qx "  $MOE_CLI_PLUGIN_DIR/softk.so" "$OUT_TXT"
fi
finish
