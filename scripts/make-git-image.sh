#!/usr/bin/env bash
# Builds the busybox test image plus the host's git (its binary, the shared libraries it links
# and the dynamic loader), for tests of `hutch new --clone`:
#   scripts/make-git-image.sh OUT_DIR
# The image is OUT_DIR/oci (tag "bb"). Needs git on the host (install-deps.sh --test).
set -euo pipefail
out=$(realpath "$1")
here=$(dirname "$(realpath "$0")")
"$here/make-test-image.sh" "$out" >/dev/null
cd "$out"
rm -rf bundle
umoci unpack --image oci:bb bundle >/dev/null
r=bundle/rootfs
git=$(command -v git)
copy() {
    mkdir -p "$r$(dirname "$1")"
    cp -L "$1" "$r$1"
}
copy "$git"
ldd "$git" | awk '/=>/ { print $3 } /^[ \t]*\/.*ld-linux/ { print $1 }' | while read -r lib; do
    [[ -n "$lib" && -e "$lib" ]] && copy "$lib"
done
# git clone runs `git index-pack` etc. from its exec path.
mkdir -p "$r/usr/lib/git-core"
ln -sf "$git" "$r/usr/lib/git-core/git"
umoci repack --image oci:bb bundle >/dev/null
rm -rf bundle
echo "$out/oci"
