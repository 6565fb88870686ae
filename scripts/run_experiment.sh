#!/usr/bin/env bash
# Run every point of a seed experiment, one moehost run each, skipping points
# already finished and resuming interrupted ones.
#   scripts/run_experiment.sh expA|expC [extra moehost args, e.g. --set train.steps=200]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
moehost=${MOEHOST:-$root/build/bin/moehost}
exp=${1:?usage: run_experiment.sh expA|expC [moehost args]}
shift
case "$exp" in
  expA) routers=(top1 topk_hard softk); cfs=(1.0 1.25) ;;
  expC) routers=(top1 topk_hard softk hash expert_choice); cfs=(1.25) ;;
  *) echo "unknown experiment '$exp' (expA or expC)" >&2; exit 2 ;;
esac
out=$(awk -F'"' '/^out_dir/ {print $2}' "$root/configs/$exp.toml")
for r in "${routers[@]}"; do
  for cf in "${cfs[@]}"; do
    name="$exp-$r-cf$cf"
    dir="$root/$out/$name"
    args=(--config "$root/configs/$exp.toml" --set "router.plugin=$r" --set "moe.capacity_factor=$cf"
          --set "run.name=$name" "$@")
    if [ -f "$dir/summary.json" ]; then echo "== $name: done, skipped"; continue; fi
    if [ -f "$dir/checkpoint.bin" ]; then args+=(--resume); echo "== $name: resuming"; else echo "== $name"; fi
    (cd "$root" && "$moehost" "${args[@]}")
  done
done
