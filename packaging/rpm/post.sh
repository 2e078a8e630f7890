# egressd %post ($1: 1 on install, 2 on upgrade). Works with and without a
# running systemd (containers, image builds, `rpm --root`).
install -d -m 0700 /var/lib/egressd
if [ "$1" -eq 1 ]; then
    # First install: enable, so that it starts at boot. --no-reload only
    # writes symlinks, which is safe where systemd does not run.
    if command -v systemctl >/dev/null 2>&1; then
        systemctl --no-reload enable egressd.service >/dev/null 2>&1 || :
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null 2>&1 || :
        systemctl start egressd.service || echo "egressd: could not start; see 'systemctl status egressd'" >&2
    fi
fi
exit 0
