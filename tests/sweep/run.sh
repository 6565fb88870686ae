#!/usr/bin/env bash
# A sweep end to end: 2 routers x 2 seeds of a tiny model, 2 at a time.
#   - one line per run (started, finished), the runs' folders, names, seeds
#     and overrides; summary.csv equal to each run's summary.json; summary.md's
#     mean, std and 95% interval recomputed from summary.csv; the figures;
#   - started again: every run skipped, summary.csv unchanged;
#   - --stop-after: every run stops at its checkpoint (no summary.json), and
#     the next start resumes them all and ends with the same results;
#   - a run that fails: its line gives the exit status and the run's error,
#     the other runs still run, the sweep exits 1;
#   - --resume and a --set of a swept key are refused before anything runs.
#
#   run.sh MOEHOST
set -euo pipefail
MOEHOST=$1
source "$(dirname "$0")/common.sh"

gen_text "$TMP/data.txt" 30000
write_sweep "$TMP/sweep.toml" "$TMP/runs" "$TMP/data.txt" \
    'name = "tiny"
seeds = [1, 2]
parallel = 2
"router.plugin" = ["top1", "softk"]'
SETS=(--set train.steps=12 --set eval.interval=4 --set train.warmup_steps=2)
D="$TMP/runs/tiny"
RUNS=top1-s1,top1-s2,softk-s1,softk-s2

