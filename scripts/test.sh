#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing (idempotent), checks
# formatting and lints, builds, then runs unit tests and the privileged end-to-end tests
# against the real kernel. Must run as root: the tests load eBPF and create cgroups.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: must run as root (the tests load eBPF programs and create cgroups)" >&2
  exit 1
fi

bash scripts/setup-toolchain.sh

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --all-targets --workspace --locked -- -D warnings

echo "== build"
cargo build --bins --locked

echo "== unit and privileged datapath tests"
cargo test --locked --workspace --exclude egressd-tests --exclude egressd-ebpf

echo "== end-to-end tests (real kernel, real cgroups; serial: each daemon attaches at the cgroup root)"
cargo test --locked -p egressd-tests -- --test-threads=1

echo "== benchmarks, quick: each scenario once, briefly, to prove the harness works (no timing is asserted)"
EGRESSD_BENCH_PROFILE=debug bash scripts/bench.sh --quick --out target/bench-quick >/dev/null

echo "== packages (.deb installed on this machine and removed again, .rpm into a scratch root)"
bash tests/packaging.sh
