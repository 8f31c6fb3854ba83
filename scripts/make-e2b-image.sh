#!/usr/bin/env bash
# Builds the image the E2B SDK tests run in, without Docker (umoci + busybox-static + the host's
# bash):
#   scripts/make-e2b-image.sh OUT_DIR
# writes an OCI layout to OUT_DIR/oci, tag "base"; import it with
#   hutch image import OUT_DIR/oci --name base
# ("base" is E2B's default template name, so Sandbox.create() with no template finds it).
#
# E2B runs every command as `/bin/bash -l -c CMD`, so the image has the host's /bin/bash with the
# shared libraries ldd lists and the dynamic loader, beside busybox applets for the rest
# (ls, cat, sleep, id, ...). Users: root (home /root) and `user` (uid/gid 1000, home /home/user,
# owned by 1000), E2B's default user. /etc/profile only sets PATH (bash -l reads it).
set -euo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1"
out=$(realpath "$1")
cd "$out"
rm -rf oci bundle
umoci init --layout oci
umoci new --image oci:base
umoci unpack --image oci:base bundle >/dev/null
r=bundle/rootfs
mkdir -p "$r/bin" "$r/sbin" "$r/usr/bin" "$r/usr/sbin" "$r/etc" "$r/tmp" "$r/root" "$r/home/user" \
    "$r/var/tmp" "$r/dev" "$r/proc" "$r/sys" "$r/run"
chmod 1777 "$r/tmp" "$r/var/tmp"
chmod 0700 "$r/root"

# busybox and its applets (bash is /bin/bash itself, so no applet may take that name); only
# applets this busybox has.
cp /bin/busybox "$r/bin/busybox"
have=" $(busybox --list | tr '\n' ' ') "
for a in sh ash echo printf cat ls uname env pwd id whoami sleep true false hostname sync \
    sha256sum md5sum head tail wc dd mkdir rmdir rm mv cp ln touch stat grep egrep sed awk tr cut \
    sort uniq tee kill killall pidof ps chmod chown test [ [[ xargs find readlink realpath basename \
    dirname date seq yes timeout nproc df du mktemp gzip gunzip tar od hexdump xxd base64 which \
    nc wget su usleep less more vi setsid; do
    if [[ "$have" == *" $a "* ]]; then
        ln -sf busybox "$r/bin/$a"
    fi
done

# bash, its libraries (as ldd resolves them on this host) and the dynamic loader.
cp -L /bin/bash "$r/bin/bash"
libs=$(ldd /bin/bash)
while read -r line; do
    # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
    p=""
    if [[ "$line" == *"=> /"* ]]; then
        p=${line#*=> }
        p=${p%% (*}
    elif [[ "$line" == /* ]]; then
        p=${line%% (*}
    fi
    [[ -n "$p" ]] || continue
    mkdir -p "$r$(dirname "$p")"
    cp -L "$p" "$r$p"
done <<<"$libs"
# bash's own check: the copied bash must find everything it links against in the rootfs.
if [[ ! -e "$r/lib64/ld-linux-x86-64.so.2" ]]; then
    echo "make-e2b-image: no dynamic loader found by ldd /bin/bash" >&2
    exit 1
fi

cat >"$r/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/bash
user:x:1000:1000:user:/home/user:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/bin/sh
EOF
cat >"$r/etc/group" <<'EOF'
root:x:0:
user:x:1000:
nogroup:x:65534:
EOF
cat >"$r/etc/profile" <<'EOF'
# /etc/profile of the hutch E2B test image: read by `bash -l`; sets PATH and nothing else.
PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export PATH
EOF
echo 'hutch-e2b' >"$r/etc/hostname"
# umoci records numeric owners as they are in the bundle (run as root here).
chown 1000:1000 "$r/home/user"
chmod 0755 "$r/home/user"

umoci repack --image oci:base bundle >/dev/null
umoci config --image oci:base \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin >/dev/null
rm -rf bundle
