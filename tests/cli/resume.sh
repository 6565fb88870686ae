#!/usr/bin/env bash
# Resume equals uninterrupted, for one router: run A trains 12 steps with an
# evaluation (and checkpoint) every 4; run B, same config, stops after the
# checkpoint at step 8 (--stop-after 8: no summary.json), then --resume
# finishes it. B's metrics.jsonl must equal A's line by line in every key but
# the timings, and the final checkpoints must be equal byte for byte (but the
# recorded training time). Both runs use 2 threads: the result must not
# depend on thread scheduling either.
#
#   resume.sh MOEHOST ROUTER
set -euo pipefail
MOEHOST=$1
ROUTER=$2
TEST_LABEL=$ROUTER
source "$(dirname "$0")/common.sh"

gen_text "$TMP/data.txt" 30000
write_config "$TMP/run.toml" A "$TMP/runs" "$TMP/data.txt" "$ROUTER"
# The cosine schedule depends on train.steps, so both runs keep steps = 12.
SETS=(--set train.steps=12 --set eval.interval=4 --set run.threads=2 --set train.warmup_steps=2)
A="$TMP/runs/A"
B="$TMP/runs/B"

mh --config "$TMP/run.toml" "${SETS[@]}" --quiet || true
check "A finished (summary.json)" test -f "$A/summary.json"

# B, first leg: interrupted after the evaluation at step 8.
if mh --config "$TMP/run.toml" "${SETS[@]}" --set run.name=B --stop-after 8; then
    check "--stop-after leaves no summary.json" test ! -e "$B/summary.json"
    check "--stop-after says how to continue" grep -q -- '--resume' "$ERR_TXT"
    check "B's checkpoint is at step 8" test "$(python3 "$MOECHECK" ckpt-step "$B/checkpoint.bin")" = 8
    check "B's metrics has the evaluations at steps 4 and 8" \
        test "$(python3 -c 'import json,sys; print([json.loads(l)["step"] for l in open(sys.argv[1])])' \
            "$B/metrics.jsonl")" = "[4, 8]"
fi

# B, second leg: continue to the end.
if mh --config "$TMP/run.toml" "${SETS[@]}" --set run.name=B --resume; then
    check "the resumed run says where it resumes from" grep -q 'resuming .* from step 8' "$ERR_TXT"
    check "B finished (summary.json)" test -f "$B/summary.json"
    check "resumed metrics equal the uninterrupted run's" \
        python3 "$MOECHECK" compare "$A/metrics.jsonl" "$B/metrics.jsonl"
    check "resumed checkpoint equals the uninterrupted run's" \
        python3 "$MOECHECK" ckpt-compare "$A/checkpoint.bin" "$B/checkpoint.bin"
    check "B's summary.json is consistent" python3 "$MOECHECK" summary "$B" --router "$ROUTER"
    check "resumed config.toml equals A's but for the name" \
        python3 "$MOECHECK" config-diff "$A/config.toml" "$B/config.toml" name
fi
finish
