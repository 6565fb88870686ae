#!/usr/bin/env bash
# Bad inputs to `moehost` training (config, overrides, data, options,
# commands): each must end with exit code 1 (an error, never a crash) and a
# "moehost: error:" message on stderr with the words that let a user fix it.
#
#   errors.sh MOEHOST
set -euo pipefail
MOEHOST=$1
source "$(dirname "$0")/common.sh"

gen_text "$TMP/data.txt" 20000
write_config "$TMP/ok.toml" ok "$TMP/runs" "$TMP/data.txt" softk
cd "$TMP"
Q=(--quiet)

# ---- the config file ----
# Malformed TOML: an unterminated string on line 3.
printf '[run]\nname = "x"\nout_dir = "unterminated\n[data]\npath = "data.txt"\n' >bad.toml
mh_fail "malformed TOML" "bad\.toml:3" -- --config bad.toml "${Q[@]}"

printf '[run]\nname = "x"\n\n[data]\npath = "data.txt"\n\n[model]\nd_modle = 32\n' >unknown.toml
mh_fail "unknown key" "unknown\.toml:8" "d_modle" "d_model" -- --config unknown.toml "${Q[@]}"

printf '[data]\npath = "data.txt"\n[nosuchsection]\nx = 1\n' >section.toml
mh_fail "unknown section" "section\.toml:3" "nosuchsection" -- --config section.toml "${Q[@]}"

printf '[data]\npath = "data.txt"\n[train]\nsteps = "many"\n' >type.toml
mh_fail "wrong type" "type\.toml:4" "train\.steps" "integer" -- --config type.toml "${Q[@]}"

printf '[data]\npath = "data.txt"\n[moe]\ncapacity_factor = -1.0\n' >range.toml
mh_fail "value out of range" "range\.toml:4" "capacity_factor" -- --config range.toml "${Q[@]}"

printf '[data]\npath = "data.txt"\n[model]\nnorm = "batchnorm"\n' >choice.toml
mh_fail "value not among the allowed words" "choice\.toml:4" "batchnorm" "layernorm" \
    -- --config choice.toml "${Q[@]}"

mh_fail "missing config file" "nosuch\.toml" "cannot open|no such file|not found" -- --config nosuch.toml "${Q[@]}"
mh_fail "no --config" "no config" -- "${Q[@]}"

# ---- --set overrides ----
mh_fail "--set unknown key" "--set" "train\.stepz|'stepz'" "steps" -- --config ok.toml --set train.stepz=3 "${Q[@]}"
mh_fail "--set unknown section" "--set" "trian" -- --config ok.toml --set trian.steps=3 "${Q[@]}"
mh_fail "--set without =" "section\.key=value" -- --config ok.toml --set train.steps "${Q[@]}"
mh_fail "--set wrong type" "train\.steps" "integer" -- --config ok.toml --set train.steps=lots "${Q[@]}"
mh_fail "unknown argument" "--frobnicate" -- --config ok.toml --frobnicate "${Q[@]}"

# ---- cross-key checks ----
mh_fail "top_k > num_experts" "top_k" "num_experts" -- --config ok.toml --set moe.top_k=5 "${Q[@]}"
mh_fail "d_model not a multiple of n_heads" "n_heads" "d_model" -- --config ok.toml --set model.n_heads=5 "${Q[@]}"

# ---- router options (the plugin refuses, the host names it) ----
mh_fail "unknown router option" "router 'softk'" "bogus" -- --config ok.toml --set router.bogus=1 "${Q[@]}"
mh_fail "router option of the wrong type" "router 'softk'" "temperature" "number" \
    -- --config ok.toml --set router.temperature=hot "${Q[@]}"
mh_fail "router option out of range" "router 'softk'" "temperature" \
    -- --config ok.toml --set router.temperature=-1 "${Q[@]}"
mh_fail "router option not among its choices" "router 'topk_hard'" "weight" "uniform" \
    -- --config ok.toml --set router.plugin=topk_hard --set router.weight=heavy "${Q[@]}"

