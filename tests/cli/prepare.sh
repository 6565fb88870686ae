#!/usr/bin/env bash
# `moehost prepare` and the help:
#   - prepare turns a text (a slice of the TinyStories sample when present,
#     else a generated one) into vocab.json + token shards; training with
#     data.path = that folder gives exactly the metrics of training on the
#     text itself, with one shard or several (--shard-tokens);
#   - `moehost train --config` equals `moehost --config`; a relative
#     data.path in a config file is found beside the file, one given with
#     --set in the working directory;
#   - prepare's bad inputs fail with exit 1 and a message;
#   - --help exits 0 and prints the usage; --version names the router ABI.
#
#   prepare.sh MOEHOST
set -euo pipefail
MOEHOST=$1
source "$(dirname "$0")/common.sh"

if [ -n "${MOE_TEST_DATA:-}" ] && [ -f "$MOE_TEST_DATA" ]; then
    # The first 60000 characters (whole UTF-8 sequences) of the sample.
    python3 -c 'import sys; open(sys.argv[2], "w", encoding="utf-8", newline="").write(open(sys.argv[1], encoding="utf-8", newline="").read(60000))' \
        "$MOE_TEST_DATA" "$TMP/text.txt"
    echo "data: first 60000 characters of $MOE_TEST_DATA"
else
    gen_text "$TMP/text.txt" 60000
    echo "data: generated (MOE_TEST_DATA not found)"
fi
cd "$TMP"

if mh prepare --out "$TMP/prep" "$TMP/text.txt"; then
    check "prepare reports what it did" grep -q "prepared 1 file" "$ERR_TXT"
    check "vocab.json written" test -s prep/vocab.json
    check "one shard written" test -s prep/tokens_000.bin
    check "vocab.json lists the distinct characters of the text" python3 - prep/vocab.json text.txt <<'EOF'
import json, sys
v = json.load(open(sys.argv[1], encoding="utf-8"))
text = open(sys.argv[2], encoding="utf-8", newline="").read()
ok = v.get("tokenizer") == "char" and v.get("vocab") == sorted(set(text))
if not ok:
    print("vocab.json: tokenizer %r, %d entries; the text has %d distinct characters"
          % (v.get("tokenizer"), len(v.get("vocab", [])), len(set(text))), file=sys.stderr)
sys.exit(0 if ok else 1)
EOF
fi
if mh prepare --out "$TMP/prep3" --shard-tokens 20000 "$TMP/text.txt"; then
    check "--shard-tokens 20000 splits into 3 shards" test -s prep3/tokens_002.bin -a ! -e prep3/tokens_003.bin
fi

write_config run.toml raw "$TMP/runs" "$TMP/text.txt" softk
SETS=(--set train.steps=10 --quiet)
mh --config run.toml "${SETS[@]}" || true
if mh --config run.toml --set data.path=prep --set run.name=prep "${SETS[@]}"; then
    check "training on the prepared folder equals training on the text" \
        python3 "$MOECHECK" compare runs/raw/metrics.jsonl runs/prep/metrics.jsonl
fi
if mh --config run.toml --set data.path=prep3 --set run.name=prep3 "${SETS[@]}"; then
    check "training on 3 shards equals training on the text" \
        python3 "$MOECHECK" compare runs/raw/metrics.jsonl runs/prep3/metrics.jsonl
fi

# The explicit `train` command is the same as the bare form.
if mh train --config run.toml --set run.name=explicit "${SETS[@]}"; then
    check "'moehost train --config' equals 'moehost --config'" \
        python3 "$MOECHECK" compare runs/raw/metrics.jsonl runs/explicit/metrics.jsonl
fi

# Paths: a relative data.path in a config file is resolved against the
# file's folder (and recorded as an absolute path); one given with --set is
# relative to the working directory.
mkdir -p cfgdir elsewhere
cp text.txt cfgdir/beside.txt
write_config cfgdir/rel.toml rel "$TMP/runs" beside.txt softk
pushd elsewhere >/dev/null
if mh --config ../cfgdir/rel.toml "${SETS[@]}"; then
    check "data.path beside the config is recorded absolute" \
        grep -qx "path = \"$TMP/cfgdir/beside.txt\"" "$TMP/runs/rel/config.toml"
    check "data beside the config gives the same run" \
        python3 "$MOECHECK" compare "$TMP/runs/raw/metrics.jsonl" "$TMP/runs/rel/metrics.jsonl"
fi
mh_fail "--set data.path is relative to the working directory" "beside\.txt" "does not exist" \
    -- --config ../cfgdir/rel.toml --set data.path=beside.txt --set run.name=rel2 "${SETS[@]}"
popd >/dev/null

# prepare's bad inputs.
mh_fail "prepare: missing input" "nosuch\.txt" -- prepare --out "$TMP/p2" nosuch.txt
: >empty.txt
mh_fail "prepare: empty input" "empty" -- prepare --out "$TMP/p3" empty.txt
mh_fail "prepare: no --out" "--out" -- prepare text.txt
mh_fail "prepare: no input" "text file" -- prepare --out "$TMP/p4"
mh_fail "prepare: unknown tokenizer" "klingon" "not available" -- prepare --out "$TMP/p5" --tokenizer klingon text.txt

# Help and version.
if mh --help; then
    check "--help prints the usage on stdout" grep -q '^usage:' "$OUT_TXT"
    for w in "--config" "--resume" "prepare" "plugins" "MOE_PLUGIN_PATH"; do
        check "--help mentions $w" grep -q -- "$w" "$OUT_TXT"
    done
fi
if mh --version; then
    check "--version names the router ABI" grep -qE '^moehost .*router ABI 1' "$OUT_TXT"
fi
# No arguments at all: usage on stderr, exit 1.
rc=0
"$MOEHOST" >"$OUT_TXT" 2>"$ERR_TXT" || rc=$?
check "moehost without arguments exits 1 (got $rc)" test "$rc" -eq 1
check "moehost without arguments prints the usage on stderr" grep -q '^usage:' "$ERR_TXT"
finish
