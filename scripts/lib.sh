# Shared by the set-up scripts: source it, then call `require_root` and `ensure_apt_packages`.

# Stops unless the script runs as root (it installs Debian packages).
require_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (installs Debian packages)"; exit 1
  fi
}

# Installs the Debian packages given that are not installed yet; nothing when all are.
# A first argument --no-install-recommends is passed on to apt-get.
ensure_apt_packages() {
  local flags=() missing=() pkg
  if [ "${1:-}" = "--no-install-recommends" ]; then
    flags+=("$1"); shift
  fi
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    # Another apt run (unattended-upgrades, a parallel set-up) holds dpkg's lock for a while:
    # wait for it rather than fail.
    local wait_for_lock=(-o DPkg::Lock::Timeout=600)
    apt-get "${wait_for_lock[@]}" update -qq
    DEBIAN_FRONTEND=noninteractive apt-get "${wait_for_lock[@]}" install -y -qq "${flags[@]}" "${missing[@]}" >/dev/null
  fi
}
