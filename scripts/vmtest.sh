#!/usr/bin/env bash
# vmtest.sh: prove rafsnbd's kernel NBD attach, and 'rafsnbd mount' over it
# (transport auto, daemon restart, umount), against a real Linux kernel.
#
# The host may have no nbd module and no KVM, so this boots a Debian
# bookworm-backports kernel under qemu (TCG) with a busybox initramfs that
# holds a static rafsnbd, test images and a dm-verity tree, and runs the
# checks in scripts/vm/init inside the guest. Each check prints PASS or FAIL;
# the script exits non-zero if any check failed or the guest did not finish.
#
# Usage: scripts/vmtest.sh [--setup-only] [--keep]
#   --setup-only  install packages and fetch the kernel, then stop
#   --keep        keep the work directory (images, initrd, vm.log); it is
#                 always kept when a check fails
#
# Environment:
#   RAFSNBD_VM_CACHE    where the kernel .deb and extracted modules are cached
#                       (default /var/cache/rafsnbd-vm); a second run reuses it
#   RAFSNBD_VM_TIMEOUT  seconds the guest may run before it is killed (default 420)
#   RAFSNBD_VM_MEM      guest memory in MiB (default 1024)
#
# Runs as root on Debian 12 (x86_64) with Go on PATH. It installs what it
# lacks (qemu-system-x86 busybox-static cpio erofs-utils cryptsetup-bin) and
# needs no KVM, no nbd module and no mounts on the host. Inside the guest it
# takes about a minute under TCG; more on a loaded machine.
#
# Optional: RAFSNBD_VM_BINARY=path uses a prebuilt static rafsnbd instead of
# building ./cmd/rafsnbd.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${RAFSNBD_VM_CACHE:-/var/cache/rafsnbd-vm}
VM_TIMEOUT=${RAFSNBD_VM_TIMEOUT:-420}
VM_MEM=${RAFSNBD_VM_MEM:-1024}
SETUP_ONLY=0
KEEP=0
for arg in "$@"; do
	case $arg in
	--setup-only) SETUP_ONLY=1 ;;
	--keep) KEEP=1 ;;
	-h | --help) sed -n '2,28p' "$0"; exit 0 ;;
	*) echo "vmtest: unknown argument $arg" >&2; exit 2 ;;
	esac
done

