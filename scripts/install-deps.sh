#!/usr/bin/env bash
# Installs the system packages hutch needs (to run, and with --test to run its tests), only those
# missing. Debian/Ubuntu; needs root (or sudo).
set -euo pipefail

run_pkgs=(qemu-system-x86 qemu-utils e2fsprogs erofs-utils kmod cpio)
test_pkgs=(busybox-static umoci skopeo docker-registry apache2-utils openssh-client python3)

want=("${run_pkgs[@]}")
if [[ "${1:-}" == "--test" ]]; then
    want+=("${test_pkgs[@]}")
fi
if [[ "${1:-}" == "--bench" ]]; then
    want+=("${test_pkgs[@]}" openssh-server)
fi

missing=()
for p in "${want[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    SUDO="sudo"
fi

if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# apt-get download (used by hutchd to fetch the guest kernel) needs package lists.
if ! apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep -q "Candidate: [0-9]"; then
    $SUDO apt-get update -qq
fi

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (https://rustup.rs) first" >&2
    exit 1
fi
if [[ "${1:-}" == "--test" ]] && command -v rustup >/dev/null; then
    rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt
fi
