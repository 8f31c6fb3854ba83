#!/usr/bin/env bash
# Installs the system packages hutch needs (with --test also what its tests need, with --bench what
# the benchmarks need), only those missing, then checks that every promised binary runs.
# Debian 12/13, Ubuntu 24.04+; needs root (or sudo). Running it twice changes nothing.
#
# QEMU comes from one release, all its packages together, and must be >= 8.2 (snapshots need
# mapped-ram / x-ignore-shared). Debian 12 carries 7.2 in main, so there both qemu-system-x86 and
# qemu-utils come from bookworm-backports (10.0). Mixing suites is what broke fresh machines: the
# image ships qemu-utils 10 from backports, and installing qemu-system-x86 7.2 from main made apt
# remove it.
#
# HUTCH_SKIP_CARGO_CHECK=1 skips the final cargo/rustup step; scripts/check-fresh-install.sh sets it
# to run this script in a bare Debian chroot, which has no Rust toolchain.
set -euo pipefail

MIN_QEMU=8.2
# protobuf-compiler: building hutchd compiles etcd's gRPC protocol (the etcd-client crate runs protoc).
run_pkgs=(e2fsprogs erofs-utils kmod cpio iproute2 nftables protobuf-compiler)
qemu_pkgs=(qemu-system-x86 qemu-utils)
# python3-venv: tests/api_fuzz.rs installs schemathesis (PyPI) into a venv under target/, and
# scripts/install-e2b-sdks.sh the E2B SDK (PyPI) into target/e2b-sdk/venv.
# systemd: tests/install.rs checks the installed hutchd.service with systemd-analyze verify.
# etcd-server: the etcd backend's conformance tests and the cluster tests run real etcd members.
test_pkgs=(busybox-static umoci skopeo docker-registry apache2-utils openssh-client python3 python3-venv systemd git curl etcd-server)
bench_pkgs=(openssh-server)

mode="${1:-}"
want=("${run_pkgs[@]}")
case "$mode" in
"") ;;
--test) want+=("${test_pkgs[@]}") ;;
--bench) want+=("${test_pkgs[@]}" "${bench_pkgs[@]}") ;;
*)
    echo "usage: $0 [--test|--bench]" >&2
    exit 2
    ;;
esac

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive

die() {
    echo "install-deps: $*" >&2
    exit 1
}

# No `apt-cache ... | grep -q` or `| awk '{ ...; exit }'`: under pipefail, a reader that stops early
# can kill apt-cache with SIGPIPE and fail the pipeline (or, in an assignment, the whole script).
# Output is captured whole first, then searched.
has_line() {
    grep -q -- "$2" <<<"$1"
}

updated=0
apt_update() {
    if ((!updated)); then
        $SUDO apt-get update -qq
        updated=1
    fi
}

# Installed version of a package, empty when it is not installed.
installed() {
    dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null |
        awk '$1 == "install" && $3 == "installed" { print $4 }'
}

# Upstream part of a Debian version: 1:10.0.2+ds-2+deb13u1~bpo12+1 -> 10.0.2
upstream() {
    local v="${1#*:}"
    v="${v%%-*}"
    echo "${v%%[+~]*}"
}

version_ge() {
    dpkg --compare-versions "$1" ge "$2"
}

# shellcheck source=/dev/null
. /etc/os-release
codename="${VERSION_CODENAME:-}"

# Debian 12 only: make sure bookworm-backports is a package source, using the mirror this machine
# already uses for bookworm.
qemu_suite=()
if [[ "${ID:-}" == debian && "$codename" == bookworm ]]; then
    qemu_suite=(-t bookworm-backports)
    policy=$(apt-cache policy 2>/dev/null || true)
    if ! has_line "$policy" " bookworm-backports/main "; then
        apt_update
        policy=$(apt-cache policy 2>/dev/null || true)
    fi
    if ! has_line "$policy" " bookworm-backports/main "; then
        mirror=$(awk '$3 == "bookworm/main" && $2 ~ /^https?:\/\// && !n++ { print $2 }' <<<"$policy")
        [[ -n "$mirror" ]] || die "no bookworm/main package source found to derive a backports source from"
        echo "adding bookworm-backports (from $mirror) for QEMU >= $MIN_QEMU"
        echo "deb $mirror bookworm-backports main" |
            $SUDO tee /etc/apt/sources.list.d/hutch-bookworm-backports.list >/dev/null
        updated=0
        apt_update
    fi
fi

# QEMU is right when both packages are installed, from the same upstream release, >= MIN_QEMU.
qemu_ok() {
    local a b
    a=$(installed qemu-system-x86)
    b=$(installed qemu-utils)
    [[ -n "$a" && -n "$b" ]] || return 1
    [[ "$(upstream "$a")" == "$(upstream "$b")" ]] || return 1
    version_ge "$(upstream "$a")" "$MIN_QEMU"
}

