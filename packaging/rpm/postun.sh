# egressd %postun ($1: 0 on erase, 1 on upgrade). On upgrade the new binary
# takes over if the daemon was running. rpm has no purge: an edited policy is
# kept as /etc/egressd/policy.toml.rpmsave and the saved modes in
# /var/lib/egressd stay, as with other rpm services.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart egressd.service || echo "egressd: restart failed; see 'systemctl status egressd'" >&2
    fi
fi
if [ "$1" -eq 0 ]; then
    # Only if empty: rpm owns the policy file, not its directory.
    rmdir /etc/egressd 2>/dev/null || :
    # rpm has no purge: erasing the package is the way to end enforcement. This is
    # what `egressd --uninstall` does (the binary is gone by now).
    rm -rf /sys/fs/bpf/egressd
fi
exit 0
