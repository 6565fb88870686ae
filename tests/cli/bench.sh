#!/usr/bin/env bash
# The benchmark commands on the CPU, tiny sizes: what they print is checked
# for consistency (not for speed): the training benchmark's tokens/s and
# TFLOP/s follow from its median and FLOP count, and the capacity grid's drop
# rate falls as the capacity factor grows, reaches 0 once C = T, and its
# strict bandwidth is T (2 + 2K) d 4 bytes over the median time.
#
#   bench.sh MOEHOST
set -euo pipefail
MOEHOST=$1
source "$(dirname "$0")/common.sh"

gen_text "$TMP/data.txt" 20000
write_config "$TMP/ok.toml" bench "$TMP/runs" "$TMP/data.txt" softk
cd "$TMP"

if mh bench train --config ok.toml --warmup 1 --steps 3 --json; then
    check "bench train JSON is consistent" python3 - "$OUT_TXT" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
ms, tok = r["ms_per_step_median"], 8 * 32
ok = r["device"] == "cpu" and r["timed_steps"] == 3 and r["router"] == "softk"
ok &= r["ms_per_step_min"] <= ms <= r["ms_per_step_max"]
ok &= abs(r["tokens_per_s"] - tok / (ms * 1e-3)) <= 1e-3 * r["tokens_per_s"]
ok &= abs(r["achieved_tflops"] - r["train_flops_per_step"] / (ms * 1e-3) / 1e12) <= 1e-3 * r["achieved_tflops"]
ok &= r["measured_gemm_tflops"] > 0 and abs(r["mfu"] - r["achieved_tflops"] / r["measured_gemm_tflops"]) < 1e-6
sys.exit(0 if ok else 1)
PY
fi
# --breakdown: per-op times through the timing decorator, as JSON and as a table.
if mh bench train --config ok.toml --warmup 1 --steps 2 --breakdown --json; then
    check "bench train --breakdown JSON adds up" python3 - "$OUT_TXT" <<'PY'
import json, sys
b = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["breakdown"]
ops = {r["op"]: r for r in b["ops"]}
pct = sum(r["pct"] for r in b["ops"])
ok = b["steps"] == 2 and "gemm" in ops and "attention_fwd" in ops and 0.0 < pct <= 100.0 + 1e-3
ok &= all(r["ms_per_step"] >= 0 and r["calls_per_step"] > 0 for r in b["ops"])
ok &= ops["attention_fwd"]["calls_per_step"] == 2  # one per layer
ok &= abs(b["ops_ms_per_step"] - sum(r["ms_per_step"] for r in b["ops"])) <= 1e-3 * b["ops_ms_per_step"] + 1e-6
ok &= b["ops_ms_per_step"] <= b["ms_per_step_mean"] * (1 + 1e-5)
ms = [r["ms_per_step"] for r in b["ops"]]
ok &= ms == sorted(ms, reverse=True)
sys.exit(0 if ok else 1)
PY
fi
if mh bench train --config ok.toml --warmup 0 --steps 1 --breakdown; then
    check "bench train --breakdown prints the op table" python3 - "$OUT_TXT" <<'PY'
import re, sys
rows = [l.split() for l in open(sys.argv[1]) if re.match(r"^[a-z_]+ +[0-9.]+ +[0-9.]+ +[0-9.]+%$", l.strip())]
names = {r[0] for r in rows}
pct = sum(float(r[3].rstrip("%")) for r in rows)
sys.exit(0 if {"gemm", "attention_fwd"} <= names and pct <= 100.0 + 0.05 * len(rows) else 1)
PY
fi
# CF 2 with E = 4, K = 2 gives C = T: nothing can be dropped.
if mh bench capacity --device cpu --tokens 256 --hidden 16 --experts 4,8 --k 1,2 --cf 0.5,1.0,1.25,4.0 \
      --iters 3 --warmup 1 --out grid.jsonl; then
    check "bench capacity grid is consistent" python3 - grid.jsonl <<'PY'
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ok = len(rows) == 2 * 2 * 4
for r in rows:
    T, K, E, d, cf = r["T"], r["K"], r["E"], r["d"], r["capacity_factor"]
    ok &= r["C"] == min(T, max(1, math.ceil(cf * T * K / E)))
    bw = T * (2 + 2 * K) * d * 4 / (r["ms"] * 1e-3) / 2**30
    ok &= abs(r["bw_GiBps_strict"] - bw) <= 1e-3 * bw
    ok &= 0.0 <= r["drop_rate"] <= 1.0 and (r["C"] < T or r["drop_rate"] == 0.0)
for E in (4, 8):
    for K in (1, 2):
        d = [r["drop_rate"] for r in rows if r["E"] == E and r["K"] == K]
        ok &= all(a >= b for a, b in zip(d, d[1:])) and d[0] > 0.0
sys.exit(0 if ok else 1)
PY
fi
mh_fail "bench capacity with K > E" "exceeds" -- bench capacity --device cpu --tokens 8 --experts 4 --k 8
mh_fail "bench capacity with a router that owns capacity" "top-k router" \
    -- bench capacity --device cpu --tokens 64 --hidden 8 --experts 4 --k 2 --router expert_choice
mh_fail "unknown benchmark" "unknown benchmark" -- bench nonsense

# A [bench] config (experiment B) runs as `moehost --config`, writes its JSON
# lines and the capacity curves, and never overwrites an earlier result.
cat >expB.toml <<'TOML'
[bench]
kind = "capacity"
name = "expB"
out_dir = "bruns"
device = "cpu"
tokens = 128
hidden = 8
experts = [4]
k = [1, 2]
capacity_factors = [0.5, 1.0, 2.0]
iters = 2
warmup = 0
TOML
if mh --config expB.toml --quiet; then
    check "expB wrote 6 points" python3 -c '
import json, sys
rows = [json.loads(l) for l in open("bruns/expB/capacity.jsonl")]
sys.exit(0 if len(rows) == 6 and {r["K"] for r in rows} == {1, 2} else 1)'
    check "expB drew the capacity curves" test -s bruns/expB/figures/capacity_drop_rate.png
fi
mh_fail "rerunning a benchmark config" "already holds" -- --config expB.toml --quiet
mh_fail "--set bench.k with a bad value" "bench.k" -- --config expB.toml --set 'bench.k=[0]' --set bench.name=x
mh_fail "unknown [bench] key" "unknown key bench.nope" -- --config expB.toml --set bench.nope=1
finish
