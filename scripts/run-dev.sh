#!/usr/bin/env bash
# Builds everything and runs egressd in the foreground in learning mode with the example
# policy. Control it from another shell with target/debug/egressctl (status, events, mode).
# Must run as root: egressd loads eBPF programs at the cgroup v2 root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "run-dev.sh: must run as root (egressd loads eBPF programs)" >&2
  exit 1
fi

bash scripts/setup-toolchain.sh
cargo build --bins --locked

state_dir="target/egressd-state"
mkdir -p "$state_dir"
echo "egressd: learning mode, policy config/policy.example.toml, state $state_dir" >&2
echo "in another shell: target/debug/egressctl status | events --follow | mode audit" >&2
exec target/debug/egressd \
  --config config/policy.example.toml \
  --state-dir "$state_dir" \
  --socket /run/egressd/egressd.sock