if mh --config "$TMP/sweep.toml" "${SETS[@]}"; then
    check "4 runs started" test "$(count_lines ': started$')" = 4
    check "4 runs finished" test "$(count_lines ': finished in .* \(val_loss [0-9.]+, val_ppl [0-9.]+\)$')" = 4
    check "the header line" grep -qE '^sweep tiny \(.*sweep.toml\): 4 runs = 2 grid points x 2 seeds, 2 at a time' "$OUT_TXT"
    check "the last line" grep -qE '^sweep tiny: 0 skipped, 4 started, 0 resumed; 4 finished, 0 failed$' "$OUT_TXT"
    for r in ${RUNS//,/ }; do
        check "$r has its results" test -f "$D/$r/summary.json" -a -f "$D/$r/checkpoint.bin" -a -f "$D/$r/train.log"
        check "$r's log starts with its command" grep -q "^== sweep tiny, run .*moehost train --config" "$D/$r/train.log"
        check "$r's config.toml names it" grep -q "^name = \"$r\"$" "$D/$r/config.toml"
        check "$r's out_dir is the experiment folder" grep -q "^out_dir = \"$D\"$" "$D/$r/config.toml"
        check "$r's user overrides" grep -q '^steps = 12$' "$D/$r/config.toml"
    done
    check "top1-s2 ran top1 with seed 2" grep -q '^plugin = "top1"$' "$D/top1-s2/config.toml"
    check "softk-s1 ran softk" grep -q '^plugin = "softk"$' "$D/softk-s1/config.toml"
    check "summary.csv matches the runs' summary.json" python3 "$SWEEPCHECK" csv "$D" --axes router.plugin --runs "$RUNS"
    check "summary.md's statistics" python3 "$SWEEPCHECK" md "$D"
    check "summary.md has 2 grid points with n = 2" test "$(grep -cE '^\| (top1|softk) \| 2 \| [0-9.]+ ± [0-9.e-]+ \[' "$D/summary.md")" = 2
    check "no temporary files left" test -z "$(ls "$D" | grep '\.tmp$' || true)"
    check "no sanitizer report in the runs' logs" \
        test -z "$(grep -lE 'ERROR: (Address|Leak)Sanitizer|runtime error:' "$D"/*/train.log || true)"
    check "the sweep drew the figures" python3 "$SWEEPCHECK" png "$D/figures/frontier.png" "$D/figures/overlay.png" \
        "$D/figures/expert_load.png"
    check "the frontier's data" python3 "$SWEEPCHECK" frontier "$D" --labels 'top1=top1;softk=softk'
    check "the sweep says the capacity curves were skipped" grep -q 'capacity curves skipped: no capacity data' "$OUT_TXT"
fi
cp "$D/summary.csv" "$TMP/summary.first.csv" 2>/dev/null || true

# Started again: nothing to do.
if mh --config "$TMP/sweep.toml" "${SETS[@]}"; then
    check "every run skipped" test "$(count_lines ': skipped \(finished earlier: summary.json\)$')" = 4
    check "nothing started" test "$(count_lines ': (started|resumed)')" = 0
    check "summary.csv unchanged" cmp -s "$TMP/summary.first.csv" "$D/summary.csv"
fi

# The table changed with --set: one router, one seed (that run is done).
if mh --config "$TMP/sweep.toml" "${SETS[@]}" --set 'sweep.router.plugin=["softk"]' --set 'sweep.seeds=[2]'; then
    check "--set sweep.*: a sweep of one run" grep -qE '^sweep tiny \(.*\): 1 run = 1 grid point x 1 seed' "$OUT_TXT"
    check "--set sweep.*: softk-s2, already finished" grep -qE '^\[1/1\] softk-s2: skipped' "$OUT_TXT"
fi

# --stop-after 4 on every run, then a plain start resumes them.
S="$TMP/stopped"
if mh --config "$TMP/sweep.toml" "${SETS[@]}" --set run.out_dir="$S" --stop-after 4; then
    check "4 runs stopped at step 4" test "$(count_lines ': stopped after step 4 \(--stop-after\)')" = 4
    check "no summary.json while stopped" test -z "$(ls "$S"/tiny/*/summary.json 2>/dev/null || true)"
    check "summary.csv without rows" test "$(wc -l <"$S/tiny/summary.csv")" = 1
    check "summary.md lists the unfinished runs" grep -q 'Without results' "$S/tiny/summary.md"
fi
if mh --config "$TMP/sweep.toml" "${SETS[@]}" --set run.out_dir="$S"; then
    check "4 runs resumed from step 4" test "$(count_lines ': resumed from the checkpoint at step 4$')" = 4
    check "resumed results equal the uninterrupted sweep's" \
        python3 "$SWEEPCHECK" same-results "$TMP/summary.first.csv" "$S/tiny/summary.csv"
fi

# A failing run: the data is too short for seq_len 100000 (found only when the run opens it).
write_sweep "$TMP/fail.toml" "$TMP/runs" "$TMP/data.txt" \
    'name = "fails"
"model.seq_len" = [100000, 32]'
"$MOEHOST" --config "$TMP/fail.toml" "${SETS[@]}" >"$OUT_TXT" 2>"$ERR_TXT" && rc=0 || rc=$?
check "a failed run makes the sweep exit 1 (got $rc)" test "$rc" = 1
check "the failure line names the exit status and the error" \
    grep -qE '^\[1/2\] sl100000-s7: failed \(exit status 1\) after .*: moehost: error: .*model.seq_len \+ 1 = 100001 tokens.*; log: .*/sl100000-s7/train.log$' "$OUT_TXT"
check "the other run still ran" grep -qE '^\[2/2\] sl32-s7: finished' "$OUT_TXT"
check "the last line counts the failure" grep -qE '^sweep fails: .* 1 finished, 1 failed$' "$OUT_TXT"
check "summary.csv has the finished run only" test "$(cut -d, -f3 "$TMP/runs/fails/summary.csv" | tail -n +2)" = sl32-s7
check "summary.md shows the failed point with n = 0" grep -qE '^\| 100000 \| 0 \| — ' "$TMP/runs/fails/summary.md"

# Refused before anything runs.
mh_fail "--resume on a sweep" "sweep resumes its interrupted runs by itself" \
    -- --config "$TMP/sweep.toml" "${SETS[@]}" --set run.out_dir="$TMP/refused" --resume
mh_fail "--set of a swept key" "--set router.plugin: \"router.plugin\" is an axis of the sweep" "sweep.toml:[0-9]+" \
    -- --config "$TMP/sweep.toml" "${SETS[@]}" --set run.out_dir="$TMP/refused" --set router.plugin=softk
mh_fail "--set run.seed with seeds" "--set run.seed: the sweep's seeds come from seeds" \
    -- --config "$TMP/sweep.toml" --set run.out_dir="$TMP/refused" --set run.seed=3
check "nothing ran for the refused commands" test ! -e "$TMP/refused"

# `moehost train` on a sweep file: one run of the base config.
if mh train --config "$TMP/sweep.toml" "${SETS[@]}" --quiet; then
    check "train ignores [sweep]: one run named run.name" test -f "$TMP/runs/base/summary.json"
    check "train: the base config's router" grep -q '^plugin = "softk"$' "$TMP/runs/base/config.toml"
fi
finish
