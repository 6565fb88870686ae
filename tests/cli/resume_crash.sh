#!/usr/bin/env bash
# Resuming after a real failure, and the guards around resuming:
#   - the fixture router fails in training step 10 (after the checkpoint at
#     step 8): moehost exits 1 naming the plugin and its message, leaves the
#     evaluations at 4 and 8 and no summary.json;
#   - a metrics line that outlived its checkpoint (written, then the crash)
#     is dropped on resume and written again;
#   - starting that run again without --resume is refused (mentions
#     --resume) and leaves its files alone;
#   - --resume (with the failure switched off) finishes the run with metrics
#     and checkpoint equal to an uninterrupted run (cosine schedule, same
#     train.steps in both legs);
#   - --stop-after at steps between evaluations, over three legs, equals the
#     uninterrupted run too;
#   - --resume where there is no checkpoint is refused and creates nothing.
#
#   resume_crash.sh MOEHOST
set -euo pipefail
MOEHOST=$1
source "$(dirname "$0")/common.sh"
FIXTURE="$MOE_CLI_FIXTURE_DIR/cli_fixture.so"
require_file "$FIXTURE"

gen_text "$TMP/data.txt" 30000
write_config "$TMP/run.toml" A "$TMP/runs" "$TMP/data.txt" "$FIXTURE"
SETS=(--set train.steps=12 --set eval.interval=4 --set train.warmup_steps=2)
A="$TMP/runs/A"
B="$TMP/runs/B"

mh --config "$TMP/run.toml" "${SETS[@]}" --quiet || true
check "A finished" test -f "$A/summary.json"

# B fails in step 10.
mh_fail "failure in step 10" "router 'cli_fixture'" "injected failure at step 10" \
    -- --config "$TMP/run.toml" "${SETS[@]}" --set run.name=B --set router.fail_at_step=10 --quiet
check "the failed run left no summary.json" test ! -e "$B/summary.json"
check "the failed run's checkpoint is at step 8" \
    test "$(python3 "$MOECHECK" ckpt-step "$B/checkpoint.bin")" = 8
STEPS_B=$(python3 -c 'import json,sys; print([json.loads(l)["step"] for l in open(sys.argv[1])])' "$B/metrics.jsonl" 2>/dev/null || echo none)
check "the failed run's metrics hold steps 4 and 8 (got $STEPS_B)" test "$STEPS_B" = "[4, 8]"

# As if it had died between writing the line of step 12 and its checkpoint.
mkdir -p "$B"
echo '{"step":12,"val_loss":99.0}' >>"$B/metrics.jsonl"
cp "$B/metrics.jsonl" "$TMP/metrics.before"
cp "$B/checkpoint.bin" "$TMP/checkpoint.before" 2>/dev/null || true

# Without --resume the folder's results are not overwritten.
mh_fail "existing results without --resume" "already holds results" "--resume" "$B" \
    -- --config "$TMP/run.toml" "${SETS[@]}" --set run.name=B --quiet
check "refused run left metrics.jsonl alone" cmp -s "$TMP/metrics.before" "$B/metrics.jsonl"
check "refused run left checkpoint.bin alone" cmp -s "$TMP/checkpoint.before" "$B/checkpoint.bin"

# Resume with the failure switched off.
if mh --config "$TMP/run.toml" "${SETS[@]}" --set run.name=B --resume; then
    check "resumed from step 8" grep -q 'resuming .* from step 8' "$ERR_TXT"
    check "resumed metrics equal the uninterrupted run's (stale line dropped)" \
        python3 "$MOECHECK" compare "$A/metrics.jsonl" "$B/metrics.jsonl"
    check "resumed checkpoint equals the uninterrupted run's" \
        python3 "$MOECHECK" ckpt-compare "$A/checkpoint.bin" "$B/checkpoint.bin"
    check "summary.json of the resumed run" python3 "$MOECHECK" summary "$B" --router cli_fixture
fi

# Three legs with --stop-after at steps that are no evaluation step: the run
# ends after the first evaluation at or past it (3 -> 4, 5 -> 8), then the
# last leg finishes; the result equals the uninterrupted run.
E="$TMP/runs/E"
legs_ok=1
mh --config "$TMP/run.toml" "${SETS[@]}" --set run.name=E --stop-after 3 --quiet || legs_ok=0
check "--stop-after 3 stops after the evaluation at 4" \
    test "$(python3 "$MOECHECK" ckpt-step "$E/checkpoint.bin" 2>/dev/null)" = 4
mh --config "$TMP/run.toml" "${SETS[@]}" --set run.name=E --resume --stop-after 5 --quiet || legs_ok=0
check "--resume --stop-after 5 stops after the evaluation at 8" \
    test "$(python3 "$MOECHECK" ckpt-step "$E/checkpoint.bin" 2>/dev/null)" = 8
check "no summary.json while stopped" test ! -e "$E/summary.json"
mh --config "$TMP/run.toml" "${SETS[@]}" --set run.name=E --resume --quiet || legs_ok=0
if [ "$legs_ok" -eq 1 ]; then
    check "three legs equal the uninterrupted run" python3 "$MOECHECK" compare "$A/metrics.jsonl" "$E/metrics.jsonl"
    check "three legs: checkpoint equals the uninterrupted run's" \
        python3 "$MOECHECK" ckpt-compare "$A/checkpoint.bin" "$E/checkpoint.bin"
fi

# --resume without a checkpoint.
mh_fail "--resume without a checkpoint" "nothing to resume|no checkpoint" "runs/C/checkpoint.bin" \
    -- --config "$TMP/run.toml" "${SETS[@]}" --set run.name=C --resume --quiet
check "--resume without a checkpoint creates no run folder" test ! -e "$TMP/runs/C"

# A run folder holding only metrics.jsonl (no checkpoint) is results too.
mkdir -p "$TMP/runs/D"
echo '{"step":4}' >"$TMP/runs/D/metrics.jsonl"
mh_fail "metrics.jsonl without checkpoint, no --resume" "already holds results" "--resume" \
    -- --config "$TMP/run.toml" "${SETS[@]}" --set run.name=D --quiet
finish