if ! qemu_ok; then
    apt_update
    if ((${#qemu_suite[@]})); then
        # The candidate within the target suite, not the default one.
        out=$(apt-cache madison qemu-system-x86 2>/dev/null || true)
        cand=$(awk -F'|' '$3 ~ /bookworm-backports/ && !n++ { gsub(/ /, "", $2); print $2 }' <<<"$out")
    else
        out=$(apt-cache policy qemu-system-x86 2>/dev/null || true)
        cand=$(awk '/Candidate:/ { print $2 }' <<<"$out")
    fi
    [[ -n "$cand" && "$cand" != "(none)" ]] || die "no qemu-system-x86 package available"
    if ! version_ge "$(upstream "$cand")" "$MIN_QEMU"; then
        die "this release offers QEMU $(upstream "$cand"); hutch needs >= $MIN_QEMU (Debian 12 with bookworm-backports, Debian 13, Ubuntu 24.04 or later)"
    fi
    echo "installing QEMU $(upstream "$cand"): ${qemu_pkgs[*]}"
    # --no-remove: if apt would have to remove a package to do this (as it removed qemu-utils 10
    # when 7.2 came from main), stop instead of removing it.
    $SUDO apt-get install -y -qq --no-install-recommends --no-remove "${qemu_suite[@]}" \
        "${qemu_pkgs[@]/%/=$cand}" >/dev/null
    qemu_ok || die "QEMU packages still inconsistent after install: qemu-system-x86 $(installed qemu-system-x86), qemu-utils $(installed qemu-utils)"
fi

missing=()
for p in "${want[@]}"; do
    [[ -n "$(installed "$p")" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    apt_update
    $SUDO apt-get install -y -qq --no-install-recommends --no-remove "${missing[@]}" >/dev/null
fi

# apt-get download (used by hutchd to fetch the guest kernel, linux-image-cloud-amd64 by default)
# needs package lists. Only Debian has that package; elsewhere any package list will do, so that a
# second run does not apt-get update again.
if [[ "${ID:-}" == debian ]]; then
    if ! has_line "$(apt-cache policy linux-image-cloud-amd64 2>/dev/null || true)" "Candidate: [0-9]"; then
        apt_update
    fi
else
    if ! has_line "$(apt-cache policy 2>/dev/null || true)" " Packages$"; then
        apt_update
    fi
    echo "install-deps: note: hutchd's default guest kernel package (linux-image-cloud-amd64) is Debian's;" \
        "on ${PRETTY_NAME:-this system} start hutchd with --kernel and --kernel-modules" >&2
fi

# Every promised binary must run: a package that installed but left no working binary fails here,
# loudly, instead of in the middle of a VM create.
check() {
    local what="$1"
    shift
    if ! "$@" >/dev/null 2>&1; then
        die "$what does not run (tried: $*)"
    fi
}
check qemu-system-x86_64 qemu-system-x86_64 --version
check qemu-img qemu-img --version
check mkfs.erofs mkfs.erofs --help
check mkfs.ext4 mkfs.ext4 -V
check depmod depmod -V
check cpio cpio --version
check protoc protoc --version
qv=$(qemu-system-x86_64 --version | awk 'NR == 1 { print $4 }')
version_ge "$qv" "$MIN_QEMU" || die "qemu-system-x86_64 is $qv; hutch needs >= $MIN_QEMU"
iv=$(qemu-img --version | awk 'NR == 1 { print $3 }')
[[ "$iv" == "$qv" ]] || die "qemu-img $iv and qemu-system-x86_64 $qv are from different releases"
if [[ "$mode" == --test || "$mode" == --bench ]]; then
    check busybox busybox true
    check umoci umoci --version
    check skopeo skopeo --version
    check docker-registry docker-registry --version
    check htpasswd sh -c 'htpasswd -nbB u p'
    check ssh sh -c 'ssh -V'
    check python3 python3 --version
    check systemd-analyze systemd-analyze --version
    check etcd etcd --version
    # shellcheck disable=SC2016 # expanded by the inner shell
    check python3-venv sh -c 'd=$(mktemp -d) && python3 -m venv "$d/v"; r=$?; rm -rf "$d"; exit $r'
fi
if [[ "$mode" == --bench ]]; then
    check sshd sh -c 'test -x /usr/sbin/sshd'
fi

# The official E2B SDKs (PyPI and npm, pinned) for crates/hutch/tests/e2b_sdk.rs. Skipped where the
# script is not beside this one (scripts/check-fresh-install.sh copies this script alone) or with
# HUTCH_SKIP_E2B_SDKS=1.
if [[ "$mode" == --test && "${HUTCH_SKIP_E2B_SDKS:-0}" != 1 ]]; then
    e2b_sdks="$(dirname "$0")/install-e2b-sdks.sh"
    if [[ -f "$e2b_sdks" ]]; then
        bash "$e2b_sdks" || die "installing the E2B SDKs failed (scripts/install-e2b-sdks.sh)"
    else
        echo "install-deps: $e2b_sdks not found; E2B SDKs not installed"
    fi
fi

if [[ "${HUTCH_SKIP_CARGO_CHECK:-0}" == 1 ]]; then
    echo "install-deps: system packages ok; cargo/rustup check skipped (HUTCH_SKIP_CARGO_CHECK=1)"
    exit 0
fi
if ! command -v cargo >/dev/null; then
    die "cargo not found: install Rust (https://rustup.rs) first"
fi
if [[ "$mode" == --test ]] && command -v rustup >/dev/null; then
    comps=$(rustup component list --installed 2>/dev/null || true)
    if ! has_line "$comps" '^clippy' || ! has_line "$comps" '^rustfmt'; then
        rustup component add clippy rustfmt
    fi
fi
