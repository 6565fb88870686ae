#!/usr/bin/env bash
# Run moe-conform on a plugin and check the outcome.
#
#   expect_conform.sh MOE_CONFORM PLUGIN pass|fail [moe-conform args...] [--expect REGEX ...]
#
# pass: exit status 0, "moe-conform: PASS", no FAIL row.
# fail: exit status exactly 1 (not a crash, not a usage error) and
#       "moe-conform: FAIL"; each REGEX (grep -E) must match a line of the
#       output, e.g. "^forward\.indices +FAIL" names the violated check.
set -u
conform=$1 plugin=$2 outcome=$3
shift 3
args=()
regexes=()
while [ $# -gt 0 ]; do
    if [ "$1" = "--expect" ] && [ $# -ge 2 ]; then
        regexes+=("$2")
        shift 2
    else
        args+=("$1")
        shift
    fi
done

out=$("$conform" "$plugin" "${args[@]}" 2>&1)
rc=$?
echo "$out"
echo "(moe-conform exit status $rc)"

bad=0
case "$outcome" in
pass)
    [ "$rc" -eq 0 ] || { echo "EXPECTED exit status 0, got $rc" >&2; bad=1; }
    grep -q '^moe-conform: PASS$' <<<"$out" || { echo "EXPECTED the verdict 'moe-conform: PASS'" >&2; bad=1; }
    if grep -Eq '^[a-z_.()]+ +FAIL ' <<<"$out"; then echo "EXPECTED no FAIL row" >&2; bad=1; fi
    ;;
fail)
    [ "$rc" -eq 1 ] || { echo "EXPECTED exit status 1 (a failed check), got $rc" >&2; bad=1; }
    grep -q '^moe-conform: FAIL$' <<<"$out" || { echo "EXPECTED the verdict 'moe-conform: FAIL'" >&2; bad=1; }
    ;;
*)
    echo "usage: expect_conform.sh MOE_CONFORM PLUGIN pass|fail [args...] [--expect REGEX ...]" >&2
    exit 2
    ;;
esac
for re in "${regexes[@]+"${regexes[@]}"}"; do
    grep -Eq -- "$re" <<<"$out" || { echo "EXPECTED a line matching: $re" >&2; bad=1; }
done
if grep -Eq 'AddressSanitizer|runtime error:|LeakSanitizer' <<<"$out"; then
    echo "EXPECTED no sanitizer report" >&2
    bad=1
fi
exit $bad
