#!/usr/bin/env bash
# Kernel-level profile of training steps at the expC settings, on a machine
# with a CUDA device and Nsight Compute, from the repository root:
#
#   scripts/gpu_profile.sh [STAGE] [OUT] [ROUTER...]
#
# For each router it runs `moehost bench train` under ncu (clocks left
# alone) twice, with 1 warm-up step and then 1 or 2 timed steps; the kernels
# the second run has beyond the first are one training step. It prints them
# grouped by name with their total duration. Medians of many steps come from `bench train`, not from here:
# ncu serialises kernels, so launch gaps are absent from these numbers.
set -uo pipefail
stage=${1:-gpu-stage}
out=${2:-${OUT:-/tmp/moe-gpu-profile}}
shift 2 || true
routers=("$@")
[ ${#routers[@]} -gt 0 ] || routers=(softk)
mkdir -p "$out"
stage=$(cd "$stage" && pwd)
export MOE_PLUGIN_PATH="$stage/lib/moe/plugins"
export LD_LIBRARY_PATH="$stage/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
. "$(dirname "$0")/expc_single.sh"
cfg="$out/expC_profile.toml"
write_expc_config "$cfg" "$out/runs"
for r in "${routers[@]}"; do
  # Two runs with 1 and 2 timed steps: the second run's extra kernels are
  # exactly one training step.
  for n in 1 2; do
    "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
      "$stage/bin/moehost" bench train --config "$cfg" --set run.device=cuda \
      --set router.plugin="$r" --warmup 1 --steps "$n" >"$out/ncu_${r}_$n.csv" 2>"$out/ncu_${r}_$n.err"
  done
  python3 - "$out/ncu_${r}_1.csv" "$out/ncu_${r}_2.csv" "$r" <<'EOF_PY'
import csv, sys, collections
def load(path):
    rows = []
    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") == "gpu__time_duration.sum":
            rows.append((row["Kernel Name"], float(row["Metric Value"].replace(",", ""))))
    return rows
a, b, router = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
# a = [start-up, warm-up, step, tail], b = [start-up, warm-up, step, step, tail]:
# the two agree up to the end of b's first timed step, then b's second step
# follows (the tail begins with the measured-GEMM or collect kernels, not a
# step's first kernel).
extra = len(b) - len(a)
prefix = 0
while prefix < min(len(a), len(b)) and a[prefix][0] == b[prefix][0]:
    prefix += 1
step = b[prefix: prefix + extra] if extra > 0 else []
agg = collections.OrderedDict()
for n, t in step:
    key = n.split("(")[0][:72]
    c, s = agg.get(key, (0, 0.0))
    agg[key] = (c + 1, s + t)
total = sum(t for _, t in step)
with open(sys.argv[1].rsplit("/", 1)[0] + f"/step_{router}.txt", "w") as f:
    for n, t in step:
        f.write(f"{t/1e3:9.1f} us  {n[:160]}\n")
print(f"== {router}: {len(step)} kernels in one step, {total/1e6:.3f} ms of kernel time (ncu, serialised) ==")
for k, (c, s) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f"{s/1e3:9.1f} us {100*s/total:5.1f}% {c:4d}x  {k}")
EOF_PY
done
