#!/usr/bin/env bash
# Fuzzes the syscall layer for a bounded time: scripts/fuzz.sh [SECONDS] [TARGET].
# SECONDS defaults to 60 and TARGET to syscall_dispatch. Exits non-zero when the target
# crashes; the crashing input is then in fuzz/artifacts/TARGET/ (see fuzz/README.md).
set -euo pipefail

seconds="${1:-60}"
target="${2:-syscall_dispatch}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz passes nightly-only flags (-Zsanitizer=address, sancov passes); the stable
# toolchain accepts them when RUSTC_BOOTSTRAP is set.
export RUSTC_BOOTSTRAP=1
cd "$root"
corpus="fuzz/corpus/$target"
mkdir -p "$corpus"
cargo fuzz run "$target" "$corpus" -- \
    -max_total_time="$seconds" \
    -timeout=10 \
    -rss_limit_mb=4096
