#!/usr/bin/env bash
# Times `rafsnbd convert` of a generated, realistic multi-layer image pulled
# from a local docker-registry (recipe E: 127.0.0.1, a free port), broken
# down into its phases, and prints the median of RUNS cold conversions
# (each into an empty cache) and of RUNS warm ones (everything reused).
#
# The image (scripts/mkoci -synth-mb): three gzip layers of SIZE_MIB MiB of
# files in all: a base of many small text-like files and half-compressible
# binaries, a layer of medium libraries, an application layer of large,
# mostly incompressible files that also deletes (whiteouts) and replaces
# base files.
#
# Phases, from `convert --json` (per layer, summed over layers):
#   download    time the converter waited for registry bytes
#   decompress  gunzip + writing the tar + sha256 of blob and tar
#   build       indexing the tar into its tarfs bootstrap
#   layers      wall clock of all layers (CONCURRENCY at a time)
#   merge       merging the layer bootstraps into the image bootstrap
#   export      writing the image disk (EXPORT=image, default) with its
#               dm-verity tree (VERITY=1, default)
#   total       wall clock of the command
# Download and decompression overlap (the registry keeps sending while a
# piece is decompressed), so the sum of the phases exceeds the wall clock.
# Load from other processes slows everything: quote figures with the load
# the script prints.
#
#   scripts/bench-convert.sh                 # 300 MiB, 3 runs
#   SIZE_MIB=600 RUNS=5 CONCURRENCY=1 scripts/bench-convert.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/registry.sh

SIZE_MIB="${SIZE_MIB:-300}"
RUNS="${RUNS:-3}"
CONCURRENCY="${CONCURRENCY:-3}"
EXPORT="${EXPORT:-image}"
VERITY="${VERITY:-1}"
for c in docker-registry jq curl; do
  command -v "$c" >/dev/null || { echo "$c not found (scripts/deps.sh installs it)" >&2; exit 1; }
done

W=$(mktemp -d "${TMPDIR:-/tmp}/bench-convert.XXXXXX")
pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  rm -rf "$W"
}
trap cleanup EXIT

go build -o "$W/rafsnbd" ./cmd/rafsnbd
go build -o "$W/mkoci" ./scripts/mkoci

start_registry registry

REF="$REG/bench/synth:v1"
echo "generating a ${SIZE_MIB} MiB 3-layer image and pushing it to $REF"
"$W/mkoci" -synth-mb "$SIZE_MIB" -work "$W" -push "$REF" -insecure >/dev/null
rm -f "$W"/*.tar "$W"/*.tar.gz

flags=(--cache-dir "$W/cache" --insecure --concurrency "$CONCURRENCY" --export "$EXPORT" --json)
[ "$VERITY" = 1 ] && [ "$EXPORT" != none ] && flags+=(--verity)

# run: one conversion; prints "total download decompress build layers merge export" in ms.
run() {
  local start end
  start=$(date +%s%N)
  timeout 600 "$W/rafsnbd" --log-level warn convert "${flags[@]}" "$REF" >"$W/out.json"
  end=$(date +%s%N)
  jq -r --argjson total "$(((end - start) / 1000000))" '
    def ms: . / 1e6 | floor;
    [$total,
     ([.layers[].download_ns] | add | ms), ([.layers[].decompress_ns] | add | ms), ([.layers[].build_ns] | add | ms),
     (.layers_ns | ms), (.merge_ns | ms), ([.exports[]?.took_ns // 0] | add // 0 | ms)] | @tsv' "$W/out.json"
}

median() { sort -n | sed -n "$(((RUNS + 1) / 2))p"; }

printf 'machine: %s CPUs, load %s; concurrency %s, export %s, verity %s; median of %s\n' \
  "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" "$CONCURRENCY" "$EXPORT" "$VERITY" "$RUNS"

: >"$W/cold.tsv"
: >"$W/warm.tsv"
for i in $(seq "$RUNS"); do
  rm -rf "$W/cache"
  sync
  run >>"$W/cold.tsv"
  if [ "$i" = 1 ]; then
    tars=$(jq '[.layers[].tar_size] | add' "$W/out.json")
    blobs=$(jq '[.layers[].size] | add' "$W/out.json")
    awk -v n="$(jq '.layers | length' "$W/out.json")" -v b="$blobs" -v t="$tars" \
      'BEGIN { printf "image: %d layers, %.1f MiB compressed, %.1f MiB of tar\n", n, b / 1048576, t / 1048576 }'
  fi
  run >>"$W/warm.tsv"
done

cols=(total download decompress build layers merge export)
report() {
  local file=$1 label=$2 line="" k
  for k in $(seq 7); do
    line+=$(printf '%11s' "$(cut -f"$k" "$file" | median)")
  done
  printf '%-6s%s\n' "$label" "$line"
}
printf '%-6s' "ms"
printf '%11s' "${cols[@]}"
echo
report "$W/cold.tsv" cold
report "$W/warm.tsv" warm
cold_total=$(cut -f1 "$W/cold.tsv" | median)
awk -v t="$tars" -v ms="$cold_total" 'BEGIN { printf "cold conversion: %.0f MiB of tar in %d ms = %.0f MiB/s\n", t / 1048576, ms, t / 1048576 * 1000 / ms }'
