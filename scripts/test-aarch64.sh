#!/usr/bin/env bash
# The AArch64 build and NEON kernels, from an x86-64 machine: type-checks the `ternlm` binary (CLI, server, model,
# kernels) for aarch64-unknown-linux-gnu, then cross-builds the kernel tests and runs them under qemu-user (which
# emulates the dot-product extension, so the `sdot` kernel runs, and the `smull` fallback is tested beside it).
#
#   scripts/test-aarch64.sh          # installs what it needs (Debian packages, the Rust target) when missing
#
# Exit status 0 when everything passed; 1 when a check failed; 2 when the toolchain could not be installed (the
# caller decides how loud to be about that).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu

need_apt=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need_apt+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null 2>&1 || need_apt+=(qemu-user)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing ${need_apt[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null; } || exit 2
fi
if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
    rustup target add "$TARGET" || exit 2
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
echo "== aarch64: cargo check -p ternlm"
cargo check --quiet -p ternlm --target "$TARGET" || exit 1
echo "== aarch64: clippy on the kernels (the NEON code is compiled only for this target)"
cargo clippy --quiet -p ternlm-kernels --all-targets --target "$TARGET" -- -D warnings || exit 1
echo "== aarch64: kernel tests under qemu"
# TERNLM_EXPECT_SDOT: the emulator has the dot-product extension, so the sdot kernel must have been compared.
TERNLM_EXPECT_SDOT=1 cargo test --release -p ternlm-kernels --target "$TARGET" || exit 1
