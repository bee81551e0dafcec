#!/usr/bin/env bash
# nydus-snapshotter's own tarfs code judges rafsnbd's nydus-image front end:
# test/snapshotter (a Go module of its own, so that containerd and
# Kubernetes stay out of the product's go.mod) drives pkg/tarfs's Manager
# at v0.16.1 against the nydus-image symlink 'make install' makes, on an
# image in a local docker-registry, and checks the disks it exports with
# the kernel, umoci and veritysetup. Needs root (mounts, loop devices): as
# another user it skips, or fails under RAFSNBD_STRICT=1, like every test.
#
# The first run downloads the module's dependencies through the Go module
# proxy and compiles them (containerd, client-go: most of this script's
# time on a fresh machine).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== nydus-snapshotter v0.16.1's tarfs code over the nydus-image front end"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# BIN keeps the shared bin/rafsnbd out of it.
make --no-print-directory install PREFIX="$tmp" BIN="$tmp/build/rafsnbd" >/dev/null
[ -L "$tmp/bin/nydus-image" ] || { echo "make install made no nydus-image symlink" >&2; exit 1; }

cd test/snapshotter
RAFSNBD_NYDUS_IMAGE="$tmp/bin/nydus-image" go test -count=1 -timeout 10m ./...
