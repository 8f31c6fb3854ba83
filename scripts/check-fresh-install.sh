#!/usr/bin/env bash
# Proves scripts/install-deps.sh on fresh Debian 12 (bookworm) machines, end to end, in throwaway
# debootstrap chroots (see docs/install.md):
#   a) nothing preinstalled (debootstrap's one-line sources.list, package lists present);
#   b) qemu-utils 10 preinstalled from bookworm-backports, as the project's machine image has, with
#      the backports source removed again and no package lists (deb822 debian.sources), so the
#      script has to add backports itself;
#   c) a machine broken by the old script: qemu-system-x86 7.2 from bookworm main, qemu-utils gone;
#   d) Debian 13 (trixie), nothing preinstalled (QEMU from main);
#   u) Ubuntu 24.04 (noble), nothing preinstalled, main/universe sources as a stock install has
#      them; only when asked for, and only with HUTCH_UBUNTU_MIRROR=<an Ubuntu archive URL> (this
#      machine's apt has no Ubuntu mirror to read one from).
# In each: install-deps.sh --test (HUTCH_SKIP_CARGO_CHECK=1, there is no Rust in the chroot), then
# again, which must install nothing, then once without the knob, which must stop at "cargo not
# found" and nowhere earlier. Prints the QEMU packages and versions each ends with and the wall time
# of every run.
#
# Needs root, debootstrap (installed with apt-get when missing) and network to the Debian mirror
# this machine's apt uses (or HUTCH_MIRROR=<url>). Takes a few minutes and ~2 GB under
# HUTCH_CHECK_DIR (default /tmp). Not part of `make test`. Everything it mounts or writes is
# removed on every exit path.
# Usage: sudo scripts/check-fresh-install.sh [a|b|c|d|u ...]   (default: a b c d)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
script="$here/install-deps.sh"
cases=("$@")
((${#cases[@]})) || cases=(a b c d)
for c in "${cases[@]}"; do
    [[ "$c" == [abcdu] ]] || {
        echo "usage: $0 [a|b|c|d|u ...]" >&2
        exit 2
    }
done

die() {
    echo "check-fresh-install: FAIL: $*" >&2
    exit 1
}
say() { echo "== $*"; }

[[ $(id -u) -eq 0 ]] || die "needs root (debootstrap, chroot, mount)"
[[ -x "$script" ]] || die "$script not found"
if [[ " ${cases[*]} " == *" u "* ]]; then
    [[ -n "${HUTCH_UBUNTU_MIRROR:-}" ]] || die "case u needs HUTCH_UBUNTU_MIRROR=<Ubuntu archive URL>"
fi
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap"
    apt-get update -qq
    apt-get install -y -qq debootstrap >/dev/null
fi

# The mirror this machine's apt uses for Debian main (the line of a plain suite such as
# bookworm/main, not -security/-updates/-backports, whose origin is Debian).
mirror="${HUTCH_MIRROR:-}"
if [[ -z "$mirror" ]]; then
    policy=$(apt-cache policy 2>/dev/null || true)
    mirror=$(awk '$3 ~ /^[a-z]+\/main$/ && $2 ~ /^https?:\/\// { url = $2; next }
                  url != "" && /o=Debian,/ && !n++ { print url }
                  { url = "" }' <<<"$policy")
fi
[[ -n "$mirror" ]] || die "cannot find this machine's Debian mirror in apt-cache policy; set HUTCH_MIRROR"

work=$(mktemp -d "${HUTCH_CHECK_DIR:-/tmp}/hutch-fresh.XXXXXX")

# Unmounts everything under $work (deepest first), ends processes whose root is inside it, removes it.
cleanup() {
    local rc=$? pid root m left
    trap - EXIT INT TERM
    for pid in /proc/[0-9]*; do
        root=$(readlink "$pid/root" 2>/dev/null) || continue
        if [[ "$root" == "$work"/* ]]; then
            kill -9 "${pid#/proc/}" 2>/dev/null || true
        fi
    done
    while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m" || true
    done < <(awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r)
    left=$(awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/mounts)
    if [[ -n "$left" ]]; then
        echo "check-fresh-install: still mounted, NOT removing $work: $left" >&2
        rc=1
    else
        rm -rf --one-file-system "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

in_root() {
    local r="$1"
    shift
    chroot "$r" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C \
        DEBIAN_FRONTEND=noninteractive "$@"
}

# Mounts what apt needs and stops package scripts from starting daemons inside the chroot.
enter() {
    local r="$1"
    mount -t proc proc "$r/proc"
    mount -t devpts -o newinstance,ptmxmode=0666 devpts "$r/dev/pts"
    printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"
    chmod 755 "$r/usr/sbin/policy-rc.d"
    cp "$script" "$r/root/install-deps.sh"
}

leave() {
    local r="$1"
    umount "$r/dev/pts"
    umount "$r/proc"
}

# Installed packages and package sources: a second install-deps.sh run must not change them.
state() {
    in_root "$1" dpkg-query -W -f="\${Package} \${Version} \${Status}\n"
    ls "$1/etc/apt/sources.list.d"
}

pkgver() { in_root "$1" dpkg-query -W -f="\${Version}" "$2"; }

# Prints stdin with a prefix on every line.
indent() {
    local line
    while IFS= read -r line; do
        echo "$1$line"
    done
}

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

summary=()

check_case() {
    local c="$1" desc="$2" r="$work/$1" t0 t1 out rc before after w1 w2 sv iv last
    say "case $c: $desc"

    t0=$(now)
    rc=0
    out=$(in_root "$r" env HUTCH_SKIP_CARGO_CHECK=1 /bin/bash /root/install-deps.sh --test 2>&1) || rc=$?
    t1=$(now)
    w1=$(secs "$t0" "$t1")
    indent "   run 1 | " <<<"$out"
    ((rc == 0)) || die "case $c: first run exited $rc"
    grep -q "system packages ok" <<<"$out" || die "case $c: first run did not reach its end"

    echo "   dpkg -l | grep qemu:"
    in_root "$r" dpkg -l | grep qemu | indent "     "
    sv=$(in_root "$r" qemu-system-x86_64 --version | head -n1)
    iv=$(in_root "$r" qemu-img --version | head -n1)
    echo "   $sv"
    echo "   $iv"
    in_root "$r" dpkg --compare-versions "$(awk '{ print $4 }' <<<"$sv")" ge 8.2 ||
        die "case $c: QEMU older than 8.2"
    [[ "$(awk '{ print $4 }' <<<"$sv")" == "$(awk '{ print $3 }' <<<"$iv")" ]] ||
        die "case $c: qemu-img and qemu-system-x86_64 differ"
    if [[ "$c" == [abc] ]]; then
        [[ -e "$r/etc/apt/sources.list.d/hutch-bookworm-backports.list" ]] ||
            die "case $c: the script did not add its bookworm-backports source"
        [[ "$sv" == *bpo12* ]] || die "case $c: QEMU is not from bookworm-backports"
    fi

    before=$(state "$r")
    t0=$(now)
    rc=0
    out=$(in_root "$r" env HUTCH_SKIP_CARGO_CHECK=1 /bin/bash /root/install-deps.sh --test 2>&1) || rc=$?
    t1=$(now)
    w2=$(secs "$t0" "$t1")
    indent "   run 2 | " <<<"$out"
    ((rc == 0)) || die "case $c: second run exited $rc"
    ! grep -qE "^(installing|adding)" <<<"$out" || die "case $c: second run installed something"
    after=$(state "$r")
    [[ "$before" == "$after" ]] || die "case $c: second run changed installed packages or sources:
$(diff <(echo "$before") <(echo "$after") || true)"

    rc=0
    out=$(in_root "$r" /bin/bash /root/install-deps.sh --test 2>&1) || rc=$?
    indent "   run 3 (no knob) | " <<<"$out"
    last=$(tail -n 1 <<<"$out")
    [[ $rc -ne 0 && "$last" == "install-deps: cargo not found: install Rust (https://rustup.rs) first" ]] ||
        die "case $c: without HUTCH_SKIP_CARGO_CHECK it should stop at 'cargo not found'"
    ! grep -qE "^(installing|adding)" <<<"$out" || die "case $c: third run installed something"

    summary+=("case $c: run 1 ${w1}s, run 2 ${w2}s (nothing installed), ${sv%% (*}, ${iv%% (*}")
}

# A minimal system of release $1 from mirror $2 under $work/base-$1 (made once); then optionally
# a debootstrap script and options.
base() {
    local rel="$1" url="$2" script="${3:-}" t0
    shift 3 || shift $#
    [[ -d "$work/base-$rel" ]] && return
    say "debootstrap --variant=minbase $rel"
    t0=$(now)
    debootstrap --variant=minbase "$@" "$rel" "$work/base-$rel" "$url" ${script:+"$script"} \
        >"$work/debootstrap.log" 2>&1 || {
        tail -n 20 "$work/debootstrap.log" >&2
        die "debootstrap $rel failed"
    }
    say "debootstrap $rel took $(secs "$t0" "$(now)")s"
}

# debootstrap of Ubuntu from a Debian host: the Ubuntu archive key (from the ubuntu-keyring package
# when the host lacks it) and the script all Ubuntu releases share.
ubuntu_base() {
    local kr=/usr/share/keyrings/ubuntu-archive-keyring.gpg s=/usr/share/debootstrap/scripts/noble
    if [[ ! -e "$kr" ]]; then
        mkdir -p "$work/keyring"
        (cd "$work/keyring" && apt-get download -q ubuntu-keyring >/dev/null 2>&1) ||
            die "case u: no $kr and apt-get download ubuntu-keyring failed (Debian 12 has it in bookworm-backports)"
        dpkg-deb -x "$work/keyring/"ubuntu-keyring_*.deb "$work/keyring/x"
        kr="$work/keyring/x/usr/share/keyrings/ubuntu-archive-keyring.gpg"
    fi
    [[ -e "$s" ]] || s=/usr/share/debootstrap/scripts/gutsy
    base noble "$HUTCH_UBUNTU_MIRROR" "$s" --keyring="$kr"
}

say "$(date -u '+%Y-%m-%d %H:%M:%S UTC'); mirror $mirror; work dir $work"

for c in "${cases[@]}"; do
    r="$work/$c"
    case "$c" in
    [abc]) base bookworm "$mirror" && cp -a "$work/base-bookworm" "$r" ;;
    d) base trixie "$mirror" && cp -a "$work/base-trixie" "$r" ;;
    u) ubuntu_base && cp -a "$work/base-noble" "$r" ;;
    esac
    enter "$r"
    case "$c" in
    a)
        check_case a "nothing preinstalled"
        ;;
    b)
        # The machine image: deb822 sources without backports, qemu-utils 10 from backports, lists
        # cleaned.
        rm -f "$r/etc/apt/sources.list"
        printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$mirror" >"$r/etc/apt/sources.list.d/debian.sources"
        echo "deb $mirror bookworm-backports main" >"$r/etc/apt/sources.list.d/prep-backports.list"
        in_root "$r" apt-get update -qq
        in_root "$r" apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-utils >/dev/null
        rm "$r/etc/apt/sources.list.d/prep-backports.list"
        rm -rf "$r/var/lib/apt/lists/"*
        v=$(pkgver "$r" qemu-utils)
        [[ "$v" == *bpo12* ]] || die "case b: preparation did not install qemu-utils from backports ($v)"
        say "case b prepared: qemu-utils $v, no backports source, no package lists"
        check_case b "qemu-utils 10 from bookworm-backports preinstalled"
        ;;
    c)
        in_root "$r" apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null
        v=$(pkgver "$r" qemu-system-x86)
        [[ "$v" == 1:7.2* ]] || die "case c: preparation did not install qemu-system-x86 7.2 ($v)"
        say "case c prepared: qemu-system-x86 $v from bookworm main, no qemu-utils"
        check_case c "qemu-system-x86 7.2 from main, qemu-utils missing (left by the old script)"
        ;;
    d)
        check_case d "Debian 13 (trixie), nothing preinstalled"
        ;;
    u)
        # A stock Ubuntu install has universe (erofs-utils, umoci, skopeo, ... live there).
        printf 'deb %s %s main restricted universe\n' \
            "$HUTCH_UBUNTU_MIRROR" noble "$HUTCH_UBUNTU_MIRROR" noble-updates \
            >"$r/etc/apt/sources.list"
        check_case u "Ubuntu 24.04 (noble), nothing preinstalled"
        ;;
    esac
    leave "$r"
    rm -rf --one-file-system "$r"
done

say "PASS"
printf '   %s\n' "${summary[@]}"