# ---- data ----
: >empty.txt
mh_fail "empty data file" "empty\.txt" "empty" -- --config ok.toml --set data.path=empty.txt "${Q[@]}"
mh_fail "missing data file" "nosuch\.txt" "does not exist|not found|no such" \
    -- --config ok.toml --set data.path=nosuch.txt "${Q[@]}"
printf 'a short text, far shorter than one window of the model.\n' >short.txt
mh_fail "seq_len longer than the data" "short\.txt" "seq_len" -- --config ok.toml --set data.path=short.txt "${Q[@]}"
mh_fail "seq_len longer than the validation split" "seq_len" \
    -- --config ok.toml --set model.seq_len=4000 "${Q[@]}"
mkdir -p notprepared
mh_fail "a folder that is no prepare output" "notprepared" "prepare" \
    -- --config ok.toml --set data.path=notprepared "${Q[@]}"

# Damaged `moehost prepare` output.
if mh prepare --out prep data.txt; then
    cp -r prep prep_vocab
    echo '{"tokenizer": "char", "vocab": ["a"]}' >prep_vocab/vocab.json
    mh_fail "vocab.json of another prepare" "prep_vocab" "vocab" "re-run .moehost prepare" \
        -- --config ok.toml --set data.path=prep_vocab "${Q[@]}"
    cp -r prep prep_short
    head -c 1000 prep/tokens_000.bin >prep_short/tokens_000.bin
    mh_fail "truncated shard" "prep_short/tokens_000\.bin" "truncated|corrupt" \
        -- --config ok.toml --set data.path=prep_short "${Q[@]}"
    cp -r prep prep_id
    python3 -c 'import sys; d = bytearray(open(sys.argv[1], "rb").read()); d[64] = 250; open(sys.argv[1], "wb").write(d)' \
        prep_id/tokens_000.bin
    mh_fail "token id outside the vocabulary" "prep_id/tokens_000\.bin" "250" "vocab" \
        -- --config ok.toml --set data.path=prep_id "${Q[@]}"
fi

# Damaged or foreign checkpoints.
if mh --config ok.toml --set run.out_dir=ck --set train.steps=4 --set eval.interval=2 "${Q[@]}"; then
    mh_fail "resume with another model" "different model" \
        -- --config ok.toml --set run.out_dir=ck --set train.steps=6 --set model.d_model=16 --resume "${Q[@]}"
    head -c 2000 ck/ok/checkpoint.bin >ck/short.bin && mv ck/short.bin ck/ok/checkpoint.bin
    mh_fail "truncated checkpoint" "checkpoint\.bin" "truncated" \
        -- --config ok.toml --set run.out_dir=ck --set train.steps=6 --resume "${Q[@]}"
    echo "not a checkpoint" >ck/ok/checkpoint.bin
    mh_fail "not a checkpoint" "checkpoint\.bin" "not a moehost checkpoint" \
        -- --config ok.toml --set run.out_dir=ck --set train.steps=6 --resume "${Q[@]}"
fi

# ---- device and commands of other builds ----
if "$MOEHOST" --version | grep -q 'backends: cpu)'; then
    mh_fail "run.device = cuda in a CPU-only build" "cuda" "not available|no CUDA backend" \
        -- --config ok.toml --set run.device=cuda "${Q[@]}"
elif "$MOEHOST" --version | grep -q ' 0 CUDA device'; then
    mh_fail "run.device = cuda without a GPU" "cuda" "not available|no (usable )?CUDA device|no GPU" \
        -- --config ok.toml --set run.device=cuda "${Q[@]}"
else
    echo "note: this moehost has a CUDA backend and a GPU; the run.device = cuda refusal is not tested"
fi
mh_fail "moehost bench without a benchmark" "unknown benchmark" "available: train, capacity" -- bench
mh_fail "unknown command" "frobnicate" "--help" -- frobnicate
mh_fail "--stop-after without a number" "--stop-after" "soon" -- --config ok.toml --stop-after soon "${Q[@]}"

# None of the refused runs may have left a run folder behind.
check "refused runs created no run folder" test ! -e "$TMP/runs"

finish