log() { printf 'vmtest: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Modules the guest loads with busybox insmod, in dependency order: the .deb
# ships no modules.dep (depmod runs in postinst). crc32c_generic, not
# crc32c-intel: TCG's default CPU has no SSE4.2.
MODULES=(
	kernel/crypto/crc32c_generic.ko
	kernel/lib/libcrc32c.ko
	kernel/fs/erofs/erofs.ko
	kernel/drivers/block/nbd.ko
	kernel/drivers/md/dm-mod.ko
	kernel/drivers/md/dm-bufio.ko
	kernel/lib/reed_solomon/reed_solomon.ko
	kernel/drivers/md/dm-verity.ko
)

install_host_packages() {
	local missing=()
	command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
	[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx insmod &&
		file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' || missing+=(busybox-static)
	command -v cpio >/dev/null || missing+=(cpio)
	command -v mkfs.erofs >/dev/null || missing+=(erofs-utils)
	command -v veritysetup >/dev/null || missing+=(cryptsetup-bin)
	command -v file >/dev/null || missing+=(file)
	command -v xz >/dev/null || missing+=(xz-utils)
	if [ ${#missing[@]} -gt 0 ]; then
		log "installing ${missing[*]}"
		apt-get -o DPkg::Lock::Timeout=900 install -y --no-install-recommends "${missing[@]}" >&2 ||
			{ apt-get -o DPkg::Lock::Timeout=900 update >&2 &&
				apt-get -o DPkg::Lock::Timeout=900 install -y --no-install-recommends "${missing[@]}" >&2; } ||
			die "apt-get install ${missing[*]} failed"
	fi
}

# fetch_kernel leaves $CACHE/kernel/{vmlinuz,version,modules/<path>.ko}.
# The kernel comes from bookworm-backports through a private apt list built
# from the machine's own Debian mirror, so the host's apt setup is untouched.
fetch_kernel() {
	if [ -s "$CACHE/kernel/vmlinuz" ] && [ -s "$CACHE/kernel/version" ]; then
		local m ok=1
		for m in "${MODULES[@]}"; do [ -s "$CACHE/kernel/modules/$m" ] || ok=0; done
		if [ $ok = 1 ]; then
			log "kernel $(cat "$CACHE/kernel/version") cached in $CACHE/kernel"
			return
		fi
	fi
	local bpo=$CACHE/apt mirror
	mkdir -p "$bpo/lists/partial" "$CACHE/deb"
	mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
	[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $0 ~ /debian/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
	[ -n "$mirror" ] || die "cannot find the Debian mirror in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
	printf 'deb %s bookworm-backports main\n' "$mirror" >"$bpo/sources.list"
	local apt_opts=(-o "Dir::Etc::SourceList=$bpo/sources.list" -o Dir::Etc::SourceParts=/dev/null
		-o "Dir::State::Lists=$bpo/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=)
	log "apt-get update (bookworm-backports, private list in $bpo)"
	apt-get "${apt_opts[@]}" update >&2 || die "apt-get update for bookworm-backports failed"
	local pkg
	pkg=$(apt-cache "${apt_opts[@]}" depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
	[ -n "$pkg" ] || die "cannot resolve linux-image-amd64 in bookworm-backports"
	if ! ls "$CACHE/deb/${pkg}_"*.deb >/dev/null 2>&1; then
		log "downloading $pkg"
		(cd "$CACHE/deb" && apt-get "${apt_opts[@]}" download "$pkg" >&2) || die "apt-get download $pkg failed"
	fi
	local deb x
	deb=$(ls "$CACHE/deb/${pkg}_"*.deb | head -n1)
	x=$(mktemp -d "$CACHE/extract.XXXXXX")
	log "extracting $(basename "$deb")"
	dpkg -x "$deb" "$x"
	local version
	version=$(ls "$x/lib/modules" | head -n1)
	[ -n "$version" ] || die "no lib/modules in $deb"
	rm -rf "$CACHE/kernel.new"
	mkdir -p "$CACHE/kernel.new/modules"
	cp "$x/boot/vmlinuz-$version" "$CACHE/kernel.new/vmlinuz"
	local m
	for m in "${MODULES[@]}"; do
		mkdir -p "$CACHE/kernel.new/modules/$(dirname "$m")"
		if [ -f "$x/lib/modules/$version/$m.xz" ]; then
			xz -dc "$x/lib/modules/$version/$m.xz" >"$CACHE/kernel.new/modules/$m"
		elif [ -f "$x/lib/modules/$version/$m" ]; then
			cp "$x/lib/modules/$version/$m" "$CACHE/kernel.new/modules/$m"
		else
			die "module $m not found in $deb"
		fi
	done
	echo "$version" >"$CACHE/kernel.new/version"
	rm -rf "$x" "$CACHE/kernel"
	mv "$CACHE/kernel.new" "$CACHE/kernel"
	rm -f "$deb" # 106 MB; the extracted kernel and modules are all we need
	log "kernel $version ready in $CACHE/kernel"
}

if [ "$(id -u)" != 0 ]; then
	die "run as root (apt-get, dpkg -x into $CACHE)"
fi
mkdir -p "$CACHE"
install_host_packages
fetch_kernel
[ $SETUP_ONLY = 1 ] && exit 0

T0=$(date +%s)
WORK=$(mktemp -d /tmp/rafsnbd-vmtest.XXXXXX)
cleanup() {
	if [ $KEEP = 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# build_rafsnbd: a static binary, since the guest has no libc.
# RAFSNBD_VM_BINARY may name a prebuilt static binary instead.
build_rafsnbd() {
	if [ -n "${RAFSNBD_VM_BINARY:-}" ]; then
		cp "$RAFSNBD_VM_BINARY" "$WORK/rafsnbd"
	else
		command -v go >/dev/null || die "go not found on PATH"
		log "building a static rafsnbd"
		(cd "$REPO" && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$WORK/rafsnbd" ./cmd/rafsnbd) ||
			die "go build ./cmd/rafsnbd failed"
	fi
	file "$WORK/rafsnbd" | grep -q 'statically linked' || die "rafsnbd is not statically linked"
}

# ---------------------------------------------------------------------------
# make_test_images: THE place that makes the images the guest serves, all
# built by rafsnbd itself (the static binary runs on the host too).
# Writes into $1 (the initramfs's /img):
#   dir.boot, blobs/    a directory build (zstd blob), served with -B/-D
#   plain.erofs         its flat export (4 KiB blocks)
#   tarfs.boot          a tarfs build of the same tree (the tar is its blob)
#   tarfs.erofs         its flat export (512-byte blocks)
#   plain.size          size of plain.erofs in bytes
#   expected.sha256     `sha256sum` of every regular file, sorted by path
# The tree has a symlink sub/link-to-hello -> ../hello.txt and a file
# hello.txt reading "hello from rafsnbd"; random.bin starts with the marker
# make_verity looks for.
# ---------------------------------------------------------------------------
make_test_images() {
	local img=$1 tree=$WORK/tree r=$WORK/rafsnbd
	mkdir -p "$tree/sub/deeper" "$tree/empty-dir" "$img/blobs"
	printf 'hello from rafsnbd' >"$tree/hello.txt"
	{ printf 'RAFSNBD-VMTEST-MARKER\n'; head -c $((4 << 20)) /dev/urandom; } >"$tree/random.bin"
	seq 1 200000 >"$tree/sub/numbers.txt"
	head -c 5000 /dev/zero | tr '\0' x >"$tree/sub/deeper/xs.txt"
	# Whole 4 KiB blocks: the guest serves this file as a disk of its own.
	head -c $((64 << 10)) /dev/urandom >"$tree/sub/aligned.bin"
	: >"$tree/sub/empty.txt"
	local i
	for i in $(seq 1 64); do echo "small file $i" >"$tree/sub/deeper/small-$i.txt"; done
	ln -s ../hello.txt "$tree/sub/link-to-hello"
	(cd "$tree" && find . -type f | LC_ALL=C sort | xargs sha256sum) >"$img/expected.sha256"
	"$r" --log-level warn create -B "$img/dir.boot" -D "$img/blobs" "$tree" >&2 || die "rafsnbd create (dir) failed"
	"$r" --log-level warn export -B "$img/dir.boot" -D "$img/blobs" -o "$img/plain.erofs" >&2 || die "rafsnbd export (dir) failed"
	tar -C "$tree" -cf "$WORK/tree.tar" .
	"$r" --log-level warn create --type tarfs -B "$img/tarfs.boot" -D "$WORK/tarblobs" "$WORK/tree.tar" >&2 || die "rafsnbd create (tarfs) failed"
	"$r" --log-level warn export -B "$img/tarfs.boot" -D "$WORK/tarblobs" -o "$img/tarfs.erofs" >&2 || die "rafsnbd export (tarfs) failed"
	stat -c %s "$img/plain.erofs" >"$img/plain.size"
}

# make_verity: the dir image exported with its dm-verity tree appended (one
# file, as nydus-snapshotter and Kata use it), the veritysetup arguments
# parsed from the `dm-verity options:` line rafsnbd prints, and corrupt.disk:
# the same file with one byte of random.bin's data flipped, so that only
# that file's block fails verification.
make_verity() {
	local img=$1 off byte line
	line=$("$WORK/rafsnbd" --log-level warn export -B "$img/dir.boot" -D "$img/blobs" -o "$img/verity.disk" --verity) ||
		die "rafsnbd export --verity failed"
	log "$line"
	echo "$line" | sed -n 's/^dm-verity options: //p' | awk '{print $NF}' >"$img/roothash"
	# -s "" is nydus' spelling of an empty salt; veritysetup wants --salt=-.
	echo "$line" | sed -n 's/^dm-verity options: \(.*\) [0-9a-f]*$/\1/p' |
		sed 's/-s ""/--salt=-/; s/--data-blocks /--data-blocks=/; s/--hash-offset /--hash-offset=/' >"$img/verity.args"
	[ -s "$img/roothash" ] && [ -s "$img/verity.args" ] || die "no dm-verity options line from rafsnbd export --verity"
	# Independent check on the host before the guest relies on it.
	# shellcheck disable=SC2046
	veritysetup verify $(cat "$img/verity.args") "$img/verity.disk" "$img/verity.disk" "$(cat "$img/roothash")" ||
		die "veritysetup verify rejects rafsnbd's tree"
	off=$(grep -obUa 'RAFSNBD-VMTEST-MARKER' "$img/verity.disk" | head -n1 | cut -d: -f1)
	[ -n "$off" ] || die "marker of random.bin not found in verity.disk"
	off=$((off + 100000))
	cp "$img/verity.disk" "$img/corrupt.disk"
	byte=$(od -An -tu1 -j "$off" -N1 "$img/verity.disk" | tr -d ' ')
	printf "\\$(printf %03o $(((byte + 1) % 256)))" |
		dd of="$img/corrupt.disk" bs=1 seek="$off" conv=notrunc status=none
	cmp -s "$img/verity.disk" "$img/corrupt.disk" && die "corrupt.disk is not corrupted"
	return 0
}

# build_initramfs: busybox, rafsnbd, the modules, veritysetup with its
# libraries, the init script and the images.
build_initramfs() {
	local r=$WORK/root
	mkdir -p "$r/bin" "$r/sbin" "$r/lib/modules" "$r/img"
	cp /bin/busybox "$r/bin/busybox"
	cp "$WORK/rafsnbd" "$r/bin/rafsnbd"
	cp "$REPO/scripts/vm/init" "$r/init"
	chmod 755 "$r/init"
	local m
	: >"$r/lib/modules/load-order"
	for m in "${MODULES[@]}"; do
		cp "$CACHE/kernel/modules/$m" "$r/lib/modules/$(basename "$m")"
		basename "$m" >>"$r/lib/modules/load-order"
	done
	# veritysetup is dynamic: copy it with every library it loads.
	local vs lib
	vs=$(command -v veritysetup)
	cp "$vs" "$r/sbin/veritysetup"
	for lib in $(ldd "$vs" | awk '/=> \// {print $3} /^\t\// {print $1}'); do
		mkdir -p "$r$(dirname "$lib")"
		cp -L "$lib" "$r$lib"
	done
	make_test_images "$r/img"
	make_verity "$r/img"
	(cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1) >"$WORK/initrd.gz"
	log "initramfs: $(du -h "$WORK/initrd.gz" | cut -f1)"
}

run_vm() {
	log "booting $(cat "$CACHE/kernel/version") under qemu (TCG, timeout ${VM_TIMEOUT}s)"
	local t0 rc
	t0=$(date +%s)
	set +e
	timeout --kill-after=10 "$VM_TIMEOUT" qemu-system-x86_64 -m "$VM_MEM" -smp 2 -nographic -no-reboot -nic none \
		-kernel "$CACHE/kernel/vmlinuz" -initrd "$WORK/initrd.gz" \
		-append "console=ttyS0 panic=-1 quiet" </dev/null 2>&1 | tr -d '\r' >"$WORK/vm.log"
	rc=${PIPESTATUS[0]}
	set -e
	VM_SECONDS=$(($(date +%s) - t0))
	if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
		log "qemu killed after ${VM_TIMEOUT}s"
	fi
	return 0
}

build_rafsnbd
build_initramfs
run_vm

grep -a -E '^(PASS|FAIL): ' "$WORK/vm.log" || true
result=$(grep -a '^VMTEST RESULT: ' "$WORK/vm.log" | tail -n1 || true)
if [ -z "$result" ]; then
	KEEP=1
	echo "FAIL: the guest did not finish (no VMTEST RESULT line); last lines of its console:"
	tail -n 60 "$WORK/vm.log"
	echo "vmtest: FAIL (qemu ${VM_SECONDS}s, total $(($(date +%s) - T0))s)"
	exit 1
fi
echo "$result"
if ! printf '%s\n' "$result" | grep -q '^VMTEST RESULT: PASS' || grep -aq '^FAIL: ' "$WORK/vm.log"; then
	KEEP=1
	echo "--- guest console (for diagnosis):"
	grep -a -v -E '^(PASS|FAIL): ' "$WORK/vm.log" | tail -n 150
	echo "vmtest: FAIL (qemu ${VM_SECONDS}s, total $(($(date +%s) - T0))s)"
	exit 1
fi
echo "vmtest: PASS (qemu ${VM_SECONDS}s, total $(($(date +%s) - T0))s)"
