#!/usr/bin/env bash
# End-to-end training with one router: moehost trains a tiny model on a
# structured text, writes config.toml, metrics.jsonl (every documented key,
# consistent values), checkpoint.bin and summary.json; the validation loss
# falls clearly; the written config.toml run again (from another folder)
# reproduces every metric bit for bit.
#
#   train.sh MOEHOST ROUTER
set -euo pipefail
MOEHOST=$1
ROUTER=$2
TEST_LABEL=$ROUTER
source "$(dirname "$0")/common.sh"

gen_text "$TMP/data.txt" 40000
write_config "$TMP/run.toml" "r_$ROUTER" "$TMP/runs" "$TMP/data.txt" "$ROUTER"
RUN="$TMP/runs/r_$ROUTER"
METRIC_ARGS=(--router "$ROUTER" --steps 5,10,15,20,25,30 --batch 8 --seq 32 --experts 4 --top-k 2 --layers 2
             --lr 0.01 --warmup 3 --total-steps 30 --min-lr-ratio 0.1)

if mh --config "$TMP/run.toml" --quiet; then
    for f in config.toml metrics.jsonl checkpoint.bin summary.json; do
        check "$RUN/$f written" test -s "$RUN/$f"
    done
    check "--quiet prints nothing on stdout" test ! -s "$OUT_TXT"
    # The resolved config records the choices and an absolute data path.
    check "config.toml names the router" grep -qx "plugin = \"$ROUTER\"" "$RUN/config.toml"
    check "config.toml has steps = 30" grep -qx 'steps = 30' "$RUN/config.toml"
    check "config.toml has the absolute data.path" grep -qx "path = \"$TMP/data.txt\"" "$RUN/config.toml"
    # Every key, consistent values, and the loss falls by more than 0.3 nats
    # between the first evaluation (step 5) and the last (step 30).
    check "metrics.jsonl of $ROUTER" python3 "$MOECHECK" metrics "$RUN" "${METRIC_ARGS[@]}" --loss-drop 0.3
    check "summary.json of $ROUTER" python3 "$MOECHECK" summary "$RUN" --router "$ROUTER"
    check "checkpoint holds step 30" test "$(python3 "$MOECHECK" ckpt-step "$RUN/checkpoint.bin")" = 30

    # The written config.toml reproduces the run in a new folder, run from
    # elsewhere (data.path was recorded as an absolute path).
    mkdir -p "$TMP/elsewhere"
    pushd "$TMP/elsewhere" >/dev/null
    rerun_ok=0
    mh --config "$RUN/config.toml" --set "run.out_dir=$TMP/rerun" --quiet && rerun_ok=1
    popd >/dev/null
    if [ "$rerun_ok" -eq 1 ]; then
        RERUN="$TMP/rerun/r_$ROUTER"
        check "rerun metrics equal the first run's" \
            python3 "$MOECHECK" compare "$RUN/metrics.jsonl" "$RERUN/metrics.jsonl"
        check "rerun config.toml equals the first but for out_dir" \
            python3 "$MOECHECK" config-diff "$RUN/config.toml" "$RERUN/config.toml" out_dir
        check "rerun checkpoint equals the first" \
            python3 "$MOECHECK" ckpt-compare "$RUN/checkpoint.bin" "$RERUN/checkpoint.bin"
    fi
fi
finish
