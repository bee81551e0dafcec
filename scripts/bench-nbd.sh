#!/usr/bin/env bash
# bench-nbd.sh — read throughput and IOPS of `rafsnbd serve` against nbdkit's
# file plugin and go-nbd's server, on the same random file, over unix
# sockets, in one run.
#
#   scripts/bench-nbd.sh            # 1 GiB file, 3 runs, fio 5 s
#   SIZE_MB=256 RUNS=1 FIO_RUNTIME=2 scripts/bench-nbd.sh   # quick look
#
# Measures (median of RUNS, runs interleaved across servers):
#   nbdcopy URI null:      wall time to read the whole export (4 connections)
#   fio nbd randread 4k    IOPS at QD1 and QD32, FIO_RUNTIME seconds each
# Alongside, the server process's CPU time (user+system, from /proc) for each
# measurement: CPU seconds per nbdcopy and CPU microseconds per 4 KiB read,
# which stay meaningful when other jobs load the machine and skew wall times.
# The file is read before every measurement so every server reads from the
# page cache.
# Needs: go, nbdkit, nbdcopy (libnbd-bin), fio, jq. Kills only what it starts.
set -euo pipefail

SIZE_MB=${SIZE_MB:-1024}
RUNS=${RUNS:-3}
FIO_RUNTIME=${FIO_RUNTIME:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

for tool in go nbdkit nbdcopy fio jq; do
	command -v "$tool" >/dev/null || { echo "bench-nbd: $tool not found" >&2; exit 1; }
done

W=$(mktemp -d "${TMPDIR:-/tmp}/bench-nbd.XXXXXX")
PIDS=()
cleanup() {
	for pid in "${PIDS[@]}"; do
		kill "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	rm -rf "$W"
}
trap cleanup EXIT

echo "building into $W"
(cd "$ROOT" && go build -o "$W/rafsnbd" ./cmd/rafsnbd && go build -o "$W/gonbdref" ./nbd/internal/gonbdref)

echo "writing ${SIZE_MB} MiB of random data"
head -c "${SIZE_MB}M" /dev/urandom >"$W/disk.img"
cat "$W/disk.img" >/dev/null # into the page cache

wait_socket() { # path
	for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.05; done
	echo "bench-nbd: $1 did not appear" >&2
	exit 1
}

# Every export is reached by the empty name (the default export).
declare -A PID
"$W/rafsnbd" --log-level warn serve ${RAFSNBD_FLAGS:-} --listen "unix:$W/rafsnbd.sock" --name "" --disk "$W/disk.img" >/dev/null &
PID[rafsnbd]=$!
nbdkit -f -r -U "$W/nbdkit.sock" file "$W/disk.img" &
PID[nbdkit]=$!
"$W/gonbdref" -socket "$W/gonbd.sock" -file "$W/disk.img" &
PID[gonbd]=$!
PIDS+=("${PID[@]}")
SERVERS=(rafsnbd nbdkit gonbd)
for s in "${SERVERS[@]}"; do wait_socket "$W/$s.sock"; done
uri() { echo "nbd+unix:///?socket=$W/$1.sock"; }

# Sanity: each server returns the file's bytes before it is timed.
want=$(stat -c %s "$W/disk.img")
for s in "${SERVERS[@]}"; do
	nbdcopy "$(uri "$s")" - | cmp - "$W/disk.img" || { echo "bench-nbd: $s served wrong bytes" >&2; exit 1; }
done

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

cpu_ticks() { # pid: user+system clock ticks so far
	awk '{print $14 + $15}' "/proc/$1/stat"
}
TICK=$(getconf CLK_TCK)

# fio_run server qd: prints "IOPS CPU-microseconds-per-read"
fio_run() {
	local before after
	before=$(cpu_ticks "${PID[$1]}")
	fio --name=rr --ioengine=nbd --uri="$(uri "$1")" --rw=randread --bs=4k \
		--iodepth="$2" --runtime="$FIO_RUNTIME" --time_based --output-format=json 2>/dev/null |
		sed -n '/^{/,$p' >"$W/fio.json"
	after=$(cpu_ticks "${PID[$1]}")
	jq -r --arg t "$(( after - before ))" --arg hz "$TICK" \
		'.jobs[0].read | "\(.iops) \(($t|tonumber) / ($hz|tonumber) * 1e6 / .total_ios)"' "$W/fio.json"
}

echo "machine idle before the run: $(vmstat 1 2 | tail -1 | awk '{print $15}')% (file ${want} bytes)"
declare -A COPY COPYCPU QD1 QD1CPU QD32 QD32CPU
for run in $(seq "$RUNS"); do
	for s in "${SERVERS[@]}"; do
		# Other jobs on the machine may drop caches; re-warm before each
		# server's turn (a no-op when the file is still cached).
		cat "$W/disk.img" >/dev/null
		c0=$(cpu_ticks "${PID[$s]}")
		start=$(date +%s.%N)
		nbdcopy "$(uri "$s")" null:
		end=$(date +%s.%N)
		c1=$(cpu_ticks "${PID[$s]}")
		COPY[$s]+="$(echo "$end - $start" | bc) "
		COPYCPU[$s]+="$(echo "scale=3; ($c1 - $c0) / $TICK" | bc) "
		cat "$W/disk.img" >/dev/null
		read -r iops cpu < <(fio_run "$s" 1)
		QD1[$s]+="$iops "
		QD1CPU[$s]+="$cpu "
		cat "$W/disk.img" >/dev/null
		read -r iops cpu < <(fio_run "$s" 32)
		QD32[$s]+="$iops "
		QD32CPU[$s]+="$cpu "
	done
	echo "run $run/$RUNS done"
done
echo "machine idle after the run: $(vmstat 1 2 | tail -1 | awk '{print $15}')%"

med() { echo "$1" | tr ' ' '\n' | grep . | median; }
printf '\n%-8s %14s %10s %13s %10s %13s %10s\n' server "nbdcopy null:" "CPU s" "fio QD1 IOPS" "CPU us/IO" "fio QD32 IOPS" "CPU us/IO"
declare -A M1 M2 M3 C1 C2 C3
for s in "${SERVERS[@]}"; do
	M1[$s]=$(med "${COPY[$s]}"); C1[$s]=$(med "${COPYCPU[$s]}")
	M2[$s]=$(med "${QD1[$s]}"); C2[$s]=$(med "${QD1CPU[$s]}")
	M3[$s]=$(med "${QD32[$s]}"); C3[$s]=$(med "${QD32CPU[$s]}")
	printf '%-8s %12.3f s %10.2f %13.0f %10.1f %13.0f %10.1f\n' "$s" "${M1[$s]}" "${C1[$s]}" "${M2[$s]}" "${C2[$s]}" "${M3[$s]}" "${C3[$s]}"
done
echo "(medians of $RUNS runs; nbdcopy wall seconds per run:"
for s in "${SERVERS[@]}"; do echo "  $s: ${COPY[$s]% }"; done
echo ")"
ratio() { echo "scale=3; $1 / $2" | bc; }
for ref in nbdkit gonbd; do
	printf 'rafsnbd/%s: nbdcopy time %s (CPU %s), QD1 IOPS %s, QD32 IOPS %s (CPU/IO %s)\n' "$ref" \
		"$(ratio "${M1[rafsnbd]}" "${M1[$ref]}")" "$(ratio "${C1[rafsnbd]}" "${C1[$ref]}")" \
		"$(ratio "${M2[rafsnbd]}" "${M2[$ref]}")" "$(ratio "${M3[rafsnbd]}" "${M3[$ref]}")" \
		"$(ratio "${C3[rafsnbd]}" "${C3[$ref]}")"
done
echo "goals: nbdcopy time ratio to nbdkit <= 0.9, QD32 IOPS ratio to nbdkit >= 1"
