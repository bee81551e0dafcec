#!/usr/bin/env bash
# Export speed against cp --sparse, on the same data in the page cache.
#
# Builds a tarfs image from a ~1 GiB tar of random files (so the export is
# ~1 GiB of data behind the bootstrap), then times, median of $RUNS:
#   cp --sparse=always  of the exported disk (the floor: a plain sparse copy)
#   cp, then sync       the same durability as our export, which fsyncs
#                       before it renames the file into place
#   rafsnbd export --no-fsync  (compose bootstrap + tar, write sparse; the
#                       same durability as cp)
#   rafsnbd export      (the same, then fsync, as cp + sync)
#   rafsnbd export --verity (the same, hashing the dm-verity tree on the way)
# and prints the ratios. Set SIZE_MB to change the data size.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RUNS:=3}" "${SIZE_MB:=1024}"
RAFSNBD=${RAFSNBD:-}
if [ -z "$RAFSNBD" ]; then
  make --no-print-directory build >&2
  RAFSNBD=$PWD/bin/rafsnbd
fi
W=$(mktemp -d /tmp/rafsnbd-bench-export.XXXXXX)
trap 'rm -rf "$W"' EXIT

mkdir -p "$W/src"
for i in $(seq 1 $((SIZE_MB / 16))); do head -c $((16 << 20)) /dev/urandom >"$W/src/f$i"; done
tar -C "$W/src" -cf "$W/layer.tar" .
rm -rf "$W/src"
"$RAFSNBD" --log-level warn create --type tarfs -B "$W/layer.boot" -D "$W/blobs" "$W/layer.tar" >/dev/null
"$RAFSNBD" --log-level warn export -B "$W/layer.boot" -D "$W/blobs" -o "$W/ref.disk" >/dev/null
cat "$W/blobs"/* "$W/ref.disk" >/dev/null # into the page cache

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
timeit() { # timeit CMD...: median wall seconds of $RUNS runs
  for _ in $(seq "$RUNS"); do
    rm -f "$W/out.disk"
    local t0 t1
    t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc
  done | median
}
cp_s=$(timeit cp --sparse=always "$W/ref.disk" "$W/out.disk")
cps_s=$(timeit sh -c "cp --sparse=always '$W/ref.disk' '$W/out.disk' && sync -d '$W/out.disk'")
exn_s=$(timeit "$RAFSNBD" --log-level warn export --no-fsync -B "$W/layer.boot" -D "$W/blobs" -o "$W/out.disk")
cmp "$W/out.disk" "$W/ref.disk"
ex_s=$(timeit "$RAFSNBD" --log-level warn export -B "$W/layer.boot" -D "$W/blobs" -o "$W/out.disk")
cmp "$W/out.disk" "$W/ref.disk"
ev_s=$(timeit "$RAFSNBD" --log-level warn export -B "$W/layer.boot" -D "$W/blobs" -o "$W/out.disk" --verity)
bytes=$(stat -c %s "$W/ref.disk")
printf 'export of a %d MiB tarfs image (median of %d; load %s)\n' $((bytes >> 20)) "$RUNS" "$(cut -d' ' -f1 /proc/loadavg)"
printf '  cp --sparse=always        %6.3f s\n' "$cp_s"
printf '  cp --sparse=always + sync %6.3f s\n' "$cps_s"
printf '  rafsnbd export --no-fsync %6.3f s  (%.2f x cp)\n' "$exn_s" "$(echo "$exn_s / $cp_s" | bc -l)"
printf '  rafsnbd export            %6.3f s  (%.2f x cp, %.2f x cp + sync)\n' "$ex_s" "$(echo "$ex_s / $cp_s" | bc -l)" "$(echo "$ex_s / $cps_s" | bc -l)"
printf '  rafsnbd export --verity   %6.3f s  (%.2f x cp, %.2f x cp + sync)\n' "$ev_s" "$(echo "$ev_s / $cp_s" | bc -l)" "$(echo "$ev_s / $cps_s" | bc -l)"
