#!/usr/bin/env bash
# Image build speed, two ways:
#  1. Go benchmarks on generated data in the page cache (medians of COUNT
#     runs): the tarfs header walk alone (and how many tar bytes it reads),
#     whole tarfs builds (hashing the tar for its id, or with --blob-id), and
#     directory builds per compressor.
#  2. The CLI on a real tree (SRC, default /usr/share) against mkfs.erofs
#     (erofs-utils) as a peer, with hyperfine: dir builds, and tarfs from a
#     tar of the same tree.
# Environment: COUNT (5), BENCHTIME (3x), RAFS_BENCH_TAR_MB (320),
# RAFS_BENCH_DIR_MB (96), SRC (/usr/share), RUNS (5), SKIP_CLI=1.
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-5}
BENCHTIME=${BENCHTIME:-3x}
export RAFS_BENCH_TAR_MB=${RAFS_BENCH_TAR_MB:-320} RAFS_BENCH_DIR_MB=${RAFS_BENCH_DIR_MB:-96}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT

echo "== machine: $(nproc) cores; $(uptime)"
vmstat 1 2 | tail -1 | awk '{print "== idle cpu: " $15 "%"}'

echo "== go benchmarks (tar ${RAFS_BENCH_TAR_MB} MB, dir ${RAFS_BENCH_DIR_MB} MB, $COUNT runs of $BENCHTIME)"
go test -run '^$' -bench 'IndexTar|FromTar|FromDir' -benchtime="$BENCHTIME" -count="$COUNT" ./rafs/build/ | tee "$W/bench.txt"

echo "== medians"
for name in $(awk '/^Benchmark/ {print $1}' "$W/bench.txt" | sort -u); do
  for unit in MB/s read-B/op blob/src; do
    vals=$(awk -v n="$name" -v u="$unit" '$1 == n { for (i = 3; i <= NF; i++) if ($(i+1) == u) print $i }' "$W/bench.txt" | sort -g)
    [ -n "$vals" ] || continue
    med=$(echo "$vals" | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
    printf '%-40s %14s %s\n' "$name" "$med" "$unit"
  done
done

[ "${SKIP_CLI:-}" = 1 ] && exit 0
SRC=${SRC:-/usr/share}
RUNS=${RUNS:-5}
command -v hyperfine >/dev/null || { echo "hyperfine not installed: skipping CLI comparison"; exit 0; }
go build -o "$W/rafsnbd" ./cmd/rafsnbd
cp -a "$SRC" "$W/src"          # a private copy, warm in the page cache
tar -C "$W/src" -cf "$W/src.tar" .
echo "== CLI on $SRC: $(du -sb "$W/src" | cut -f1) bytes, $(find "$W/src" | wc -l) entries; tar $(stat -c %s "$W/src.tar") bytes"
cmds=(
  "$W/rafsnbd create -B $W/o.boot -D $W/blobs --compressor zstd $W/src"
  "$W/rafsnbd create -B $W/o.boot -D $W/blobs --compressor lz4_block $W/src"
  "$W/rafsnbd create -B $W/o.boot -D $W/blobs --compressor none $W/src"
  "$W/rafsnbd create -B $W/o.boot -D $W/blobs $W/src.tar"
)
if command -v mkfs.erofs >/dev/null; then
  cmds+=("mkfs.erofs --quiet $W/o.erofs $W/src" "mkfs.erofs --quiet -zlz4 $W/o.erofs $W/src")
fi
hyperfine --runs "$RUNS" --warmup 1 --prepare "rm -rf $W/blobs $W/o.boot $W/o.erofs" \
  --export-markdown "$W/cli.md" "${cmds[@]}" >/dev/null
sed "s|$W/||g" "$W/cli.md"
