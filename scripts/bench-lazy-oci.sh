#!/usr/bin/env bash
# Lazy OCI (issue 12): an image in a local docker-registry, indexed once;
# then, side by side in one run:
#   - rafsnbd mount --image REF --cache-dir EMPTY (EROFS over the device
#     file its daemon serves through FUSE), read one small file: wall time
#     from starting mount to the file's bytes, and the registry bytes
#     fetched (the daemon's "lazy image closed" log line, counted by its
#     registry client) against the image's compressed size;
#   - skopeo copy + umoci unpack of the same image from the same registry;
#   - cold 4 KiB random reads of the device (empty cache, page cache
#     dropped) against the same reads warm: p50/p99.
# Targets: <= 2% of the compressed bytes fetched, <= 0.1x the pull time.
# Needs root, docker-registry, skopeo, umoci. SIZE_MB (default 200)
# sizes the synthetic 3-layer image (scripts/mkoci -synth-mb); SPAN (e.g.
# 256K, default index's) is index's --span, to compare spans.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/registry.sh
SIZE_MB=${SIZE_MB:-200}
RANDOM_READS=${RANDOM_READS:-200}
W=$(mktemp -d /tmp/bench-lazy-oci.XXXXXX)
pids=()
cleanup() {
  set +e
  for m in "$W"/mnt*; do mountpoint -q "$m" && "$R" umount "$m"; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  rm -rf "$W"
}
trap cleanup EXIT
now() { date +%s.%N; }

go build -o "$W/rafsnbd" ./cmd/rafsnbd
R="$W/rafsnbd"
start_registry registry
REF=$REG/bench/lazy:v1
go run ./scripts/mkoci -synth-mb "$SIZE_MB" -push "$REF" -insecure >/dev/null

t0=$(now)
"$R" index --insecure --json ${SPAN:+--span "$SPAN"} "$REF" >"$W/index.json"
t1=$(now)
image_bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["image_bytes"])' "$W/index.json")
artifact_bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["artifact_bytes"])' "$W/index.json")
printf 'image: %d compressed bytes; index: %.2f s, artifact %d bytes (%.2f%%)\n' "$image_bytes" \
  "$(echo "$t1 - $t0" | bc)" "$artifact_bytes" "$(echo "100 * $artifact_bytes / $image_bytes" | bc -l)"

# rafsnbd mount --image REF (its daemon serves the device over FUSE; EROFS
# mounts the file).
start_lazy() { # cache-dir tag
  mkdir -p "$W/mnt$2"
  "$R" mount --image "$REF" --insecure --cache-dir "$1" "$W/mnt$2"
}
# Sets log (the daemon's) and disk (the device file); outside the timed
# part (python's first start after drop_caches alone takes 0.3 s here).
mount_info() { # tag
  local tag=$1
  "$R" status --json >"$W/status$tag.json"
  log=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["log"])' "$W/status$tag.json")
  disk=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["file"])' "$W/status$tag.json")
}
stop_lazy() { # tag
  "$R" umount "$W/mnt$1"
  cp "$log" "$W/serve$1.log"
}
# The last "lazy image closed" line's field (the daemon logs key=value).
logged() { grep -o " $1=[0-9]*" "$2" | tail -1 | cut -d= -f2; }

# Pick a small file (metadata only: the bootstrap is local) in a warm-up run.
start_lazy "$W/cache0" 0
mount_info 0
small=$(cd "$W/mnt0" && find . -type f -size -16k -size +0 | sort | awk 'NR == 1')
stop_lazy 0
echo "small file: $small"

sync; echo 3 >/proc/sys/vm/drop_caches
t0=$(now)
start_lazy "$W/cache1" 1
sha=$(sha256sum "$W/mnt1/$small" | cut -c1-16)
t1=$(now)
lazy_s=$(echo "$t1 - $t0" | bc)
mount_info 1
stop_lazy 1
fetched=$(logged fetched_bytes "$W/serve1.log")
index_fetched=$(logged index_fetched_bytes "$W/serve1.log")
requests=$(logged requests "$W/serve1.log")

sync; echo 3 >/proc/sys/vm/drop_caches
t0=$(now)
skopeo copy -q --src-tls-verify=false "docker://$REF" "oci:$W/layout:v1"
umoci unpack --image "$W/layout:v1" "$W/bundle" >/dev/null
t1=$(now)
pull_s=$(echo "$t1 - $t0" | bc)
want=$(sha256sum "$W/bundle/rootfs/$small" | cut -c1-16)
[ "$sha" = "$want" ] || { echo "lazy read $sha, umoci's file $want" >&2; exit 1; }

printf 'mount + read %s: %.2f s, %d registry requests, %d bytes fetched = %.2f%% of the image (target <= 2%%)\n' \
  "$small" "$lazy_s" "$requests" "$fetched" "$(echo "100 * $fetched / $image_bytes" | bc -l)"
printf 'first start with the index artifact (%d bytes, then kept in --cache-dir): %d bytes = %.2f%% of the image\n' \
  "$index_fetched" "$((fetched + index_fetched))" "$(echo "100 * ($fetched + $index_fetched) / $image_bytes" | bc -l)"
printf 'skopeo copy + umoci unpack: %.2f s; lazy/pull = %.3f (target <= 0.1)\n' "$pull_s" "$(echo "$lazy_s / $pull_s" | bc -l)"

# Cold vs warm 4 KiB random reads of the device file the daemon serves.
start_lazy "$W/cache2" 2
mount_info 2
cat >"$W/rr.py" <<'EOF'
import os, random, sys, time
path, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
random.seed(seed)
offs = [random.randrange(size // 4096) * 4096 for _ in range(n)]
lat = []
for o in offs:
    t = time.perf_counter(); os.pread(fd, 4096, o); lat.append(time.perf_counter() - t)
lat.sort()
print("p50 %.2f ms  p99 %.2f ms" % (1e3 * lat[len(lat) // 2], 1e3 * lat[min(len(lat) - 1, len(lat) * 99 // 100)]))
EOF
sync; echo 3 >/proc/sys/vm/drop_caches
echo "cold 4 KiB random reads ($RANDOM_READS): $(python3 "$W/rr.py" "$disk" "$RANDOM_READS" 1)"
sync; echo 3 >/proc/sys/vm/drop_caches
echo "warm 4 KiB random reads ($RANDOM_READS): $(python3 "$W/rr.py" "$disk" "$RANDOM_READS" 1)"
stop_lazy 2
cold_req=$(logged requests "$W/serve2.log")
cold_bytes=$(logged fetched_bytes "$W/serve2.log")
echo "cold pass: $cold_req registry requests, $cold_bytes bytes ($((cold_bytes / (cold_req > 0 ? cold_req : 1))) per request)"
