#!/usr/bin/env bash
# Installs the Debian packages Nestbox needs on a host, only those missing (idempotent).
# envd's port forwarding needs socat; the VM tier needs QEMU, qemu-img, debootstrap and friends.
set -euo pipefail
# The dashboard's build needs node and npm (Debian's, unless a node with its own npm is there);
# its browser tests drive Debian's chromium (headless, through Playwright's executable_path).
pkgs=(socat iproute2 iptables procps qemu-system-x86 qemu-utils debootstrap busybox-static
      lz4 e2fsprogs kmod cpio zstd chromium fonts-dejavu-core)
command -v npm >/dev/null || pkgs+=(nodejs npm)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]} (run 'make system-deps' as root)" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
