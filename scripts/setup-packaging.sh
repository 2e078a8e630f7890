#!/usr/bin/env bash
# Installs what `cargo xtask dist` and tests/packaging.sh need, on top of
# scripts/setup-toolchain.sh: cargo-deb and cargo-generate-rpm (the package
# builders), Debian's rpm (to inspect and install the .rpm in a scratch root),
# man-db (to render the man pages), systemd (systemd-analyze verify) and python3-yaml
# (to read the Kubernetes manifest).
# Idempotent: every step checks first, so a second run takes a second.
set -euo pipefail

# Pinned: versions verified with this toolchain (newer releases may need a newer rustc).
CARGO_DEB_VERSION="${EGRESSD_CARGO_DEB_VERSION:-3.8.0}"
CARGO_GENERATE_RPM_VERSION="${EGRESSD_CARGO_GENERATE_RPM_VERSION:-0.21.1}"
APT_PACKAGES=(rpm man-db systemd dpkg-dev python3-yaml)

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

log() { printf 'setup-packaging: %s\n' "$*" >&2; }

require_root
ensure_apt_packages --no-install-recommends "${APT_PACKAGES[@]}"

# cargo install --list prints "name vX.Y.Z:" for every installed crate.
installed() { cargo install --list 2>/dev/null | grep -q "^$1 v"; }

install_crate() {
  local name=$1 version=$2
  if installed "$name" && { [ -z "$version" ] || cargo install --list | grep -q "^$name v$version:"; }; then
    return
  fi
  log "installing $name${version:+ $version} (once)"
  if [ -n "$version" ]; then
    cargo install --locked "$name" --version "$version"
  else
    cargo install --locked "$name"
  fi
}

install_crate cargo-deb "$CARGO_DEB_VERSION"
install_crate cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION"

log "packaging tools ready ($(cargo deb --version 2>/dev/null | head -1), $(cargo generate-rpm --version 2>/dev/null | head -1), $(rpm --version))"
