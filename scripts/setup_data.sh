#!/usr/bin/env bash
# Put the corpora the configs expect under data/ (ignored by git).
#   data/tinystories/tinystories_sample.txt  from ../shared/data when present
# Usage: scripts/setup_data.sh [SHARED_DATA_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${1:-$root/../shared/data}
mkdir -p "$root/data/tinystories"
src="$shared/tinystories/tinystories_sample.txt"
if [ -f "$src" ]; then
  cp "$src" "$root/data/tinystories/tinystories_sample.txt"
  echo "data/tinystories/tinystories_sample.txt <- $src"
else
  echo "setup_data: $src not found; put a UTF-8 text file at data/tinystories/tinystories_sample.txt" >&2
  exit 1
fi
