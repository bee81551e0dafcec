#!/usr/bin/env bash
# Runs every command line of README.md's "Using it" block, in the order
# written, and fails if one fails. The example names are mapped to a
# temporary directory (rootfs/ is scripts/example/rootfs, layer.tar its tar,
# layout-dir an OCI layout of it) and registry.example.com to a
# docker-registry on 127.0.0.1 holding that image as app:1.0 and the blobs
# of image.boot. `serve` lines run until a client (nbdinfo) has read the
# export, then get SIGTERM and must exit 0. Needs root for the mount line.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/registry.sh
REPO=$PWD

scripts/deps.sh >/dev/null
make --no-print-directory build >/dev/null
BIN=$REPO/bin/rafsnbd

W=$(mktemp -d /tmp/rafsnbd-readme.XXXXXX)
pids=()
cleanup() {
  set +e
  "$BIN" umount "$W/mnt" >/dev/null 2>&1
  mountpoint -q "$W/mnt" && umount "$W/mnt"
  for p in "${pids[@]}"; do kill "$p" && wait "$p" 2>/dev/null; done
  rm -rf "$W"
}
trap cleanup EXIT

# The registry, on a free port.
start_registry registry

# The example inputs.
cp -a scripts/example/rootfs "$W/rootfs"
tar -C "$W/rootfs" -cf "$W/layer.tar" .
mkdir -p "$W/mnt"
go run ./scripts/mkoci -layout "$W/layout-dir" -tag tag -push "$REG/app:1.0" -insecure "$W/rootfs" >/dev/null

# push_blobs puts every file of blobs/ into the registry's app repository
# as the blob its name says (what --registry REPO reads lazily).
push_blobs() {
  local f id loc
  for f in "$W"/blobs/*; do
    id=$(basename "$f")
    loc=$(curl -fsS -X POST -o /dev/null -D - "http://$REG/v2/app/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
    case "$loc" in http*) ;; *) loc="http://$REG$loc" ;; esac
    case "$loc" in *\?*) loc="$loc&digest=sha256:$id" ;; *) loc="$loc?digest=sha256:$id" ;; esac
    curl -fsS -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$f" "$loc" >/dev/null
  done
}

# serve_line runs a serve command line until nbdinfo has read its export.
serve_line() {
  local out=$W/serve.out err=$W/serve.err pid uri
  : >"$out"
  "$@" >"$out" 2>"$err" &
  pid=$!
  for _ in $(seq 300); do [ -s "$out" ] && break; kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  uri=$(head -n1 "$out")
  if [ -z "$uri" ] || ! nbdinfo --size "$uri" >/dev/null; then
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    echo "   serve printed '$uri'; stderr:"; cat "$err"
    return 1
  fi
  kill -TERM "$pid"
  wait "$pid"
}

# The block: the first ```sh fence after "## Using it".
lines=$(awk '/^## Using it/{s=1} s&&/^```sh/{b=1;next} b&&/^```/{exit} b' README.md)
[ -n "$lines" ] || { echo "readme-test: no sh block under '## Using it' in README.md" >&2; exit 1; }

cd "$W"
pass=0 fail=0
while IFS= read -r line; do
  line=${line%%#*}                                  # comments
  line=$(echo "$line" | sed -e 's/[[:space:]]*$//')
  [ -n "$line" ] || continue
  line=$(echo "$line" | sed -e "s|registry\.example\.com|$REG|g" -e "s|/var/cache/rafsnbd|$W/cache|g" \
    -e "s|/run/rafsnbd\.sock|$W/rafsnbd.sock|g" -e "s| /mnt\$| $W/mnt|")
  read -r -a argv <<<"$line"
  [ "${argv[0]}" = rafsnbd ] && argv[0]=$BIN
  case "${argv[1]:-}" in
    serve) run=(serve_line "${argv[@]}") ;;
    *) run=("${argv[@]}") ;;
  esac
  # The lazy lines read image.boot's blobs from the registry.
  case "$line" in *--registry*) push_blobs ;; esac
  if "${run[@]}" >"$W/line.out" 2>&1; then
    echo "PASS: $line"
    pass=$((pass + 1))
  else
    echo "FAIL: $line"
    sed 's/^/   /' "$W/line.out"
    fail=$((fail + 1))
  fi
done <<<"$lines"
echo "readme: $pass passed, $fail failed"
[ "$fail" = 0 ]
