#!/usr/bin/env bash
# The benchmarks (BENCHMARKS.md): egressd against no firewall, nftables and iptables, side by
# side in one run, as ratios. Run as root on a fresh Debian 12 host: installs what is missing
# first (the toolchain, nftables, iptables; idempotent), builds, runs every scenario and writes
# target/bench/results.md (the tables and targets) and target/bench/results.json (every value,
# the machine, the kernel, the commit). Arguments go to `egressd-bench run`, for example
#   sudo scripts/bench.sh --rounds 3 --seconds 1
#   sudo scripts/bench.sh --quick --out target/bench-quick    # each scenario once, briefly
# EGRESSD_BENCH_PROFILE=debug uses the debug build (the test suite's quick run does).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
log() { printf 'bench: %s\n' "$*" >&2; }

require_root
bash scripts/setup-toolchain.sh
# nft and iptables-nft: the configurations egressd is compared with; bpftool: the benchmark
# waits until no one else's programs are attached at the cgroup root.
ensure_apt_packages nftables iptables bpftool

profile="${EGRESSD_BENCH_PROFILE:-release}"
case "$profile" in
  release) cargo build --release --bins --locked ;;
  debug) cargo build --bins --locked ;;
  *) log "EGRESSD_BENCH_PROFILE must be release or debug, not $profile"; exit 1 ;;
esac

# The benchmark cleans up after itself (cgroups, daemons; its nft and iptables rules live in a
# network namespace of its own and die with it), also on SIGINT and SIGTERM. Niceness -10 for
# it and everything it starts (clients, egressd): on a shared machine, other processes then
# disturb the measurements less; every configuration runs at the same priority.
exec nice -n -10 "target/${profile}/egressd-bench" run "$@"
