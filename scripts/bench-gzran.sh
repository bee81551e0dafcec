#!/usr/bin/env bash
# Index building (internal/gzran) against gzip -dc over the same ~100 MB of
# realistic tar.gz (300 MB of /usr/bin and /usr/share, gzip -6): five runs
# each. Issue 12 wants index building at >= 0.8x gzip -dc's throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${BENCH_DIR:-/tmp/gzran-bench}
mkdir -p "$dir"
if [ ! -s "$dir/usr.tar.gz" ]; then
  tar -C / -cf - usr/bin usr/share 2>/dev/null | head -c 300000000 | gzip -6 > "$dir/usr.tar.gz.tmp"
  mv "$dir/usr.tar.gz.tmp" "$dir/usr.tar.gz"
fi
ls -l "$dir/usr.tar.gz"
for _ in 1 2 3 4 5; do /usr/bin/time -f "gzip -dc: %e s" gzip -dc "$dir/usr.tar.gz" > /dev/null; done
GZRAN_BENCH="$dir/usr.tar.gz" go test -count=1 -run '^TestThroughput$' -v ./internal/gzran | grep -E 'MB/s|FAIL|ok'
