#!/usr/bin/env bash
# Every shipped config runs on the CPU when shrunk with --set (the way
# docs/experiments.md tells users to): the whole grid of each sweep, one
# seed, a tiny model, two steps. Checks that each config is valid as
# written, that its grid has the size its comment states, and that every
# point finishes.
#
#   configs.sh MOEHOST SOURCE_DIR
set -euo pipefail
MOEHOST=$1
SRC=$2
source "$(dirname "$0")/common.sh"

gen_text "$TMP/data.txt" 20000
shrink=(--set run.device=cpu --set "run.out_dir=$TMP/runs" --set "data.path=$TMP/data.txt"
        --set model.d_model=16 --set model.n_layers=1 --set model.seq_len=16 --set moe.d_ff=16
        --set train.batch_size=2 --set train.steps=2 --set train.warmup_steps=1 --set eval.interval=2
        --set eval.max_tokens=64 --quiet)

# config: expected number of runs with one seed (the grid's size)
declare -A grid=([expA]=6 [expC]=5 [larger_scale]=5 [router_arch]=3 [noise]=6 [subword]=3)
for name in "${!grid[@]}"; do
    cfg="$SRC/configs/$name.toml"
    extra=()
    if [ "$name" = subword ]; then
        if [ ! -f "$SRC/data/gpt2/encoder.json" ]; then
            echo "note: $name skipped: no data/gpt2 (scripts/setup_data.sh --gpt2 fetches it)"
            continue
        fi
        extra=(--set "data.bpe_dir=$SRC/data/gpt2")
    fi
    if mh --config "$cfg" "${shrink[@]}" "${extra[@]}" --set 'sweep.seeds=[1]'; then
        check "$name: ${grid[$name]} runs in summary.csv" python3 - "$TMP/runs/$name/summary.csv" "${grid[$name]}" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
sys.exit(0 if len(rows) == int(sys.argv[2]) else 1)
PY
    fi
done

# quickstart: one run
if mh --config "$SRC/configs/quickstart.toml" "${shrink[@]}"; then
    check "quickstart: summary.json" test -s "$TMP/runs/quickstart/summary.json"
fi

# expB: the microbenchmark, shrunk
if mh --config "$SRC/configs/expB.toml" --set bench.device=\"cpu\" --set "bench.out_dir=\"$TMP/runs\"" \
      --set bench.tokens=64 --set bench.hidden=8 --set bench.iters=1 --set bench.warmup=0 --quiet; then
    check "expB: 54 points" python3 -c '
import sys
sys.exit(0 if sum(1 for _ in open(sys.argv[1])) == 3 * 3 * 6 else 1)' "$TMP/runs/expB/capacity.jsonl"
fi
finish
