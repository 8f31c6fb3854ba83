#!/usr/bin/env bash
# Builds a busybox OCI image layout with umoci, for tests and benchmarks:
#   scripts/make-test-image.sh OUT_DIR [EXTRA_MB]
# The image is OUT_DIR/oci (tag "bb"): busybox-static with applet links, a `nobody` user,
# Env FOO=bar, WorkingDir /tmp. With EXTRA_MB, a second layer adds /data/big of that many MiB
# of random bytes (a "large image" of the same shape).
set -euo pipefail
out=$(realpath "$1")
extra=${2:-0}
cd "$out"
rm -rf oci bundle
umoci init --layout oci
umoci new --image oci:bb
umoci unpack --image oci:bb bundle >/dev/null
r=bundle/rootfs
mkdir -p "$r/bin" "$r/etc" "$r/tmp" "$r/root"
cp /bin/busybox "$r/bin/busybox"
for a in sh echo cat ls uname env pwd id sleep true false hostname sync sha256sum head wc dd mkdir rm stat grep tr; do
    ln -sf busybox "$r/bin/$a"
done
echo 'root:x:0:0:root:/root:/bin/sh' >"$r/etc/passwd"
echo 'nobody:x:65534:65534:nobody:/nonexistent:/bin/sh' >>"$r/etc/passwd"
echo 'root:x:0:' >"$r/etc/group"
echo 'nogroup:x:65534:' >>"$r/etc/group"
umoci repack --image oci:bb bundle >/dev/null
if [[ "$extra" -gt 0 ]]; then
    # A repack replaces the layer of the previous repack from the same bundle: unpack anew.
    rm -rf bundle
    umoci unpack --image oci:bb bundle >/dev/null
    mkdir -p "$r/data"
    head -c "$((extra * 1024 * 1024))" /dev/urandom >"$r/data/big"
    umoci repack --image oci:bb bundle >/dev/null
fi
umoci config --image oci:bb --config.env FOO=bar --config.workingdir /tmp >/dev/null
rm -rf bundle
