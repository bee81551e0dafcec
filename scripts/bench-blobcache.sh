#!/usr/bin/env bash
# blobcache throughput next to the reference decompressors, on the same data.
#
# Corpus: the first $SIZE_MB MiB of a tar of /usr/lib/x86_64-linux-gnu (shared
# libraries and data: a realistic image layer). Then, each as the median of
# $RUNS runs, in MB/s (10^6 bytes) of uncompressed output:
#   * zstd -d, lz4 -d and gzip -d of the whole corpus compressed as one file
#     (zstd -3, lz4 -1, gzip -6: the tools' defaults);
#   * blobcache cold path (BenchmarkColdRead): a blob of 1 MiB chunks of the
#     same corpus, each compressed on its own (zstd default level, lz4 block,
#     gzip), read once through an empty cache: localfs fetch + decompress +
#     blake3 check + write to the cache file;
#   * blobcache warm path (BenchmarkWarmRead): 128 KiB ReadAt of cached data,
#     one goroutine and all CPUs.
# Bounded: a few seconds per figure; everything lives in a temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-5}
SIZE_MB=${SIZE_MB:-32}
SRC=${SRC:-/usr/lib/x86_64-linux-gnu}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
corpus=$work/corpus
# head closes the pipe early on purpose; tar's SIGPIPE is expected.
(tar -cf - -C "$SRC" . 2>/dev/null || true) | head -c $((SIZE_MB << 20)) >"$corpus"
size=$(stat -c %s "$corpus")
if [ "$size" -lt $((1 << 20)) ]; then
  echo "corpus from $SRC is only $size bytes" >&2
  exit 1
fi

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# tool_mbps FILE CMD...: median MB/s of "CMD < FILE > /dev/null".
tool_mbps() {
  local in=$1
  shift
  for _ in $(seq "$RUNS"); do
    local s e
    s=$(date +%s%N)
    timeout 60 "$@" <"$in" >/dev/null
    e=$(date +%s%N)
    awk -v b="$size" -v ns=$((e - s)) 'BEGIN {printf "%.1f\n", b / (ns / 1e9) / 1e6}'
  done | median
}

zstd -q -3 -c "$corpus" >"$corpus.zst"
lz4 -q -1 -c "$corpus" >"$corpus.lz4"
gzip -6 -c "$corpus" >"$corpus.gz"

echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs (figures are wall-clock medians)"
echo "corpus: $size bytes from $SRC; zstd -3 $(stat -c %s "$corpus.zst"), lz4 -1 $(stat -c %s "$corpus.lz4"), gzip -6 $(stat -c %s "$corpus.gz") bytes"
printf '%-34s %10s\n' "decoder" "MB/s"
printf '%-34s %10s\n' "zstd -d" "$(tool_mbps "$corpus.zst" zstd -q -d -c)"
printf '%-34s %10s\n' "lz4 -d" "$(tool_mbps "$corpus.lz4" lz4 -q -d -c)"
printf '%-34s %10s\n' "gzip -d" "$(tool_mbps "$corpus.gz" gzip -d -c)"

# bench_mbps PATTERN BENCHTIME: "name median-MB/s" per benchmark.
bench_mbps() {
  local out
  out=$(BLOBCACHE_BENCH_CORPUS=$corpus timeout 600 go test -run '^$' -bench "$1" -benchtime "$2" -count "$RUNS" ./blobcache/ |
    awk '/^Benchmark/ {for (i = 1; i <= NF; i++) if ($(i) == "MB/s") print $1, $(i - 1)}')
  for name in $(echo "$out" | awk '{print $1}' | sort -u); do
    echo "$name $(echo "$out" | awk -v n="$name" '$1 == n {print $2}' | median)"
  done
}

{
  bench_mbps 'ColdRead' 3x
  bench_mbps 'WarmRead' 1s
} | while read -r name mbps; do
  printf '%-34s %10s\n' "blobcache ${name#Benchmark}" "$mbps"
done
