#!/usr/bin/env bash
# rafsnbd index (issue 12) against gzip -dc over the same layers: a real
# ~200 MB tar.gz image (layers made of this machine's /usr/bin,
# /usr/libexec and /usr/include, gzip -6) in a local docker-registry.
# Each run indexes a fresh copy of the image (a repository of its own:
# a second index of one image is a no-op) and gunzips the same layer
# files from the registry's storage; the two are interleaved over RUNS
# runs and the medians compared. Issue 12 wants index >= 0.8x gzip -dc.
# Needs docker-registry and skopeo. LAYERS overrides the layer dirs;
# BASE_BIN=path/to/an/older/rafsnbd times it too, interleaved, for a
# before/after comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/registry.sh
RUNS=${RUNS:-3}
LAYERS=${LAYERS:-/usr/bin /usr/libexec /usr/include}
W=$(mktemp -d /tmp/bench-index.XXXXXX)
pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  rm -rf "$W"
}
trap cleanup EXIT

go build -o "$W/rafsnbd" ./cmd/rafsnbd
start_registry registry
# shellcheck disable=SC2086
go run ./scripts/mkoci -push "$REG/bench/idx0:v1" -insecure $LAYERS >/dev/null
for i in $(seq "$RUNS"); do # cross-repository blob mounts: no new bytes stored
  for r in idx base; do
    skopeo copy -q --src-tls-verify=false --dest-tls-verify=false "docker://$REG/bench/idx0:v1" "docker://$REG/bench/$r$i:v1"
  done
done
layers=()
for d in $(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$REG/v2/bench/idx0/manifests/v1" |
  python3 -c 'import json,sys; print(" ".join(l["digest"][7:] for l in json.load(sys.stdin)["layers"]))'); do
  layers+=("$W/registry/docker/registry/v2/blobs/sha256/${d:0:2}/$d/data")
done
du -cb "${layers[@]}" | tail -1 | awk '{printf "image: %d layers, %.1f MB compressed\n", '"${#layers[@]}"', $1/1e6}'

secs() { python3 -c 'import sys,time; print(time.time())'; }
gz=() idx=() base=()
for i in $(seq "$RUNS"); do
  t0=$(secs); for f in "${layers[@]}"; do gzip -dc "$f" >/dev/null; done; t1=$(secs)
  gz+=("$(echo "$t1 - $t0" | bc)")
  t0=$(secs); "$W/rafsnbd" index --insecure --json "$REG/bench/idx$i:v1" >"$W/index$i.json"; t1=$(secs)
  idx+=("$(echo "$t1 - $t0" | bc)")
  line="run $i: gzip -dc ${gz[-1]} s, index ${idx[-1]} s"
  if [ -n "${BASE_BIN:-}" ]; then
    t0=$(secs); "$BASE_BIN" index --insecure --json "$REG/bench/base$i:v1" >/dev/null; t1=$(secs)
    base+=("$(echo "$t1 - $t0" | bc)")
    line="$line, $BASE_BIN index ${base[-1]} s"
  fi
  echo "$line"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mg=$(median "${gz[@]}") mi=$(median "${idx[@]}")
if [ -n "${BASE_BIN:-}" ]; then
  mb=$(median "${base[@]}")
  echo "median $BASE_BIN index $mb s: gzip/index throughput $(echo "scale=2; $mg / $mb" | bc)x"
fi
python3 - "$W/index1.json" "$mg" "$mi" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); g, i = float(sys.argv[2]), float(sys.argv[3])
mb = r["image_bytes"] / 1e6
print("median gzip -dc %.2f s (%.1f MB/s compressed), index %.2f s (%.1f MB/s): index/gzip throughput %.2fx (target >= 0.8)"
      % (g, mb / g, i, mb / i, g / i))
print("artifact %d bytes = %.2f%% of the image" % (r["artifact_bytes"], 100 * r["artifact_bytes"] / r["image_bytes"]))
EOF
