#!/usr/bin/env bash
# Runs every check forkvm has: formatting, lints, unit tests, KVM integration tests,
# end-to-end tests (including CPython's own regression tests inside sandboxes) and a
# bounded fuzzing run. Set FORKVM_REQUIRE_KVM=1 to make KVM tests fail rather than skip
# when /dev/kvm is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
cargo build --release --workspace
# Build (or reuse) the cached Debian images once, before tests run in parallel: the
# default one, and the Node.js one (with the node template).
./target/release/forkvm image default
./target/release/forkvm template build node --runtime node
cargo test --release --workspace
scripts/fuzz.sh "${FORKVM_FUZZ_SECONDS:-60}"
