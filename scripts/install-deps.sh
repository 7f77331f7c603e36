#!/usr/bin/env bash
# Install the Debian packages pyrovm's build, tests and benchmarks use (only those missing).
# Runs apt-get as root (or through sudo).  Safe to run again: it does nothing when all are present.
set -euo pipefail

PACKAGES=(
  gcc make libc6-dev linux-libc-dev   # test guest, struct ABI checks
  e2fsprogs                           # pyrovm disk create (mkfs.ext4 -d), dumpe2fs in tests
  flex bison bc libelf-dev libssl-dev xz-utils linux-source-6.1   # pyrovm kernel build
  busybox-static cpio                 # pyrovm initramfs build; cpio only to cross-check the writer
  qemu-system-x86                     # the peer in benchmarks and cross-checks of the test guest
  socat                               # vsock tests: a third-party client of the Firecracker protocol
  passt                               # --net user (rootless user-mode networking)
  iproute2 iputils-ping               # network tests: namespaces, taps, ping
  libseccomp2 strace                  # the seccomp filters (libseccomp through ctypes); strace to rebuild them
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
