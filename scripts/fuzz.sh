#!/usr/bin/env bash
# Runs every fuzz target for $FUZZTIME (default 5m). New crashers and
# interesting inputs are kept under the package's testdata/fuzz.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${FUZZTIME:=5m}"
grep -rl --include='*_test.go' '^func Fuzz' . | while read -r file; do
  dir=$(dirname "$file")
  for target in $(grep -o '^func Fuzz[A-Za-z0-9_]*' "$file" | cut -d' ' -f2); do
    echo "== $dir $target ($FUZZTIME)"
    go test -run='^$' -fuzz="^${target}\$" -fuzztime="$FUZZTIME" "$dir"
  done
done
