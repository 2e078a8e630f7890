#!/usr/bin/env bash
# Fuzzes egressd's DNS parsing and FQDN table (controlplane/dns/fuzz) for a bounded time per
# target: `scripts/fuzz-dns.sh [SECONDS]` (default 60). Installs cargo-fuzz if missing; needs
# the nightly toolchain (rustup). Exits non-zero on the first crash, whose input libFuzzer
# leaves in controlplane/dns/fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/../controlplane/dns"

seconds="${1:-60}"
case "$seconds" in
  '' | *[!0-9]*) echo "fuzz-dns.sh: SECONDS must be a whole number, got '$seconds'" >&2; exit 2 ;;
esac

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz-dns.sh: the nightly toolchain is needed: rustup toolchain install nightly" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi

for target in $(cargo +nightly fuzz list); do
  echo "== fuzz $target for ${seconds}s"
  mkdir -p "fuzz/corpus/$target"
  # The corpus grows in fuzz/corpus (ignored by git); fuzz/seeds holds hand-made messages.
  seeds=()
  if [ -d "fuzz/seeds/$target" ]; then seeds=("fuzz/seeds/$target"); fi
  cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "${seeds[@]}" -- \
    -max_total_time="$seconds" -print_final_stats=1
done
