#!/usr/bin/env bash
# Times `rafsnbd verity format` against `veritysetup format` (the reference
# and the judge) on random data held in the page cache, for 4 KiB and 512 B
# data blocks, and prints the median wall and CPU time of RUNS runs of each
# and the wall-time speed-up. Load from other processes hurts rafsnbd (which
# uses every core) more than veritysetup (one core): quote figures from a
# quiet machine, with the load the script prints.
# Both write the tree to a separate file; their roots and trees must be
# identical or the script fails.
#
#   scripts/bench-verity.sh            # 1 GiB, 3 runs
#   SIZE_MIB=256 RUNS=5 scripts/bench-verity.sh
#   RAFSNBD=/path/to/rafsnbd scripts/bench-verity.sh   # skip the go build
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB="${SIZE_MIB:-1024}"
RUNS="${RUNS:-3}"
command -v veritysetup >/dev/null || { echo "veritysetup not found (apt-get install cryptsetup-bin)" >&2; exit 1; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/bench-verity.XXXXXX")
trap 'rm -rf "$dir"' EXIT
if [ -n "${RAFSNBD:-}" ]; then
  cp "$RAFSNBD" "$dir/rafsnbd" # a binary built elsewhere
else
  go build -o "$dir/rafsnbd" ./cmd/rafsnbd
fi
head -c "${SIZE_MIB}M" /dev/urandom >"$dir/data"
cat "$dir/data" >/dev/null # into the page cache

# measure CMD...: "wall_ms cpu_ms" of one run (cpu = user + sys, which load
# from other processes disturbs less than wall time); output discarded.
# Bash's time keyword reports milliseconds; /usr/bin/time only 10 ms steps,
# too coarse for runs of 0.4 s.
measure() {
  local TIMEFORMAT='%3R %3U %3S' t
  t=$( { time timeout 300 "$@" >/dev/null 2>&1; } 2>&1) || { echo "failed: $*" >&2; return 1; }
  awk '{printf "%d %d\n", $1 * 1000, ($2 + $3) * 1000}' <<<"$t"
}

median() { sort -n | sed -n "$(((RUNS + 1) / 2))p"; }

root_of() { "$@" 2>/dev/null | awk '/^Root hash:/ {print $3}'; }

echo "data: ${SIZE_MIB} MiB random, page-cached; $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg); median of ${RUNS}"
printf '%-6s      %9s %9s %7s       %9s %9s\n' "block" "vsetup" "rafsnbd" "ratio" "vsetup" "rafsnbd"
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
  vs_wall=() vs_cpu=() our_wall=() our_cpu=()
  for _ in $(seq "$RUNS"); do
    read -r w c < <(measure "${vs[@]}")
    vs_wall+=("$w") vs_cpu+=("$c")
    read -r w c < <(measure "${ours[@]}")
    our_wall+=("$w") our_cpu+=("$c")
  done
  w_vs=$(printf '%s\n' "${vs_wall[@]}" | median)
  w_ours=$(printf '%s\n' "${our_wall[@]}" | median)
  c_vs=$(printf '%s\n' "${vs_cpu[@]}" | median)
  c_ours=$(printf '%s\n' "${our_cpu[@]}" | median)
  printf '%-6s wall %7.3f s %7.3f s %6.2fx   cpu %7.3f s %7.3f s   (wall runs ms: veritysetup %s; rafsnbd %s)\n' "$bs" \
    "$(echo "$w_vs / 1000" | bc -l)" "$(echo "$w_ours / 1000" | bc -l)" "$(echo "$w_vs / $w_ours" | bc -l)" \
    "$(echo "$c_vs / 1000" | bc -l)" "$(echo "$c_ours / 1000" | bc -l)" "${vs_wall[*]}" "${our_wall[*]}"
done
