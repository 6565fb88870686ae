#!/usr/bin/env bash
# Sizes beyond the machine or beyond int: moehost must end with an error
# (exit 1 and a message), never a crash or an allocation that exhausts the
# machine.
#
#   limits.sh MOEHOST
set -euo pipefail
MOEHOST=$1
source "$(dirname "$0")/common.sh"

gen_text "$TMP/data.txt" 20000
write_config "$TMP/ok.toml" ok "$TMP/runs" "$TMP/data.txt" softk
cd "$TMP"
Q=(--quiet)

# Memory is capped (ulimit -v) so that no allocation can succeed by
# overcommit and then exhaust the machine; sanitizer builds reserve a huge
# shadow and cannot run capped, so there the uncapped-safe case runs only.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}allocator_may_return_null=1"
REAL_MOEHOST=$MOEHOST
# Read ldd's whole output first: `ldd | grep -q` under pipefail fails when
# grep exits early and ldd gets SIGPIPE, which made this check flaky.
LIBS=$(ldd "$MOEHOST" 2>/dev/null || true)
if grep -qE 'lib(asan|ubsan)' <<<"$LIBS"; then
    echo "note: sanitizer build; the capped-memory cases (n_layers, batch sizes) are skipped"
else
    printf '#!/bin/bash\nulimit -v 4000000\nexec "%s" "$@"\n' "$REAL_MOEHOST" >capped.sh
    chmod +x capped.sh
    MOEHOST="$TMP/capped.sh"
    mh_fail "model.n_layers = 1e8 (refused by its range)" "n_layers.*out of range" \
        -- --config ok.toml --set model.n_layers=100000000 --set run.out_dir=big "${Q[@]}"
    # In range but far beyond the 4 GB cap: the allocation fails and says so.
    mh_fail "1024 layers of width 8192 (out of memory)" "out of memory" \
        -- --config ok.toml --set model.n_layers=1024 --set model.d_model=8192 --set model.n_heads=8 \
        --set run.out_dir=big "${Q[@]}"
    # batch_size * seq_len = 3.2e9 tokens does not fit an int: refused or out
    # of memory, but with the true count, not one wrapped around through a
    # negative int (1844674407... = 2^64 - something).
    mh_fail "train.batch_size = 1e8 (B * seq_len beyond int)" "batch_size" \
        -- --config ok.toml --set train.batch_size=100000000 --set run.out_dir=big "${Q[@]}"
    check "train.batch_size = 1e8: no wrapped-around count: $(head -c 300 "$ERR_TXT")" \
        bash -c "! grep -q 18446744 '$ERR_TXT'"
    mh_fail "eval.batch_size = 1e8 (B * seq_len beyond int)" "batch_size" \
        -- --config ok.toml --set eval.batch_size=100000000 --set run.out_dir=big "${Q[@]}"
    check "eval.batch_size = 1e8: no wrapped-around count: $(head -c 300 "$ERR_TXT")" \
        bash -c "! grep -q 18446744 '$ERR_TXT'"
fi
# capacity_factor 1e30: C = ceil(CF * T * K / E) exceeds any int; an expert
# never needs more than T slots, so either the run works without drops or
# the value is refused by name.
rc=0
LAST_CMD="moehost --config ok.toml --set moe.capacity_factor=1e30"
"$MOEHOST" --config ok.toml --set moe.capacity_factor=1e30 --set train.steps=2 --set eval.interval=2 \
    --set run.out_dir=big --set run.name=cf "${Q[@]}" >"$OUT_TXT" 2>"$ERR_TXT" || rc=$?
if no_sanitizer_report; then
    if [ "$rc" -eq 0 ]; then
        check "capacity_factor = 1e30 drops nothing" python3 -c '
import json, sys
o = [json.loads(l) for l in open(sys.argv[1])][-1]
sys.exit(0 if o["drop_rate"] == 0 else 1)' big/cf/metrics.jsonl
    elif [ "$rc" -eq 1 ]; then
        check "capacity_factor = 1e30 refused by name: $(head -c 300 "$ERR_TXT")" grep -q 'capacity_factor' "$ERR_TXT"
    else
        fail "capacity_factor = 1e30: exit $rc (a crash): $(head -c 300 "$ERR_TXT")"
    fi
fi
MOEHOST=$REAL_MOEHOST
finish
