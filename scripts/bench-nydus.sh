#!/usr/bin/env bash
# Issue 14's benchmark, in one run over one generated image (scripts/mkoci
# -synth-mb: three gzip layers, SIZE_MIB MiB of files) in a local
# docker-registry (source) pushed to a second one (destination), each from
# an empty cache:
#
#   convert                 the tarfs conversion into --cache-dir (pushes nothing)
#   convert --format nydus  pull + per-layer RAFS v6 build (zstd chunks,
#                           cross-layer dedup) + merge + push to the destination
#   skopeo copy             the same image copied as it is to the destination
#
# For each: wall-clock seconds; for the two pushes the bytes sent to the
# registry (nydus: request bodies counted by rafsnbd; skopeo: the growth of
# the destination registry's blob storage) and the bytes of the image.
#
#   scripts/bench-nydus.sh            # 300 MiB
#   SIZE_MIB=100 scripts/bench-nydus.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/registry.sh

SIZE_MIB="${SIZE_MIB:-300}"
for c in docker-registry jq curl skopeo; do
  command -v "$c" >/dev/null || { echo "$c not found (scripts/deps.sh installs it)" >&2; exit 1; }
done

W=$(mktemp -d "${TMPDIR:-/tmp}/bench-nydus.XXXXXX")
pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  rm -rf "$W"
}
trap cleanup EXIT

go build -o "$W/rafsnbd" ./cmd/rafsnbd
go build -o "$W/mkoci" ./scripts/mkoci

start_registry src
src_reg=$REG
start_registry dst
dst_reg=$REG
SRC="$src_reg/bench/app:v1"
"$W/mkoci" -synth-mb "$SIZE_MIB" -work "$W" -push "$SRC" -insecure >/dev/null

blobs_du() { du -sb "$W/dst/docker/registry/v2/blobs" 2>/dev/null | cut -f1 || echo 0; }
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.1f}')"; }

printf 'machine: %s CPUs, load %s; image: %s MiB of files in 3 gzip layers\n' "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" "$SIZE_MIB"
src_bytes=$(skopeo inspect --raw --tls-verify=false "docker://$SRC" | jq '[.layers[].size] | add')
echo "source image: $src_bytes bytes of gzip layers"

t0=$(now)
"$W/rafsnbd" --quiet convert --cache-dir "$W/cache-tarfs" --insecure "$SRC" >/dev/null
t1=$(now)
printf '%-24s %7s s  (tarfs into the cache, nothing pushed; cache %s bytes)\n' "convert" "$(secs "$t0" "$t1")" "$(du -sb "$W/cache-tarfs" | cut -f1)"

before=$(blobs_du)
t0=$(now)
"$W/rafsnbd" --quiet convert --format nydus --json --cache-dir "$W/cache-nydus" --insecure "$SRC" "$dst_reg/bench/app:nydus" >"$W/nydus.json"
t1=$(now)
after=$(blobs_du)
read -r pushed blob chunks build push <<<"$(jq -r '[.published.pushed_bytes, .blob_bytes, .chunks, (.build_ns/1e9), (.push_ns/1e9)] | @tsv' "$W/nydus.json")"
printf '%-24s %7s s  (pushed %s bytes, registry grew %s; blobs %s bytes, %s chunks; build %.1f s, push %.1f s)\n' \
  "convert --format nydus" "$(secs "$t0" "$t1")" "$pushed" "$((after - before))" "$blob" "$chunks" "$build" "$push"

before=$(blobs_du)
t0=$(now)
skopeo copy -q --src-tls-verify=false --dest-tls-verify=false "docker://$SRC" "docker://$dst_reg/bench/app-copy:v1" >/dev/null
t1=$(now)
after=$(blobs_du)
printf '%-24s %7s s  (registry grew %s bytes)\n' "skopeo copy" "$(secs "$t0" "$t1")" "$((after - before))"
