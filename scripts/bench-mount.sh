#!/usr/bin/env bash
# Whole-tree read of a mounted image, side by side (root only):
#  1. rafsnbd mount (FUSE file, file-backed EROFS; the fallback transport
#     of hosts without the nbd module), -B/-D with a warm --cache-dir (every
#     chunk fetched by 'rafsnbd cache fetch --all' first)
#  2. a loop mount of the exported disk (the kernel's own speed: the floor)
#  3. the hand-made chain: rafsnbd serve (its own warm cache, a copy of
#     1's) + nbdfuse + loop + mount
#  4. for reference, 1 without --cache-dir: every chunk decompressed (zstd)
#     from the blob at each read
# Each run drops the page cache first, then times
# `tar -cf - . | cat >/dev/null` in the mount; medians of RUNS runs.
# Targets (issue 13): (1) <= 1.3x (2), and (3)/(1) >= 1.5.
# Environment: SRC (/usr/share), RUNS (5), MB (300: at most this many MB of
# SRC are copied into the tree), RAFSNBD_BIN (a built binary; default: go build).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench-mount.sh: needs root (mounts)"; exit 1; }
SRC=${SRC:-/usr/share}
RUNS=${RUNS:-5}
MB=${MB:-300}
W=$(mktemp -d)
BIN=$W/rafsnbd
PIDS=()
cleanup() {
  set +e
  for m in "$W/m2" "$W/m3"; do mountpoint -q "$m" && umount "$m"; done
  [ -n "${L3:-}" ] && losetup -d "$L3" 2>/dev/null
  mountpoint -q "$W/fuse" && fusermount3 -u "$W/fuse"
  "$BIN" umount --state-dir "$W/state" "$W/m1" 2>/dev/null
  "$BIN" umount --state-dir "$W/state" "$W/m4" 2>/dev/null
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.2
  rm -rf "$W"
}
trap cleanup EXIT

echo "== machine: $(nproc) cores; $(uptime)"
vmstat 1 2 | tail -1 | awk '{print "== idle cpu: " $15 "%"}'
if [ -n "${RAFSNBD_BIN:-}" ]; then cp "$RAFSNBD_BIN" "$BIN"; else go build -o "$BIN" ./cmd/rafsnbd; fi

# The tree: the first MB megabytes of SRC (whole files).
mkdir -p "$W/src" "$W/m1" "$W/m2" "$W/m3" "$W/m4" "$W/fuse"
(cd "$SRC" && find . -type f -printf '%s %p\n' | awk -v lim=$((MB << 20)) '{ s += $1; if (s <= lim) { sub(/^[0-9]+ /, ""); print } }' |
  tar -cf - --no-recursion -T - 2>/dev/null) | tar -xf - -C "$W/src"
echo "== tree: $(du -sh "$W/src" | cut -f1), $(find "$W/src" -type f | wc -l) files"
"$BIN" create --quiet -B "$W/img.boot" -D "$W/blobs" "$W/src" >/dev/null
"$BIN" export --quiet -B "$W/img.boot" -D "$W/blobs" -o "$W/img.disk" >/dev/null
"$BIN" cache fetch --quiet --cache-dir "$W/cache1" -B "$W/img.boot" -D "$W/blobs" --all >/dev/null
cp -a "$W/cache1" "$W/cache3" # a cache directory is locked by the one process using it

# 1. rafsnbd mount, warm cache
"$BIN" mount --state-dir "$W/state" --cache-dir "$W/cache1" -B "$W/img.boot" -D "$W/blobs" --transport fuse "$W/m1"
# 2. loop mount of the disk
mount -t erofs -o loop,ro "$W/img.disk" "$W/m2"
# 3. serve + nbdfuse + loop
"$BIN" serve --quiet --listen "unix:$W/nbd.sock" --cache-dir "$W/cache3" -B "$W/img.boot" -D "$W/blobs" >/dev/null & PIDS+=($!)
for _ in $(seq 100); do [ -S "$W/nbd.sock" ] && break; sleep 0.05; done
nbdfuse -r -P "$W/nbdfuse.pid" "$W/fuse/img" "nbd+unix:///?socket=$W/nbd.sock" & PIDS+=($!)
for _ in $(seq 100); do [ -s "$W/nbdfuse.pid" ] && break; sleep 0.05; done
L3=$(losetup -f --show -r "$W/fuse/img")
mount -t erofs -o ro "$L3" "$W/m3"
# 4. rafsnbd mount, no cache
"$BIN" mount --state-dir "$W/state" -B "$W/img.boot" -D "$W/blobs" --transport fuse "$W/m4"
NAMES="m1 m2 m3 m4"

median() { sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
readtree() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
  local t0 t1
  t0=$(date +%s.%N)
  (cd "$1" && tar -cf - . | cat >/dev/null)
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
}
declare -A T
for name in $NAMES; do T[$name]=""; done
for _ in $(seq "$RUNS"); do
  # Interleaved, so that load from other jobs hits every variant alike.
  for name in $NAMES; do T[$name]+="$(readtree "$W/$name") "; done
done
m1=$(echo "${T[m1]}" | tr ' ' '\n' | grep . | median)
m2=$(echo "${T[m2]}" | tr ' ' '\n' | grep . | median)
m3=$(echo "${T[m3]}" | tr ' ' '\n' | grep . | median)
m4=$(echo "${T[m4]}" | tr ' ' '\n' | grep . | median)
printf '%-36s %8s s   (%s)\n' "rafsnbd mount (FUSE, warm cache)" "$m1" "${T[m1]}"
printf '%-36s %8s s   (%s)\n' "loop mount of the exported disk" "$m2" "${T[m2]}"
printf '%-36s %8s s   (%s)\n' "serve + nbdfuse + loop (warm cache)" "$m3" "${T[m3]}"
printf '%-36s %8s s   (%s)\n' "rafsnbd mount (FUSE, no cache)" "$m4" "${T[m4]}"
echo "rafsnbd mount / loop:            $(echo "scale=2; $m1 / $m2" | bc)x   (target <= 1.3)"
echo "nbdfuse chain / rafsnbd mount:   $(echo "scale=2; $m3 / $m1" | bc)x   (target >= 1.5)"
"$BIN" status --state-dir "$W/state"
