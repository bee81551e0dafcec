#!/usr/bin/env bash
# Times `rafsnbd verity format` against `veritysetup format` (the reference
# and the judge) on random data held in the page cache, for 4 KiB and 512 B
# data blocks, and prints the median of RUNS runs of each and the speed-up.
# Both write the tree to a separate file; their roots and trees must be
# identical or the script fails.
#
#   scripts/bench-verity.sh            # 1 GiB, 3 runs
#   SIZE_MIB=256 RUNS=5 scripts/bench-verity.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB="${SIZE_MIB:-1024}"
RUNS="${RUNS:-3}"
command -v veritysetup >/dev/null || { echo "veritysetup not found (apt-get install cryptsetup-bin)" >&2; exit 1; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/bench-verity.XXXXXX")
trap 'rm -rf "$dir"' EXIT
go build -o "$dir/rafsnbd" ./cmd/rafsnbd
head -c "${SIZE_MIB}M" /dev/urandom >"$dir/data"
cat "$dir/data" >/dev/null # into the page cache

# elapsed_ms CMD...: wall time of one run in milliseconds, output discarded.
elapsed_ms() {
  local start end
  start=$(date +%s%N)
  timeout 300 "$@" >/dev/null 2>&1
  end=$(date +%s%N)
  echo $(((end - start) / 1000000))
}

median() { sort -n | sed -n "$(((RUNS + 1) / 2))p"; }

root_of() { "$@" 2>/dev/null | awk '/^Root hash:/ {print $3}'; }

echo "data: ${SIZE_MIB} MiB random, page-cached; $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg); median of ${RUNS}"
printf '%-10s %14s %14s %8s\n' "block" "veritysetup" "rafsnbd" "speed-up"
for bs in 4096 512; do
  vs=(veritysetup format --no-superblock --format=1 --hash=sha256 --data-block-size="$bs"
    --hash-block-size=4096 --salt=- "$dir/data" "$dir/vs.hash")
  ours=("$dir/rafsnbd" verity format --data-block-size "$bs" "$dir/data" "$dir/our.hash")

  # Same answer first: a fast wrong tree is worth nothing.
  rm -f "$dir/vs.hash" "$dir/our.hash"
  r1=$(root_of "${vs[@]}")
  r2=$(root_of "${ours[@]}")
  if [ -z "$r1" ] || [ "$r1" != "$r2" ] || ! cmp -s "$dir/vs.hash" "$dir/our.hash"; then
    echo "block $bs: trees differ (veritysetup root '$r1', rafsnbd root '$r2')" >&2
    exit 1
  fi

  # Interleave the runs so that load from elsewhere hits both alike.
  vs_times=() our_times=()
  for _ in $(seq "$RUNS"); do
    vs_times+=("$(elapsed_ms "${vs[@]}")")
    our_times+=("$(elapsed_ms "${ours[@]}")")
  done
  t_vs=$(printf '%s\n' "${vs_times[@]}" | median)
  t_ours=$(printf '%s\n' "${our_times[@]}" | median)
  printf '%-10s %12.3f s %12.3f s %7.2fx   (runs: veritysetup %s ms; rafsnbd %s ms)\n' "$bs B" \
    "$(echo "$t_vs / 1000" | bc -l)" "$(echo "$t_ours / 1000" | bc -l)" "$(echo "$t_vs / $t_ours" | bc -l)" \
    "${vs_times[*]}" "${our_times[*]}"
done
