#!/usr/bin/env bash
# Lazy OCI (issue 12): an image in a local docker-registry, indexed once;
# then, side by side in one run:
#   - serve --image REF --cache-dir EMPTY, nbdfuse + loop + mount -t erofs,
#     read one small file: wall time from starting serve to the file's
#     bytes, and the registry bytes fetched (serve's "lazy image closed"
#     log line, counted by its registry client) against the image's
#     compressed size;
#   - skopeo copy + umoci unpack of the same image from the same registry;
#   - cold 4 KiB random reads of the device (empty cache, page cache
#     dropped) against the same reads warm: p50/p99.
# Targets: <= 2% of the compressed bytes fetched, <= 0.1x the pull time.
# Needs root, docker-registry, nbdfuse, skopeo, umoci. SIZE_MB (default 200)
# sizes the synthetic 3-layer image (scripts/mkoci -synth-mb); SPAN (e.g.
# 256K, default index's) is index's --span, to compare spans.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${SIZE_MB:-200}
RANDOM_READS=${RANDOM_READS:-200}
W=$(mktemp -d /tmp/bench-lazy-oci.XXXXXX)
pids=()
cleanup() {
  set +e
  for m in "$W"/mnt*; do mountpoint -q "$m" && umount "$m"; done
  for l in $(losetup -j "$W/fuse/disk" -O NAME -n 2>/dev/null); do losetup -d "$l"; done
  mountpoint -q "$W/fuse" && fusermount3 -u "$W/fuse"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  rm -rf "$W"
}
trap cleanup EXIT
now() { date +%s.%N; }

go build -o "$W/rafsnbd" ./cmd/rafsnbd
R="$W/rafsnbd"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$W/registry.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $W/registry}}
http: {addr: 127.0.0.1:$port}
EOF
docker-registry serve "$W/registry.yml" >"$W/registry.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
REF=127.0.0.1:$port/bench/lazy:v1
go run ./scripts/mkoci -synth-mb "$SIZE_MB" -push "$REF" -insecure >/dev/null

t0=$(now)
"$R" index --insecure --json ${SPAN:+--span "$SPAN"} "$REF" >"$W/index.json"
t1=$(now)
image_bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["image_bytes"])' "$W/index.json")
artifact_bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["artifact_bytes"])' "$W/index.json")
printf 'image: %d compressed bytes; index: %.2f s, artifact %d bytes (%.2f%%)\n' "$image_bytes" \
  "$(echo "$t1 - $t0" | bc)" "$artifact_bytes" "$(echo "100 * $artifact_bytes / $image_bytes" | bc -l)"

# serve + nbdfuse + loop + mount; prints the mount point.
start_lazy() { # cache-dir tag
  local cache=$1 tag=$2
  mkdir -p "$W/fuse" "$W/mnt$tag"
  "$R" --log-level info --log-json serve --listen "unix:$W/nbd$tag.sock" --image "$REF" --insecure --cache-dir "$cache" \
    >"$W/serve$tag.out" 2>"$W/serve$tag.log" &
  serve_pid=$!
  pids+=($serve_pid)
  for _ in $(seq 6000); do [ -s "$W/serve$tag.out" ] && break; sleep 0.01; done
  uri=$(head -1 "$W/serve$tag.out")
  [ -n "$uri" ] || { echo "serve printed no URI:" >&2; cat "$W/serve$tag.log" >&2; exit 1; }
  nbdfuse -r "$W/fuse/disk" "$uri" &
  pids+=($!)
  for _ in $(seq 600); do [ -e "$W/fuse/disk" ] && break; sleep 0.01; done
  loop=$(losetup -f --show -r "$W/fuse/disk")
  mount -t erofs -o ro "$loop" "$W/mnt$tag"
}
stop_lazy() { # tag
  local tag=$1
  umount "$W/mnt$tag"
  losetup -d "$loop"
  fusermount3 -u "$W/fuse"
  kill -INT "$serve_pid"
  wait "$serve_pid" || true
}

# Pick a small file (metadata only: the bootstrap is local) in a warm-up run.
start_lazy "$W/cache0" 0
small=$(cd "$W/mnt0" && find . -type f -size -16k -size +0 | sort | awk 'NR == 1')
stop_lazy 0
echo "small file: $small"

sync; echo 3 >/proc/sys/vm/drop_caches
t0=$(now)
start_lazy "$W/cache1" 1
sha=$(sha256sum "$W/mnt1/$small" | cut -c1-16)
t1=$(now)
lazy_s=$(echo "$t1 - $t0" | bc)
stop_lazy 1
fetched=$(grep -o '"fetched_bytes":[0-9]*' "$W/serve1.log" | tail -1 | cut -d: -f2)
index_fetched=$(grep -o '"index_fetched_bytes":[0-9]*' "$W/serve1.log" | tail -1 | cut -d: -f2)
requests=$(grep -o '"requests":[0-9]*' "$W/serve1.log" | tail -1 | cut -d: -f2)

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

# Cold vs warm 4 KiB random reads of the device through nbdfuse.
start_lazy "$W/cache2" 2
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
echo "cold 4 KiB random reads ($RANDOM_READS): $(python3 "$W/rr.py" "$W/fuse/disk" "$RANDOM_READS" 1)"
sync; echo 3 >/proc/sys/vm/drop_caches
echo "warm 4 KiB random reads ($RANDOM_READS): $(python3 "$W/rr.py" "$W/fuse/disk" "$RANDOM_READS" 1)"
stop_lazy 2
cold_req=$(grep -o '"requests":[0-9]*' "$W/serve2.log" | tail -1 | cut -d: -f2)
cold_bytes=$(grep -o '"fetched_bytes":[0-9]*' "$W/serve2.log" | tail -1 | cut -d: -f2)
echo "cold pass: $cold_req registry requests, $cold_bytes bytes ($((cold_bytes / (cold_req > 0 ? cold_req : 1))) per request)"
