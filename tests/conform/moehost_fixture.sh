#!/usr/bin/env bash
# Train a tiny model with router.plugin = a fixture plugin's path.
#
#   moehost_fixture.sh MOEHOST PLUGIN.so pass
#   moehost_fixture.sh MOEHOST PLUGIN.so fail REGEX
#
# pass: moehost exits 0. fail: moehost exits exactly 1 (an error, not a
# crash) and its output matches REGEX (grep -E), the named violation.
set -u
moehost=$1 plugin=$2 outcome=$3 regex=${4:-}
unset MOE_PLUGIN_PATH
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moe-conform-moehost.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

. "$(dirname "${BASH_SOURCE[0]}")/tiny_config.sh"
write_tiny_run "$tmp" "$plugin"

out=$("$moehost" --config "$tmp/tiny.toml" 2>&1)
rc=$?
echo "$out"
echo "(moehost exit status $rc)"
bad=0
if [ "$outcome" = pass ]; then
    [ "$rc" -eq 0 ] || { echo "EXPECTED moehost to train (exit 0), got $rc" >&2; bad=1; }
else
    [ "$rc" -eq 1 ] || { echo "EXPECTED exit status 1 (an error, not a crash or success), got $rc" >&2; bad=1; }
    grep -Eq -- "$regex" <<<"$out" || { echo "EXPECTED a message matching: $regex" >&2; bad=1; }
fi
if grep -Eq 'AddressSanitizer|runtime error:|LeakSanitizer' <<<"$out"; then
    echo "EXPECTED no sanitizer report" >&2
    bad=1
fi
exit $bad
