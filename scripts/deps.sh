#!/usr/bin/env bash
# Installs what building and testing rafsnbd needs on a Debian 12 machine,
# skipping whatever is already there. Safe to run again.
set -euo pipefail

# Debian packages, by the command each provides.
declare -A pkg_for=(
  [mkfs.erofs]=erofs-utils [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdfuse]=libnbd-bin
  [nbdkit]=nbdkit [qemu-img]=qemu-utils [qemu-io]=qemu-utils [veritysetup]=cryptsetup-bin
  [fio]=fio [fusermount3]=fuse3 [jq]=jq [zstd]=zstd [lz4]=lz4 [hyperfine]=hyperfine
  [docker-registry]=docker-registry [umoci]=umoci [skopeo]=skopeo [losetup]=mount
)
missing=()
for cmd in "${!pkg_for[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkg_for[$cmd]}")
done
# python3-libnbd (nbdsh) has no command of its own on PATH to probe.
[ -e /usr/lib/python3/dist-packages/nbd.py ] || missing+=(python3-libnbd)

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "deps: missing packages (${missing[*]}); run as root to install them" >&2
  else
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# Go modules, and staticcheck for the lint step.
go mod download
if ! command -v staticcheck >/dev/null 2>&1; then
  GOBIN="$(go env GOPATH)/bin" go install honnef.co/go/tools/cmd/staticcheck@latest
fi
