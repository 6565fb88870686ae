# Shared helpers of the sweep end-to-end tests, sourced by each tests/sweep/*.sh:
# those of tests/cli/common.sh (mh, mh_fail, check, finish, gen_text,
# write_config) plus the ones below.
SWEEP_DIR_=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$SWEEP_DIR_/../cli/common.sh"
SWEEPCHECK="$SWEEP_DIR_/sweepcheck.py"

# write_sweep FILE OUT_DIR DATA SWEEP_TABLE [ROUTER [ROUTER_OPTIONS]]: write_config's tiny
# model (run.name "base", 30 steps, an evaluation every 5) with SWEEP_TABLE as its [sweep].
write_sweep() {
    write_config "$1" base "$2" "$3" "${5:-softk}" "${6:-}"
    printf '\n[sweep]\n%s\n' "$4" >>"$1"
}

# Lines of the last moehost stdout that match a regex.
count_lines() { grep -cE -- "$1" "$OUT_TXT" || true; }
