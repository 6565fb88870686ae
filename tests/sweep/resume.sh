#!/usr/bin/env bash
# A sweep killed midway and started again ends with the results of an
# uninterrupted one. Sweep U runs 2 routers x 2 seeds uninterrupted. Sweep K
# (same config, another out_dir) runs in its own process group; once its
# first run has finished and its second has a checkpoint, the whole group
# gets SIGKILL (the sweep and the run in flight, as a power cut would).
# Started again, K must skip each run that had finished, resume each run
# that had a checkpoint from that checkpoint's step, start the rest, and
# end with summary.csv equal to U's in every column but the timings, and
# metrics.jsonl equal run by run.
#
#   resume.sh MOEHOST
set -euo pipefail
MOEHOST=$1
source "$(dirname "$0")/common.sh"

gen_text "$TMP/data.txt" 30000
write_sweep "$TMP/sweep.toml" "$TMP/runs" "$TMP/data.txt" \
    'name = "exp"
seeds = [1, 2]
"router.plugin" = ["top1", "softk"]'
# 40 steps with an evaluation (and checkpoint) every 4: a run spends most of
# its time after its first checkpoint, where the kill should land.
SETS=(--set train.steps=40 --set eval.interval=4 --set train.warmup_steps=2)
RUNS=(top1-s1 top1-s2 softk-s1 softk-s2)
U="$TMP/U/exp"

mh --config "$TMP/sweep.toml" "${SETS[@]}" --set run.out_dir="$TMP/U" || true
check "the uninterrupted sweep finished" test "$(wc -l <"$U/summary.csv" 2>/dev/null)" = 5

# Sweep K in its own process group (job control puts a background job in
# one, led by the job's process), killed as a whole once its first run has
# finished and its second has a checkpoint. On a loaded machine the second
# run may finish before the kill lands; then the attempt is repeated in a
# fresh folder (at most 3 times), so the restart always has a run to resume.
declare -A WANT
for attempt in 1 2 3; do
    KROOT="$TMP/K$attempt"
    K="$KROOT/exp"
    set -m
    "$MOEHOST" --config "$TMP/sweep.toml" "${SETS[@]}" --set run.out_dir="$KROOT" >"$TMP/k$attempt.out" 2>&1 &
    KPID=$!
    set +m
    waited=0
    until [ -f "$K/${RUNS[0]}/summary.json" ] && [ -f "$K/${RUNS[1]}/checkpoint.bin" ]; do
        if ! kill -0 "$KPID" 2>/dev/null || [ "$waited" -ge 12000 ]; then break; fi
        sleep 0.01
        waited=$((waited + 1))
    done
    kill -KILL -- "-$KPID" 2>/dev/null || true
    wait "$KPID" 2>/dev/null || true
    # What each run left decides what the restart must do with it.
    for r in "${RUNS[@]}"; do
        if [ -f "$K/$r/summary.json" ]; then WANT[$r]="skipped"
        elif [ -f "$K/$r/checkpoint.bin" ]; then
            WANT[$r]="resumed from the checkpoint at step $(python3 "$MOECHECK" ckpt-step "$K/$r/checkpoint.bin")"
        else WANT[$r]="started"
        fi
    done
    echo "attempt $attempt, state after the kill: $(for r in "${RUNS[@]}"; do printf '%s: %s; ' "$r" "${WANT[$r]}"; done)"
    if printf '%s\n' "${WANT[@]}" | grep -q resumed; then break; fi
done
check "sweep K was killed midway (it had not finished)" test ! -e "$K/summary.csv"
check "K's first run had finished" test -f "$K/${RUNS[0]}/summary.json"
check "the kill left a run to resume" test -n "$(printf '%s\n' "${WANT[@]}" | grep resumed || true)"
sleep 0.2
check "no run of K outlived the kill" test -z "$(pgrep -f -- "--config $TMP/sweep.toml" || true)"

if mh --config "$TMP/sweep.toml" "${SETS[@]}" --set run.out_dir="$KROOT"; then
    for r in "${RUNS[@]}"; do
        check "$r: ${WANT[$r]}" grep -qE "^\[[0-9]/4\] $r: ${WANT[$r]}" "$OUT_TXT"
    done
    check "the restart finished every run" grep -qE '^sweep exp: .* 0 failed$' "$OUT_TXT"
    check "summary.csv equals the uninterrupted sweep's (timings excluded)" \
        python3 "$SWEEPCHECK" same-results "$U/summary.csv" "$K/summary.csv"
    for r in "${RUNS[@]}"; do
        check "$r: metrics.jsonl equals the uninterrupted run's" \
            python3 "$MOECHECK" compare "$U/$r/metrics.jsonl" "$K/$r/metrics.jsonl"
    done
    check "summary.md of the restarted sweep" python3 "$SWEEPCHECK" md "$K"
fi

# Two sweeps on one folder at once: the second is refused while the first runs.
set -m
"$MOEHOST" --config "$TMP/sweep.toml" --set train.steps=4000 --set eval.interval=1000 \
    --set run.out_dir="$TMP/L" >"$TMP/l1.out" 2>&1 &
LPID=$!
set +m
waited=0
until [ -f "$TMP/L/exp/.sweep.lock" ] || [ "$waited" -ge 3000 ]; do sleep 0.01; waited=$((waited + 1)); done
sleep 0.1
mh_fail "a second sweep on the same folder" "another sweep \(process $LPID\) is running in" \
    -- --config "$TMP/sweep.toml" --set train.steps=4000 --set eval.interval=1000 --set run.out_dir="$TMP/L"
kill -KILL -- "-$LPID" 2>/dev/null || true
wait "$LPID" 2>/dev/null || true
finish
