#!/usr/bin/env bash
# Installs forkvm's host prerequisites on Debian 12 (run as root; idempotent):
#   mmdebstrap  builds the sandbox root filesystem from Debian packages
#   gcc, libc6-dev  compile the small static programs the KVM tests run
#   bubblewrap  the container floor `forkvm bench` measures against
#   python3, python3-numpy, libopenblas0-pthread, python3-pandas, python3-sklearn,
#   python3-scipy, python3-matplotlib, python3-seaborn
#               the host side of the benchmarks and of the numeric and plotting tests: the
#               same Debian binaries the sandbox runs, with the BLAS a normal numpy install
#               selects
#   python3-venv  the Python SDK's tests: a venv with the SDK (sdk/python) and httpx from PyPI
#   python3-pip   templates built from a spec fetch their PyPI packages with the host's pip
#   nodejs, npm   the TypeScript SDK (sdk/typescript): its compiler from the npm registry,
#                 pinned by its lockfile (a Node.js already installed is used as it is)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"


packages=(mmdebstrap gcc libc6-dev bubblewrap python3 python3-numpy libopenblas0-pthread
    python3-pandas python3-sklearn python3-scipy python3-matplotlib python3-seaborn
    python3-venv python3-pip ca-certificates)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    missing+=(nodejs npm)
fi
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

sdk_venv="${FORKVM_SDK_VENV:-/opt/forkvm-sdk-venv}"
if ! "$sdk_venv/bin/python" -c "import forkvm, httpx" 2>/dev/null; then
    echo "setup: creating the Python SDK's venv in $sdk_venv"
    /usr/bin/python3 -m venv "$sdk_venv"
    "$sdk_venv/bin/pip" install -q --disable-pip-version-check "$root/sdk/python"
fi

if [ ! -e "$root/sdk/typescript/node_modules/typescript" ]; then
    echo "setup: installing the TypeScript SDK's compiler (npm ci)"
    (cd "$root/sdk/typescript" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install the Rust toolchain (https://rustup.rs) first" >&2
    exit 1
fi
if [ ! -w /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is not usable here; sandboxes cannot run" >&2
fi
