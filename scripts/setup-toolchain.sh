#!/usr/bin/env bash
# Installs everything egressd needs to build and test on a fresh Debian 12 host.
# Idempotent: every step checks first, so a second run takes a few seconds.
set -euo pipefail

EBPF_TOOLCHAIN="${EGRESSD_EBPF_TOOLCHAIN:-egressd-ebpf}"
BPF_LINKER_VERSION="0.13.0"
APT_PACKAGES=(
  # eBPF compiler: rustc built on LLVM 22 with its library source (for -Z build-std=core).
  rustc-web cargo-web rust-web-src
  # bpf-linker links against the same LLVM major.
  llvm-22-dev libpolly-22-dev libzstd-dev
  # Tests: namespaces, a real DNS server, packet tools.
  iproute2 dnsmasq-base procps
  # Tests: DNS clients built against glibc and against musl (their stub resolvers differ).
  gcc libc6-dev musl-tools
)

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

log() { printf 'setup: %s\n' "$*" >&2; }

require_root
ensure_apt_packages "${APT_PACKAGES[@]}"

if ! command -v rustup >/dev/null 2>&1; then
  log "rustup is required (the host toolchain comes from it)"; exit 1
fi
if ! rustup toolchain list | grep -q "^${EBPF_TOOLCHAIN}"; then
  log "linking /usr as rustup toolchain ${EBPF_TOOLCHAIN}"
  rustup toolchain link "$EBPF_TOOLCHAIN" /usr
fi

# The LLVM major bpf-linker must match is the one the eBPF compiler was built on.
llvm_major=$(rustup run "$EBPF_TOOLCHAIN" rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
if [ -z "$llvm_major" ]; then
  log "could not read the LLVM version of toolchain ${EBPF_TOOLCHAIN}"; exit 1
fi
llvm_bin="/usr/lib/llvm-${llvm_major}/bin"
if [ ! -x "$llvm_bin/llvm-config" ]; then
  log "llvm-${llvm_major}-dev is not installed (needed by bpf-linker)"; exit 1
fi

have_linker=$(cargo install --list 2>/dev/null | sed -n "s/^bpf-linker v\([0-9.]*\).*/\1/p")
if [ "$have_linker" != "$BPF_LINKER_VERSION" ] || [ ! -f "${CARGO_HOME:-$HOME/.cargo}/.egressd-bpf-linker-llvm-${llvm_major}" ]; then
  log "building bpf-linker ${BPF_LINKER_VERSION} for LLVM ${llvm_major} (a few minutes, once)"
  PATH="$llvm_bin:$PATH" cargo install bpf-linker --version "$BPF_LINKER_VERSION" \
    --no-default-features --features "llvm-${llvm_major}" --locked --force
  touch "${CARGO_HOME:-$HOME/.cargo}/.egressd-bpf-linker-llvm-${llvm_major}"
fi

log "toolchain ready (eBPF toolchain ${EBPF_TOOLCHAIN}, LLVM ${llvm_major}, bpf-linker ${BPF_LINKER_VERSION})"
