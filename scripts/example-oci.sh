#!/usr/bin/env bash
# OCI images end to end, on the built-in example (scripts/example/rootfs):
#   1. make a two-layer OCI image layout at run time: the example tree, then
#      a layer that adds a file, replaces one and deletes /etc/hostname with
#      a whiteout (scripts/mkoci),
#   2. rafsnbd convert it (nydus-snapshotter's tarfs flow): layer tars and
#      bootstraps, the merged image bootstrap, the flat image disk with a
#      dm-verity tree, and the "dm-verity options:" line,
#   3. check the tree with veritysetup using that line as printed,
#   4. as root: mount the disk read-only with the kernel, list it, compare it
#      with umoci's extraction of the same image when umoci is installed,
#   5. as root: the lazy path from the image reference alone: rafsnbd index
#      it once (same root hash as convert's), then rafsnbd mount --image REF
#      with an empty cache, pinned to that root: only what is read is
#      fetched, every byte checked against the verity tree; then clean
#      everything up.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
make --no-print-directory build
RAFSNBD=$PWD/bin/rafsnbd
SRC=$PWD/scripts/example/rootfs

W=$(mktemp -d /tmp/rafsnbd-example-oci.XXXXXX)
mounts=()
cleanup() {
  set +e
  for m in "${mounts[@]}"; do umount "$m"; done
  [ -n "${LAZY:-}" ] && mountpoint -q "$LAZY" && "$RAFSNBD" umount "$LAZY"
  rm -rf "$W"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "make an OCI image layout: $SRC plus a layer of changes"
mkdir -p "$W/changes/etc" "$W/changes/srv/www"
echo "converted by rafsnbd" >"$W/changes/etc/motd"
echo "<h1>second layer</h1>" >"$W/changes/srv/www/index.html"
: >"$W/changes/etc/.wh.hostname" # OCI whiteout: deletes /etc/hostname
go run ./scripts/mkoci -layout "$W/layout" -tag v1 "$SRC" "$W/changes"

step "convert it: layer tars + tarfs bootstraps, merged bootstrap, image disk with dm-verity"
"$RAFSNBD" convert --cache-dir "$W/cache" --export image --verity "oci:$W/layout:v1" | tee "$W/convert.out"
disk=$(sed -n 's/^disk: //p' "$W/convert.out")
line=$(grep '^dm-verity options: ' "$W/convert.out")
opts=${line#dm-verity options: }
root=${opts##* }
opts=${opts% *}
hash_offset=$(sed -n 's/.*--hash-offset \([0-9]*\) .*/\1/p' <<<"$line")
find "$W/cache" -path "$W/cache/locks" -prune -o -type f -printf '%10s  %P\n' | sort -k2

step "veritysetup verify, with the options exactly as printed"
eval "veritysetup verify $opts \"\$disk\" \"\$disk\" $root" && echo "root hash $root verified"

if [ "$(id -u)" != 0 ]; then
  echo "not root: skipping the kernel mount"
  exit 0
fi

step "mount the image disk with the kernel (EROFS, loop, read-only)"
mkdir -p "$W/mnt"
mount -t erofs -o loop,ro,sizelimit="$hash_offset" "$disk" "$W/mnt"
mounts+=("$W/mnt")
(cd "$W/mnt" && find . \( -type l -printf '%M %4U:%-4G %8s  %p -> %l\n' \) -o -printf '%M %4U:%-4G %8s  %p\n' | sort -k4)
echo
cat "$W/mnt/etc/motd"
[ ! -e "$W/mnt/etc/hostname" ] && echo "/etc/hostname is gone (whiteout applied)"

if command -v umoci >/dev/null; then
  step "compare with umoci's extraction of the same image"
  umoci unpack --image "$W/layout:v1" "$W/bundle" >/dev/null
  diff -r --no-dereference "$W/bundle/rootfs" "$W/mnt" && echo "mounted image equals umoci's rootfs"
fi

step "lazily, from the reference alone: index it once, then rafsnbd mount --image with an empty cache"
"$RAFSNBD" index "oci:$W/layout:v1" | tee "$W/index.out"
iroot=$(sed -n 's/^root hash: //p' "$W/index.out")
[ "$iroot" = "$root" ] || { echo "index's root hash $iroot differs from convert's $root" >&2; exit 1; }
echo "index's root hash equals convert's"
LAZY=$W/lazy
mkdir -p "$LAZY"
"$RAFSNBD" mount --image "oci:$W/layout:v1" --cache-dir "$W/lazy-cache" --root-hash "$iroot" "$LAZY"
cat "$LAZY/etc/motd"
"$RAFSNBD" status
if command -v umoci >/dev/null; then
  diff -r --no-dereference "$W/bundle/rootfs" "$LAZY" && echo "lazily mounted image equals umoci's rootfs"
fi
"$RAFSNBD" umount "$LAZY"
