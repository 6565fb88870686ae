# Shared helpers of the moehost end-to-end tests; sourced by each tests/cli/*.sh.
#
# Every moehost call goes through `mh` (expects exit 0) or `mh_fail` (expects
# exit 1 and a message), which keep stdout/stderr in $OUT_TXT / $ERR_TXT and
# count a failure, rather than stop, when something is wrong, so one run
# reports every broken case. A test ends with `finish`.

CLI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MOECHECK="$CLI_DIR/moecheck.py"

if ! command -v python3 >/dev/null 2>&1; then
    echo "FATAL: python3 is required by the moehost CLI tests (it parses the JSON results)" >&2
    exit 1
fi

# A user's plugin path must not leak into the tests; tests that need one set it.
unset MOE_PLUGIN_PATH

# Set by tests/cli/CMakeLists.txt.
: "${MOE_CLI_FIXTURE_DIR:?the fixture plugin folder (run this test through ctest)}"
: "${MOE_CLI_PLUGIN_DIR:?the built-in plugin folder (run this test through ctest)}"

# The built-in plugins must be built (they are part of `all`).
for _r in top1 topk_hard softk hash expert_choice noisy_topk; do
    if [ ! -f "$MOE_CLI_PLUGIN_DIR/$_r.so" ]; then
        echo "FATAL: $MOE_CLI_PLUGIN_DIR/$_r.so is missing (build everything first: cmake --build <build dir>)" >&2
        exit 1
    fi
done

N_FAIL=0
N_PASS=0
TMP=$(mktemp -d "${TMPDIR:-/tmp}/moe-cli-test.XXXXXX")
OUT_TXT="$TMP/.stdout"
ERR_TXT="$TMP/.stderr"
# Keep the files of a failed test (or with KEEP_TMP=1) for a look.
trap 'rc=$?; if [ "$rc" -eq 0 ] && [ -z "${KEEP_TMP:-}" ]; then rm -rf "$TMP"; else echo "(files kept in $TMP)" >&2; fi; exit $rc' EXIT
# Say which command stopped a test early (set -e).
trap 'echo "FATAL: $(basename "$0"):$LINENO: \"$BASH_COMMAND\" failed" >&2' ERR

fail() {
    N_FAIL=$((N_FAIL + 1))
    echo "FAIL: $*" >&2
}
pass() { N_PASS=$((N_PASS + 1)); }
check() { # check DESCRIPTION COMMAND...: passes when COMMAND succeeds
    local what=$1
    shift
    if "$@"; then pass; else fail "$what"; fi
}

finish() {
    echo "$(basename "$0") ${TEST_LABEL:-}: $N_PASS passed, $N_FAIL failed"
    if [ "$N_FAIL" -eq 0 ]; then exit 0; else exit 1; fi
}

require_file() {
    if [ ! -f "$1" ]; then
        echo "FATAL: $1 is missing (build everything first: cmake --build <build dir>)" >&2
        exit 1
    fi
}

# Sanitizer reports end with exit code 1 too (UBSan's default), so look for them.
no_sanitizer_report() {
    if grep -qE 'ERROR: (Address|Leak)Sanitizer|runtime error:|SUMMARY: (Address|Undefined|Leak)' "$ERR_TXT"; then
        fail "sanitizer report while running: $LAST_CMD"
        sed -n 1,40p "$ERR_TXT" >&2
        return 1
    fi
    return 0
}

# mh ARGS...: run moehost, expect exit 0.
mh() {
    LAST_CMD="moehost $*"
    local rc=0
    "$MOEHOST" "$@" >"$OUT_TXT" 2>"$ERR_TXT" || rc=$?
    LAST_RC=$rc
    no_sanitizer_report || return 1
    if [ "$rc" -ne 0 ]; then
        fail "'$LAST_CMD' exited $rc, expected 0; stderr:"
        sed -n 1,20p "$ERR_TXT" >&2
        return 1
    fi
    pass
    return 0
}

# mh_fail "case" "word1|word2" ... -- ARGS...: run moehost, expect exit 1 (an
# error, not a crash) and a stderr starting with "moehost: error:" that
# contains every given pattern (extended regex, case-insensitive).
mh_fail() {
    local what=$1
    shift
    local pats=()
    while [ "$1" != "--" ]; do
        pats+=("$1")
        shift
    done
    shift
    LAST_CMD="moehost $*"
    local rc=0
    "$MOEHOST" "$@" >"$OUT_TXT" 2>"$ERR_TXT" || rc=$?
    LAST_RC=$rc
    no_sanitizer_report || return 0
    if [ "$rc" -ne 1 ]; then
        fail "[$what] '$LAST_CMD' exited $rc, expected 1 (>= 128 is a crash); stderr:"
        sed -n 1,20p "$ERR_TXT" >&2
        return 0
    fi
    pass
    if ! grep -q '^moehost: error: ' "$ERR_TXT"; then
        fail "[$what] stderr has no 'moehost: error: ' line: $(head -c 400 "$ERR_TXT")"
    else
        pass
    fi
    local p
    for p in "${pats[@]}"; do
        if grep -qiE -- "$p" "$ERR_TXT"; then
            pass
        else
            fail "[$what] stderr lacks /$p/: $(head -c 600 "$ERR_TXT")"
        fi
    done
    return 0
}

# gen_text FILE [CHARS]: a text with clear structure (random subject-verb-object
# sentences over a small vocabulary), deterministic, ASCII only.
gen_text() {
    python3 - "$1" "${2:-40000}" <<'EOF'
import random, sys
r = random.Random(12345)
subj = ["the cat", "a dog", "the bird", "my friend", "the girl", "a boy"]
verb = ["sees", "likes", "finds", "helps", "follows"]
obj = ["the ball", "a tree", "the house", "a red box", "the sun"]
out, n = [], 0
while n < int(sys.argv[2]):
    s = "%s %s %s.\n" % (r.choice(subj), r.choice(verb), r.choice(obj))
    out.append(s)
    n += len(s)
open(sys.argv[1], "w").write("".join(out))
EOF
}

# write_config FILE NAME OUT_DIR DATA ROUTER [ROUTER_OPTIONS]: a tiny model
# (2 layers, d_model 32, seq_len 32, E 4, K 2, batch 8, 30 steps, eval every
# 5 on 2048 tokens). Callers change other keys with --set.
write_config() {
    local file=$1 name=$2 out=$3 data=$4 router=$5 ropts=${6:-}
    cat >"$file" <<EOF
# moehost CLI test config (tiny: runs in well under a second)
[run]
name = "$name"
out_dir = "$out"
seed = 7
device = "cpu"
threads = 1

[data]
path = "$data"
tokenizer = "char"
val_fraction = 0.1

[model]
d_model = 32
n_layers = 2
n_heads = 2
seq_len = 32

[moe]
num_experts = 4
top_k = 2
capacity_factor = 1.25
d_ff = 32

[router]
plugin = "$router"
$ropts

[train]
steps = 30
batch_size = 8
lr = 1e-2
warmup_steps = 3
min_lr_ratio = 0.1
log_interval = 10

[eval]
interval = 5
max_tokens = 2048
EOF
}
