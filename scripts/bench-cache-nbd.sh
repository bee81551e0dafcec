#!/usr/bin/env bash
# The blob cache's warm path through NBD: the same image served three ways
# on unix sockets, read with nbdcopy (whole export, median of $RUNS) and fio
# (4 KiB random reads at QD32, $FIO_RUNTIME s):
#   disk   rafsnbd serve --disk of the exported flat image (page-cache floor)
#   warm   rafsnbd serve -B --cache-dir, every chunk already cached
#          (after 'rafsnbd cache fetch --all'): reads come from the cache file
#   direct rafsnbd serve -B -D without a cache: zstd chunks decompressed on read
# The image is a directory build of $SIZE_MB MiB of half-compressible data.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SIZE_MB:=512}" "${RUNS:=3}" "${FIO_RUNTIME:=5}"
for tool in nbdcopy fio jq; do command -v "$tool" >/dev/null || { echo "bench-cache-nbd: $tool not found" >&2; exit 1; }; done
make --no-print-directory build >&2
R=$PWD/bin/rafsnbd
W=$(mktemp -d /tmp/rafsnbd-bench-cache.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; rm -rf "$W"; }
trap cleanup EXIT

mkdir -p "$W/src"
for i in $(seq 1 $((SIZE_MB / 8))); do
  { head -c $((4 << 20)) /dev/urandom; head -c $((4 << 20)) < <(yes "rafsnbd cache benchmark line $i"); } >"$W/src/f$i"
done
"$R" --log-level warn create -B "$W/img.boot" -D "$W/blobs" "$W/src" >/dev/null
rm -rf "$W/src"
"$R" --log-level warn export -B "$W/img.boot" -D "$W/blobs" -o "$W/img.disk" >/dev/null
"$R" --log-level warn cache fetch --all -B "$W/img.boot" -D "$W/blobs" --cache-dir "$W/cache" >/dev/null

serve() { # serve NAME ARGS...
  local name=$1; shift
  "$R" --log-level warn serve --listen "unix:$W/$name.sock" --name x "$@" >/dev/null & PIDS+=($!)
  for _ in $(seq 100); do [ -S "$W/$name.sock" ] && return; sleep 0.1; done
  echo "serve $name did not start" >&2; exit 1
}
serve disk --disk "$W/img.disk"
serve warm -B "$W/img.boot" -D "$W/blobs" --cache-dir "$W/cache"
serve direct -B "$W/img.boot" -D "$W/blobs"
uri() { echo "nbd+unix:///x?socket=$W/$1.sock"; }
for m in disk warm direct; do # same bytes from each
  cmp <(nbdcopy "$(uri $m)" -) "$W/img.disk" || { echo "$m export differs from the disk" >&2; exit 1; }
done

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf 'image: %d MiB device (load %s)\n' $(($(stat -c %s "$W/img.disk") >> 20)) "$(cut -d' ' -f1 /proc/loadavg)"
# Runs interleave the modes (disk, warm, direct, disk, ...) so that a load
# change on a shared machine hits every mode alike; medians of $RUNS.
declare -A T I
for _ in $(seq "$RUNS"); do
  for m in disk warm direct; do
    s=$(date +%s.%N); nbdcopy "$(uri $m)" null:; e=$(date +%s.%N)
    T[$m]+="$(echo "$e - $s" | bc) "
    I[$m]+="$(fio --name=rr --ioengine=nbd --uri="$(uri $m)" --rw=randread --bs=4k --iodepth=32 \
      --runtime="$FIO_RUNTIME" --time_based --output-format=json 2>/dev/null | sed -n '/^{/,$p' | jq '.jobs[0].read.iops | floor') "
  done
done
echo "IOPS samples: disk ${I[disk]}/ warm ${I[warm]}/ direct ${I[direct]}" >&2
printf '%-7s %14s %14s %18s\n' mode "nbdcopy s" "QD32 IOPS" "IOPS / disk's"
di=$(tr ' ' '\n' <<<"${I[disk]}" | grep . | median)
for m in disk warm direct; do
  t=$(tr ' ' '\n' <<<"${T[$m]}" | grep . | median)
  i=$(tr ' ' '\n' <<<"${I[$m]}" | grep . | median)
  printf '%-7s %14.3f %14s %18.2f\n' "$m" "$t" "$i" "$(echo "$i / $di" | bc -l)"
done
