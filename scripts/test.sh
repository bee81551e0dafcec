#!/usr/bin/env bash
# The whole test suite: installs what it needs, then lint, unit and
# integration tests (kernel mounts, real NBD clients, veritysetup), a short
# run of every fuzz target, and the kernel NBD test in a qemu VM.
#
# As root every prerequisite is installed, so RAFSNBD_STRICT=1 turns any
# test that would skip for a missing tool or privilege into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
export PATH="$(go env GOPATH)/bin:$PATH"
if [ "$(id -u)" = 0 ]; then
  export RAFSNBD_STRICT="${RAFSNBD_STRICT:-1}"
fi

echo "== gofmt, go vet, staticcheck"
unformatted=$(gofmt -l $(git ls-files '*.go'))
if [ -n "$unformatted" ]; then
  echo "gofmt would change: $unformatted" >&2
  exit 1
fi
go vet ./...
staticcheck ./...

echo "== go test"
go test -count=1 -timeout 25m ./...

echo "== README.md's commands, as written"
if [ "$(id -u)" = 0 ]; then
  scripts/readme-test.sh
elif [ "${RAFSNBD_STRICT:-}" = 1 ]; then
  echo "readme-test needs root (it mounts)" >&2; exit 1
else
  echo "SKIP readme-test: needs root (it mounts)"
fi

scripts/snapshotter-test.sh  # nydus-snapshotter's tarfs code over the nydus-image front end

echo "== fuzz targets, short runs"
FUZZTIME="${FUZZTIME:-15s}" scripts/fuzz.sh

if [ -x scripts/vmtest.sh ]; then
  echo "== kernel NBD in a VM"
  scripts/vmtest.sh
fi
