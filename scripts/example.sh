#!/usr/bin/env bash
# The main job on the built-in example (scripts/example/rootfs):
#   1. build a RAFS v6 image (bootstrap + zstd blob) from the tree,
#   2. inspect it,
#   3. compose the flat EROFS device and export it with a dm-verity tree,
#   4. check the tree with veritysetup,
#   5. serve the image over NBD on a unix socket, composed on the fly from
#      bootstrap + blob, and read it back with nbdinfo/nbdcopy,
#   6. as root: mount it with the kernel (loop, read-only), list it, and also
#      mount it through NBD (nbdfuse + loop),
#   7. as root: the same in one command, 'rafsnbd mount' (the kernel NBD
#      driver where it is loaded, else FUSE), 'rafsnbd status', and
#      'rafsnbd umount'; then clean everything up.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
make --no-print-directory build
RAFSNBD=$PWD/bin/rafsnbd
SRC=$PWD/scripts/example/rootfs

W=$(mktemp -d /tmp/rafsnbd-example.XXXXXX)
pids=(); loops=(); mounts=()
cleanup() {
  set +e
  [ -n "${RMNT:-}" ] && "$RAFSNBD" umount "$RMNT"
  for m in "${mounts[@]}"; do umount "$m"; done
  for l in "${loops[@]}"; do losetup -d "$l"; done
  [ -d "$W/fuse" ] && mountpoint -q "$W/fuse" && fusermount3 -u "$W/fuse"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  rm -rf "$W"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "build a RAFS v6 image from $SRC"
"$RAFSNBD" create -B "$W/image.boot" -D "$W/blobs" "$SRC"

step "inspect the bootstrap"
"$RAFSNBD" inspect "$W/image.boot"

step "compose the flat device and export it with a dm-verity tree"
"$RAFSNBD" export -B "$W/image.boot" -D "$W/blobs" -o "$W/image.disk" --verity | tee "$W/export.out"
read -r data_bs data_blocks hash_offset root < <(sed -n 's/.*--data-block-size=\([0-9]*\) .*--data-blocks \([0-9]*\) --hash-offset \([0-9]*\) \([0-9a-f]*\)$/\1 \2 \3 \4/p' "$W/export.out")

step "veritysetup verify (independent check of the tree)"
veritysetup verify --no-superblock --format=1 --hash=sha256 --salt=- \
  --data-block-size="$data_bs" --hash-block-size=4096 --data-blocks="$data_blocks" \
  --hash-offset="$hash_offset" "$W/image.disk" "$W/image.disk" "$root" && echo "root hash $root verified"

step "serve the image over NBD, composed from bootstrap + blob, and read it back"
"$RAFSNBD" serve --listen "unix:$W/nbd.sock" --name example -B "$W/image.boot" -D "$W/blobs" & pids+=($!)
for i in $(seq 100); do [ -S "$W/nbd.sock" ] && break; sleep 0.1; done
URI="nbd+unix:///example?socket=$W/nbd.sock"
nbdinfo "$URI"
nbdcopy "$URI" - | cmp - <(head -c "$hash_offset" "$W/image.disk") && echo "nbdcopy of the export equals the exported disk (without its tree)"

if [ "$(id -u)" != 0 ]; then
  echo "not root: skipping the kernel mounts"
  exit 0
fi

step "mount the exported disk with the kernel (EROFS, loop, read-only)"
mkdir -p "$W/mnt"
mount -t erofs -o loop,ro,sizelimit="$hash_offset" "$W/image.disk" "$W/mnt"; mounts+=("$W/mnt")
(cd "$W/mnt" && find . \( -type l -printf '%M %4U:%-4G %8s  %p -> %l\n' \) -o -printf '%M %4U:%-4G %8s  %p\n' | sort -k4)
echo; cat "$W/mnt/etc/os-release"; sh "$W/mnt/usr/bin/hello"
diff -r --no-dereference "$SRC" "$W/mnt" && echo "mounted tree equals the source"

step "mount it again through NBD: nbdfuse + loop + EROFS"
mkdir -p "$W/fuse" "$W/nbdmnt"
nbdfuse -r -P "$W/nbdfuse.pid" "$W/fuse/disk" "$URI" & pids+=($!)
for i in $(seq 100); do [ -s "$W/nbdfuse.pid" ] && break; sleep 0.1; done
L=$(losetup -f --show -r "$W/fuse/disk"); loops+=("$L")
mount -t erofs -o ro "$L" "$W/nbdmnt"; mounts=("$W/nbdmnt" "${mounts[@]}")
diff -r --no-dereference "$SRC" "$W/nbdmnt" && echo "tree read through NBD equals the source"

step "the same in one command: rafsnbd mount (NBD driver if loaded, else FUSE), status, umount"
mkdir -p "$W/rmnt"
"$RAFSNBD" mount -B "$W/image.boot" -D "$W/blobs" "$W/rmnt"; RMNT=$W/rmnt
ls "$W/rmnt"
diff -r --no-dereference "$SRC" "$W/rmnt" && echo "tree mounted by rafsnbd mount equals the source"
"$RAFSNBD" status
"$RAFSNBD" umount "$W/rmnt"; RMNT=
mountpoint -q "$W/rmnt" || echo "rafsnbd umount: unmounted, daemon stopped, nothing left in 'rafsnbd status':"
"$RAFSNBD" status
