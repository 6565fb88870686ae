#!/usr/bin/env bash
# Reports: the routing-noise study's format and `moehost report`.
#   - a csv = "noise" sweep (noisy_topk, learned = false, noise_std x seeds):
#     the study's CSV (columns, mapping from each run's results and config)
#     and its mean +- std table in summary.md;
#   - the figures the sweep drew: PNG signature, size, the scripts and data
#     beside them, the frontier's data against summary.csv;
#   - `moehost report DIR` with a capacity.jsonl: the capacity curves;
#     without gnuplot on PATH, a broken capacity.jsonl, an empty or missing
#     folder: exit 1 with a clear message, never a crash.
#
#   report.sh MOEHOST
set -euo pipefail
MOEHOST=$1
source "$(dirname "$0")/common.sh"

gen_text "$TMP/data.txt" 30000
write_sweep "$TMP/noise.toml" "$TMP/runs" "$TMP/data.txt" \
    'name = "noise"
csv = "noise"
seeds = [1, 2]
"router.noise_std" = [0.0, 0.5]' noisy_topk 'learned = false'
D="$TMP/runs/noise"
F="$D/figures"
if mh --config "$TMP/noise.toml" --set train.steps=8 --set eval.interval=4 --set train.warmup_steps=2; then
    check "4 runs finished" test "$(count_lines ': finished in ')" = 4
    check "summary.csv" python3 "$SWEEPCHECK" csv "$D" --axes router.noise_std --runs ns0.0-s1,ns0.0-s2,ns0.5-s1,ns0.5-s2
    check "the noise study's CSV" python3 "$SWEEPCHECK" noise "$D"
    check "the noise study's CSV lists 0.0 and 0.5" \
        test "$(cut -d, -f2 "$D/moe_routing_noise_experiment_results.csv" | tail -n +2 | sort -u | tr '\n' ' ')" = "0.0 0.5 "
    check "summary.md has the study's table" grep -q '^| noise_std | load_balancing_weight | n | Best Val PPL (mean ± std) |' "$D/summary.md"
    check "the study's table: 2 conditions of 2 seeds" \
        test "$(grep -cE '^\| 0\.[05] \| 0\.01 \| 2 \| [0-9.]+ ± [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|$' "$D/summary.md")" = 2
    check "the per-seed tables" test "$(grep -c '^#### noise_std=' "$D/summary.md")" = 2
    check "summary.md's statistics" python3 "$SWEEPCHECK" md "$D"
    for fig in frontier overlay expert_load; do
        check "$fig.png is a PNG" python3 "$SWEEPCHECK" png "$F/$fig.png"
        check "$fig.gp and $fig.dat are beside it" test -s "$F/$fig.gp" -a -s "$F/$fig.dat"
        check "the sweep reported $fig.png" grep -q "^report: $F/$fig.png" "$OUT_TXT"
    done
    check "frontier.dat against summary.csv" \
        python3 "$SWEEPCHECK" frontier "$D" --labels 'noise_std=0.0=0.0;noise_std=0.5=0.5'
    check "the frontier has a title, axis labels with units and a legend" \
        grep -qE '^set xlabel ".*\(tokens/s\)"' "$F/frontier.gp"
    check "frontier.gp: y label" grep -qE '^set ylabel "validation perplexity' "$F/frontier.gp"
    check "frontier.gp: title and legend" grep -q 'title "noise_std=0.5"' "$F/frontier.gp"
    check "overlay: one line per run" test "$(grep -c '"overlay.dat" index' "$F/overlay.gp")" = 4
    check "expert_load.dat: 4 runs x 4 experts" \
        test "$(grep -v '^#' "$F/expert_load.dat" | awk '{print NF}' | tr '\n' ' ')" = "4 4 4 4 "
fi

# Drawn again by hand with a capacity microbenchmark beside the runs.
python3 - "$D/capacity.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for E in (8, 16):
        for K in (1, 2):
            for cf in (1.0, 1.25, 1.5):
                f.write(json.dumps({"E": E, "K": K, "capacity_factor": cf, "drop_rate": max(0.0, 0.3 - 0.2 * cf),
                                    "tokens_per_s": 1e6 / K - 1e4 * cf}) + "\n")
PY
rm -f "$F"/*.png
if mh report "$D"; then
    check "capacity curves" python3 "$SWEEPCHECK" png "$F/capacity_drop_rate.png" "$F/capacity_tokens_per_s.png"
    check "the other figures again" python3 "$SWEEPCHECK" png "$F/frontier.png" "$F/overlay.png" "$F/expert_load.png"
    check "capacity.dat: 4 (E, K) lines" test "$(grep -c '^# E=' "$F/capacity.dat")" = 4
    check "report names the capacity figures" grep -q "capacity_drop_rate.png (drop rate against CF, 4 (E, K) lines)" "$OUT_TXT"
    check "capacity legend" grep -q 'title "E=16, K=2"' "$F/capacity_tokens_per_s.gp"
fi

# Errors: clear messages, exit 1, no crash.
echo '{"E": 8, "K": 1, "capacity_factor": 1.0}' >>"$D/capacity.jsonl"
mh_fail "capacity.jsonl line without drop_rate" "capacity.jsonl:13: 'drop_rate' is missing" -- report "$D"
rm "$D/capacity.jsonl"
mkdir -p "$TMP/nogp"
LAST_CMD="PATH=$TMP/nogp moehost report $D"
rc=0
PATH="$TMP/nogp" "$MOEHOST" report "$D" >"$OUT_TXT" 2>"$ERR_TXT" || rc=$?
check "without gnuplot: exit 1 (got $rc)" test "$rc" = 1
check "without gnuplot: says so" grep -q '^moehost: error: gnuplot was not found on PATH.*apt-get install gnuplot-nox' "$ERR_TXT"
check "without gnuplot: the scripts are still written" test -s "$F/frontier.gp" -a -s "$F/overlay.dat"
no_sanitizer_report || true
mkdir -p "$TMP/empty"
mh_fail "report of an empty folder" "nothing to plot in '.*empty'" -- report "$TMP/empty"
mh_fail "report of a missing folder" "cannot open '.*missing'" -- report "$TMP/missing"
mh_fail "report without a folder" "usage: moehost report DIR" -- report
finish
