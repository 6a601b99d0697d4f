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
set -euo pipefail

packages=(mmdebstrap gcc libc6-dev bubblewrap python3 python3-numpy libopenblas0-pthread
    python3-pandas python3-sklearn python3-scipy python3-matplotlib python3-seaborn
    ca-certificates)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install the Rust toolchain (https://rustup.rs) first" >&2
    exit 1
fi
if [ ! -w /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is not usable here; sandboxes cannot run" >&2
fi
