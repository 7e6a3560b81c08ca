#!/usr/bin/env bash
# Builds and tests moestream-cpu for aarch64 on an x86_64 host: clippy for the target, then the crate's tests
# under qemu user-mode emulation (the NEON and NEON-dotprod kernel tables against the scalar reference).
#
#   scripts/check-aarch64.sh [extra cargo test args]
#
# Installs what it needs, idempotently: the rustup target aarch64-unknown-linux-gnu, and with apt-get (as root,
# or through sudo) gcc-aarch64-linux-gnu (the linker, with the aarch64 glibc) and qemu-user. Exits 77 (skip)
# with a message when any of them cannot be had.
#
# Env:
#   QEMU_CPU   CPU model qemu emulates (default: qemu's `max`, which has dotprod, so both `neon` and `neon-q8`
#              run). `QEMU_CPU=cortex-a57` checks a CPU without dotprod (only `neon`, and `best()` falls back to it).
#   AARCH64_SYSROOT  glibc for the emulated binaries (default /usr/aarch64-linux-gnu).
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
skip() {
    echo "check-aarch64: skipped: $*" >&2
    exit 77
}

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    rustup target add "$target" >&2 || skip "rustup target $target is not installed and could not be added"
fi

need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || command -v qemu-aarch64-static >/dev/null || need+=(qemu-user)
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        skip "need ${need[*]} and cannot run apt-get as root"
    fi
    command -v apt-get >/dev/null || skip "need ${need[*]} and there is no apt-get"
    "${sudo[@]}" apt-get update -qq >&2 || skip "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}" >&2 ||
        skip "apt-get install ${need[*]} failed"
fi

qemu=$(command -v qemu-aarch64 || command -v qemu-aarch64-static) || skip "no qemu-aarch64 after install"
sysroot="${AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}"
[ -d "$sysroot/lib" ] || skip "no aarch64 glibc at $sysroot (package libc6-dev-arm64-cross)"

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$qemu -L $sysroot"

cargo clippy -p moestream-cpu --all-targets --target "$target" -- -D warnings
echo "check-aarch64: testing under $qemu (cpu ${QEMU_CPU:-max})" >&2
cargo test -p moestream-cpu --target "$target" "$@" -- --nocapture
