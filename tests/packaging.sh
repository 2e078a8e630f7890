#!/usr/bin/env bash
# End-to-end test of the packages: builds the .deb and the .rpm with `cargo xtask dist`,
# checks their contents and metadata, installs the .deb on this machine (where systemd
# does not run, so the maintainer scripts take their no-systemd path), runs the
# installed daemon under the unit's capability set and sees a connection from a test
# cgroup as an event, then removes and purges the package; installs the .rpm into a
# scratch root; verifies the systemd unit and renders the man pages.
#
#   sudo tests/packaging.sh              # build the packages, then test them
#   sudo tests/packaging.sh --no-build   # test the packages from the last `cargo xtask dist`
#
# Root only (dpkg -i, eBPF, cgroups). Every wait is bounded, all traffic stays on
# 127.0.0.0/8, and the trap undoes everything (daemon, cgroup, package, scratch
# directories) even when a check fails. The last line is "N passed, M failed"; the
# exit status is non-zero if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

BUILD=1
case "${1:-}" in
"") ;;
--no-build) BUILD=0 ;;
*)
  echo "usage: $0 [--no-build]" >&2
  exit 2
  ;;
esac

if [ "$(id -u)" -ne 0 ]; then
  echo "packaging.sh: must run as root (installs the .deb, loads eBPF, creates cgroups)" >&2
  exit 1
fi

PASSED=0
FAILED=0
pass() {
  PASSED=$((PASSED + 1))
  printf 'ok     %s\n' "$1"
}
fail() {
  FAILED=$((FAILED + 1))
  printf 'FAILED %s\n' "$1"
  if [ -n "${2:-}" ]; then printf '%s\n' "$2" | cut -c1-400 | sed 's/^/       | /' | head -40; fi
}
# check DESCRIPTION COMMAND...: runs COMMAND, passes when it exits 0.
check() {
  local what=$1 out
  shift
  if out=$("$@" 2>&1); then pass "$what"; else fail "$what" "$out"; fi
}
# none DESCRIPTION ITEM...: passes when no ITEM is given (the items are what is wrong).
none() {
  local what=$1
  shift
  if [ "$#" -eq 0 ]; then pass "$what"; else fail "$what" "$*"; fi
}
summary() {
  echo "$PASSED passed, $FAILED failed"
}
# Stops here: what follows depends on what just failed.
abort() {
  fail "$1" "${2:-}"
  echo "packaging.sh: stopping: later checks depend on this one" >&2
  summary
  exit 1
}

# --- cleanup: everything this script creates, in reverse ----------------------

WORK=$(mktemp -d /tmp/egressd-packaging.XXXXXX)
DAEMON_PID=""
LISTENER_PID=""
TEST_CGROUP=""
DEB_INSTALLED_BY_US=0

cleanup() {
  local status=$?
  if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    kill -TERM "$DAEMON_PID" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$DAEMON_PID" 2>/dev/null
    wait "$DAEMON_PID" 2>/dev/null
  fi
  if [ -n "$LISTENER_PID" ]; then
    kill "$LISTENER_PID" 2>/dev/null
    wait "$LISTENER_PID" 2>/dev/null
  fi
  if [ -n "$TEST_CGROUP" ] && [ -d "$TEST_CGROUP" ]; then
    # Processes left inside (none, normally) go back to the root first.
    while read -r pid; do
      echo "$pid" >"$CGROUP2/cgroup.procs" 2>/dev/null
    done <"$TEST_CGROUP/cgroup.procs"
    rmdir "$TEST_CGROUP" 2>/dev/null
  fi
  if [ "$DEB_INSTALLED_BY_US" = 1 ] && dpkg-query -W -f='${Status}' egressd 2>/dev/null | grep -qv "not-installed"; then
    dpkg -P egressd >/dev/null 2>&1
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- build --------------------------------------------------------------------

echo "== tools and packages"
bash scripts/setup-packaging.sh || abort "scripts/setup-packaging.sh"

VERSION=$(cargo metadata --format-version 1 --no-deps --offline 2>/dev/null |
  python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="egressd"))') ||
  abort "reading the version from cargo metadata"
TARGET=$(cargo metadata --format-version 1 --no-deps --offline 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
DEB="$TARGET/dist/egressd_${VERSION}_amd64.deb"
RPM="$TARGET/dist/egressd-${VERSION}-1.x86_64.rpm"

if [ "$BUILD" = 1 ]; then
  if out=$(cargo run --locked -q -p xtask -- dist 2>&1); then
    pass "cargo xtask dist builds both packages"
  else
    abort "cargo xtask dist" "$(printf '%s\n' "$out" | grep -v '^warning: egressd-datapath' | tail -30)"
  fi
fi
[ -f "$DEB" ] || abort "$DEB exists"
[ -f "$RPM" ] || abort "$RPM exists"
pass "packages exist: $(basename "$DEB"), $(basename "$RPM")"

# What both packages install (and the .deb test finds on disk).
FILES=(
  /usr/sbin/egressd
  /usr/bin/egressctl
  /etc/egressd/policy.toml
  /usr/lib/systemd/system/egressd.service
  /usr/share/man/man8/egressd.8.gz
  /usr/share/man/man8/egressctl.8.gz
  /usr/share/man/man5/egressd-policy.5.gz
  /usr/share/bash-completion/completions/egressctl
  /usr/share/zsh/vendor-completions/_egressctl
  /usr/share/fish/vendor_completions.d/egressctl.fish
  /usr/share/doc/egressd/README.md
  /usr/share/doc/egressd/CHANGELOG.md
  /usr/share/doc/egressd/copyright
  /usr/share/doc/egressd/policy.example.toml
)

# --- .deb: metadata and contents ------------------------------------------------

echo "== .deb contents"
info=$(dpkg-deb -I "$DEB" 2>&1)
field() { dpkg-deb -f "$DEB" "$1"; }
check "deb: Package egressd, Version ${VERSION}-1, Architecture amd64" \
  test "$(field Package) $(field Version) $(field Architecture)" = "egressd ${VERSION}-1 amd64"
check "deb: depends on libc6 (computed from the binaries)" grep -q 'Depends: libc6' <<<"$info"
conffiles=$(dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles 2>&1)
check "deb: the one conffile is /etc/egressd/policy.toml" test "$conffiles" = "/etc/egressd/policy.toml"
for script in postinst prerm postrm; do
  check "deb: has an executable $script" \
    bash -c "dpkg-deb --ctrl-tarfile '$DEB' | tar -tvf - ./$script | grep -q '^-rwxr-xr-x'"
done
contents=$(dpkg-deb -c "$DEB")
missing=()
for f in "${FILES[@]}"; do
  grep -qE " \.${f}\$" <<<"$contents" || missing+=("$f")
done
none "deb: contains all ${#FILES[@]} files" "${missing[@]}"
check "deb: binaries are 0755 root:root" \
  test "$(grep -cE '^-rwxr-xr-x 0/0 .* \./usr/s?bin/egress(d|ctl)$' <<<"$contents")" = 2
dpkg-deb --fsys-tarfile "$DEB" | tar -xO ./usr/sbin/egressd >"$WORK/egressd.from-deb"
check "deb: egressd is stripped" bash -c '! readelf -S "$1" | grep -q "\.symtab"' _ "$WORK/egressd.from-deb"

# --- systemd unit ---------------------------------------------------------------

echo "== systemd unit"
# verify needs the ExecStart binary: a copy pointing at the built one, without the
# man: links (checked again after installing, when the pages exist).
sed "s|^ExecStart=/usr/sbin/egressd|ExecStart=$TARGET/release/egressd|" \
  packaging/systemd/egressd.service >"$WORK/egressd.service"
check "systemd-analyze verify (repository unit, built binary)" \
  systemd-analyze verify --man=no "$WORK/egressd.service"
unit=packaging/systemd/egressd.service
for directive in Type=notify ExecStart=/usr/sbin/egressd 'ExecReload=/bin/kill -HUP $MAINPID' \
  Restart=on-failure ProtectSystem=strict ProtectHome=yes NoNewPrivileges=yes PrivateTmp=yes \
  LockPersonality=yes RestrictNamespaces=yes SystemCallArchitectures=native \
  MemoryDenyWriteExecute=yes RuntimeDirectory=egressd StateDirectory=egressd \
  'ReadWritePaths=/var/lib/egressd /run/egressd -/sys/fs/bpf'; do
  check "unit: $directive" grep -qxF "$directive" "$unit"
done
UNIT_CAPS=$(sed -n 's/^CapabilityBoundingSet=//p' "$unit")
check "unit: ambient = bounding capabilities, without CAP_SYS_ADMIN" bash -c "
  test -n '$UNIT_CAPS' &&
  test \"\$(sed -n 's/^AmbientCapabilities=//p' '$unit')\" = '$UNIT_CAPS' &&
  ! grep -q CAP_SYS_ADMIN <<<'$UNIT_CAPS'"

# --- .deb: install without systemd -----------------------------------------------

echo "== dpkg -i (no running systemd)"
if dpkg-query -W -f='${Status}' egressd 2>/dev/null | grep -q "ok installed"; then
  abort "egressd is not installed already (remove it first: dpkg -P egressd)"
fi
[ ! -d /run/systemd/system ] || echo "note: systemd runs here; the no-systemd path is not exercised"
DEB_INSTALLED_BY_US=1
if out=$(dpkg -i "$DEB" 2>&1); then pass "dpkg -i"; else abort "dpkg -i" "$out"; fi
check "dpkg -i printed no error" bash -c '! grep -qiE "error|fail" <<<"$1"' _ "$out"
check "dpkg: egressd is installed" bash -c "dpkg-query -W -f='\${Status}' egressd | grep -qx 'install ok installed'"
missing=()
for f in "${FILES[@]}"; do [ -f "$f" ] || missing+=("$f"); done
none "all ${#FILES[@]} files are in place" "${missing[@]}"
check "/etc/egressd/policy.toml is config/policy.toml" cmp /etc/egressd/policy.toml config/policy.toml
check "/var/lib/egressd exists, mode 0700" test "$(stat -c %a /var/lib/egressd 2>&1)" = 700
check "enabled offline (multi-user.target.wants link)" \
  test -L /etc/systemd/system/multi-user.target.wants/egressd.service
check "no daemon was started" bash -c "! pgrep -f '^/usr/sbin/egressd' >/dev/null"
check "egressctl --version is $VERSION" bash -c "/usr/bin/egressctl --version | grep -qx 'egressctl $VERSION'"
check "egressd --version is $VERSION" bash -c "/usr/sbin/egressd --version | grep -qx 'egressd $VERSION'"
check "egressctl check accepts the installed policy" /usr/bin/egressctl check /etc/egressd/policy.toml
check "systemd-analyze verify (installed unit)" systemd-analyze verify /usr/lib/systemd/system/egressd.service
check "bash completion completes egressctl subcommands" bash -c '
  source /usr/share/bash-completion/completions/egressctl &&
  COMP_WORDS=(egressctl st) COMP_CWORD=1 COMP_LINE="egressctl st" COMP_POINT=12 &&
  "$(complete -p egressctl | sed "s/.*-F \([^ ]*\) .*/\1/")" egressctl st egressctl &&
  printf "%s\n" "${COMPREPLY[@]}" | grep -qx status'
# The subcommands, from egressctl's own help.
SUBCOMMANDS=$(/usr/bin/egressctl --help | sed -n '/^Commands:/,/^$/p' | awk 'NR > 1 && $1 != "help" { print $1 }' | tr '\n' ' ')
check "egressctl --help lists subcommands ($SUBCOMMANDS)" test -n "$SUBCOMMANDS"
check "zsh and fish completions name every subcommand" bash -c '
  for sub in '"$SUBCOMMANDS"'; do
    grep -q "$sub" /usr/share/zsh/vendor-completions/_egressctl &&
    grep -q "$sub" /usr/share/fish/vendor_completions.d/egressctl.fish || exit 1
  done'

echo "== man pages"
for page in /usr/share/man/man8/egressd.8.gz /usr/share/man/man8/egressctl.8.gz /usr/share/man/man5/egressd-policy.5.gz; do
  name=$(basename "$page" .gz)
  check "man -l $name renders without warnings" bash -c "
    out=\$(MANWIDTH=80 man --warnings -l '$page' 2>&1 >/dev/null) && test -z \"\$out\" || { echo \"\$out\"; exit 1; }
    MANWIDTH=80 man -l '$page' 2>/dev/null | head -5 | grep -q '^NAME'"
done
check "egressd-policy(5) documents every policy key" bash -c '
  text=$(MANWIDTH=200 man -l /usr/share/man/man5/egressd-policy.5.gz 2>/dev/null)
  for key in mode "\[defaults\]" unmatched deny "\[dns\]" resolvers min_ttl max_ips_per_name grace \
    "\[metrics\]" enabled listen "\[control\]" read_group "\[\[workload\]\]" name cgroup raw_sockets allow cidr fqdn ports protocol reason; do
    grep -q "$key" <<<"$text" || { echo "missing: $key"; exit 1; }
  done'
check "egressctl(8) documents every subcommand" bash -c '
  text=$(MANWIDTH=200 man -l /usr/share/man/man8/egressctl.8.gz 2>/dev/null)
  for sub in '"$SUBCOMMANDS"'; do grep -q "egressctl $sub" <<<"$text" || { echo "missing: $sub"; exit 1; }; done'

# --- the installed daemon, under the unit's restrictions --------------------------

echo "== installed daemon"
CGROUP2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts)
[ -n "$CGROUP2" ] || abort "a cgroup2 file system is mounted"
TEST_CGROUP="$CGROUP2/egressd-packaging-$$"
mkdir "$TEST_CGROUP" || abort "mkdir $TEST_CGROUP"

# The unit's CapabilityBoundingSet as setpriv wants it (intersected with ours), its
# NoNewPrivileges=, and MemoryDenyWriteExecute= as the kernel's PR_SET_MDWE.
setpriv_caps="-all"
for cap in $UNIT_CAPS; do
  name=$(echo "${cap#CAP_}" | tr '[:upper:]' '[:lower:]')
  if capsh --decode="$(awk '/^CapBnd/ { print $2 }' /proc/self/status)" | grep -qE "[=,]cap_$name(,|\$)"; then
    setpriv_caps+=",+$name"
  fi
done
cat >"$WORK/mdwe-exec.py" <<'EOF'
import ctypes, os, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    print("packaging.sh: PR_SET_MDWE unsupported here, running without it", file=sys.stderr)
os.execv(sys.argv[1], sys.argv[1:])
EOF
SOCK="$WORK/egressd.sock"
setpriv --bounding-set "$setpriv_caps" --inh-caps -all --no-new-privs \
  python3 "$WORK/mdwe-exec.py" /usr/sbin/egressd --config /etc/egressd/policy.toml \
  --state-dir "$WORK/state" --socket "$SOCK" >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
ctl() { timeout 15 /usr/bin/egressctl --socket "$SOCK" "$@"; }

ready=0
for _ in $(seq 1 100); do # 20 s
  if ctl status >/dev/null 2>&1; then ready=1; break; fi
  kill -0 "$DAEMON_PID" 2>/dev/null || break
  sleep 0.2
done
[ "$ready" = 1 ] || abort "installed egressd answers egressctl status within 20 s (bounding set $setpriv_caps, no_new_privs, MDWE)" "$(tail -5 "$WORK/daemon.log")"
pass "installed egressd answers egressctl status within 20 s (bounding set $setpriv_caps, no_new_privs, MDWE)"
check "daemon runs with exactly the unit's capabilities" bash -c "
  eff=\$(awk '/^CapEff/ { print \$2 }' /proc/$DAEMON_PID/status)
  want=\$(capsh --decode=\$eff | sed 's/.*=//' | tr ',' '\n' | sort | tr '\n' ' ')
  have=\$(for c in $UNIT_CAPS; do echo \$c | tr '[:upper:]' '[:lower:]'; done | sort | tr '\n' ' ')
  test \"\$want\" = \"\$have\" || { echo \"effective: \$want; unit: \$have\"; exit 1; }"
check "status: learning, no workloads (the packaged policy)" bash -c "
  out=\$(timeout 15 /usr/bin/egressctl --socket '$SOCK' status) && grep -q 'default mode: learning' <<<\"\$out\" && grep -q 'no workloads' <<<\"\$out\""

# The user's edit: a workload for the test cgroup, in the installed conffile.
cat >>/etc/egressd/policy.toml <<EOF

[[workload]]
name = "packaging-test"
cgroup = "${TEST_CGROUP#"$CGROUP2"/}"
EOF
check "egressctl check accepts the edited policy" /usr/bin/egressctl check /etc/egressd/policy.toml
check "egressctl reload" ctl reload
check "status shows the new workload" bash -c "timeout 15 /usr/bin/egressctl --socket '$SOCK' status | grep -q packaging-test"

# A loopback listener (accepts one connection, 15 s at most), then a client in the
# test cgroup connects to it.
python3 - "$WORK/port" <<'EOF' &
import socket, sys
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(listener.getsockname()[1]))
__import__("os").rename(sys.argv[1] + ".tmp", sys.argv[1])
listener.settimeout(15)
conn, _ = listener.accept()
conn.close()
EOF
LISTENER_PID=$!
for _ in $(seq 1 50); do [ -s "$WORK/port" ] && break; sleep 0.1; done
PORT=$(cat "$WORK/port" 2>/dev/null)
check "loopback listener on 127.0.0.1:${PORT:-?}" test -n "$PORT"
check "TCP connect from the test cgroup succeeds (learning denies nothing)" \
  sh -c "echo \$\$ > '$TEST_CGROUP/cgroup.procs' && exec timeout 10 python3 -c '
import socket; socket.create_connection((\"127.0.0.1\", $PORT), timeout=5).close()'"
wait "$LISTENER_PID" 2>/dev/null
LISTENER_PID=""

cat >"$WORK/match.py" <<'EOF'
import json, sys
port = sys.argv[1]
for line in sys.stdin:
    event = json.loads(line)
    if (event.get("kind") == "new_destination" and event.get("workload") == "packaging-test"
            and event.get("destination") == "127.0.0.1:" + port and event.get("verdict") == "allow"):
        print(line.strip())
        sys.exit(0)
sys.exit(1)
EOF
seen=""
for _ in $(seq 1 50); do # 10 s
  seen=$(ctl events --json 2>/dev/null | python3 "$WORK/match.py" "$PORT") && break
  sleep 0.2
done
if [ -n "$seen" ]; then
  pass "egressctl events --json: new_destination 127.0.0.1:$PORT from workload packaging-test"
else
  fail "egressctl events --json: new_destination 127.0.0.1:$PORT from workload packaging-test" "$(ctl events --json 2>&1 | tail -5)"
fi

kill -TERM "$DAEMON_PID"
stopped=0
for _ in $(seq 1 100); do # 10 s
  if ! kill -0 "$DAEMON_PID" 2>/dev/null; then stopped=1; break; fi
  sleep 0.1
done
wait "$DAEMON_PID" 2>/dev/null
daemon_status=$?
check "SIGTERM stops the daemon within 10 s" test "$stopped" = 1
check "the daemon exits 0 and removes its socket" test "$daemon_status" = 0 -a ! -e "$SOCK"
check "after SIGTERM the programs stay pinned in /sys/fs/bpf/egressd (on_stop = keep)" \
  bash -c 'ls /sys/fs/bpf/egressd/v*/links/egress-* >/dev/null 2>&1'
DAEMON_PID=""
rmdir "$TEST_CGROUP" 2>/dev/null
TEST_CGROUP=""

# --- .deb: upgrade (reinstall), remove, then purge ---------------------------------------

echo "== dpkg -i again (upgrade path), dpkg -r, dpkg -P"
check "dpkg -i over the installed package (postinst configure <old version>)" dpkg -i "$DEB"
check "upgrade: the edited policy is kept without a prompt" grep -q packaging-test /etc/egressd/policy.toml
check "upgrade: no daemon was started" bash -c "! pgrep -f '^/usr/sbin/egressd' >/dev/null"
check "dpkg -r" dpkg -r egressd
missing=()
for f in "${FILES[@]}"; do
  [ "$f" = /etc/egressd/policy.toml ] && continue
  [ -e "$f" ] && missing+=("$f")
done
none "remove: every file but the conffile is gone" "${missing[@]}"
check "remove: the edited policy stays" grep -q packaging-test /etc/egressd/policy.toml
check "remove: /var/lib/egressd stays" test -d /var/lib/egressd
check "remove: dpkg status is config-files" \
  bash -c "dpkg-query -W -f='\${Status}' egressd | grep -qx 'deinstall ok config-files'"
check "dpkg -P" dpkg -P egressd
check "purge: /etc/egressd is gone" test ! -e /etc/egressd
check "purge: /var/lib/egressd is gone" test ! -e /var/lib/egressd
check "purge: the enablement link is gone" test ! -L /etc/systemd/system/multi-user.target.wants/egressd.service
check "purge: the pinned programs and maps are gone" test ! -e /sys/fs/bpf/egressd
check "purge: dpkg forgets egressd" bash -c "! dpkg-query -W -f='\${Status}' egressd 2>/dev/null | grep -q installed"
DEB_INSTALLED_BY_US=0

# --- .rpm -----------------------------------------------------------------------------

echo "== .rpm"
check "rpm: name, version, release, arch, license" test \
  "$(rpm -qp --qf '%{NAME} %{VERSION} %{RELEASE} %{ARCH} %{LICENSE}' "$RPM" 2>/dev/null)" = "egressd $VERSION 1 x86_64 Apache-2.0"
rpm_files=$(rpm -qlp "$RPM" 2>/dev/null)
missing=()
for f in "${FILES[@]}" /usr/share/licenses/egressd/LICENSE; do
  grep -qxF "$f" <<<"$rpm_files" || missing+=("$f")
done
none "rpm -qlp: contains all $((${#FILES[@]} + 1)) files" "${missing[@]}"
check "rpm: /etc/egressd/policy.toml is %config(noreplace)" bash -c "
  rpm -qp --qf '[%{FILENAMES} %{FILEFLAGS:fflags}\n]' '$RPM' 2>/dev/null | grep -qx '/etc/egressd/policy.toml cn'"
scripts=$(rpm -qp --scripts "$RPM" 2>/dev/null)
for phase in postinstall preuninstall postuninstall; do
  check "rpm -qp --scripts: $phase scriptlet (from packaging/rpm)" grep -q "^$phase scriptlet" <<<"$scripts"
done
check "rpm scriptlets: systemd only when it runs; try-restart on upgrade" bash -c '
  test "$(grep -c "/run/systemd/system" <<<"$1")" -eq 3 && grep -q "try-restart egressd.service" <<<"$1"' _ "$scripts"
for f in packaging/rpm/*.sh packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm; do
  check "sh -n $f" sh -n "$f"
done
ROOT="$WORK/rpmroot"
mkdir -p "$ROOT"
# Scripts need a shell inside the root; this one is empty, and the scriptlets'
# no-systemd path is the one dpkg -i exercised above.
check "rpm -i --root (no scripts)" rpm -i --root "$ROOT" --nodeps --noscripts "$RPM"
missing=()
for f in "${FILES[@]}" /usr/share/licenses/egressd/LICENSE; do [ -f "$ROOT$f" ] || missing+=("$f"); done
none "rpm root: all files are in place" "${missing[@]}"
check "rpm root: binaries are 0755" test "$(stat -c %a "$ROOT/usr/sbin/egressd" "$ROOT/usr/bin/egressctl" | sort -u)" = 755
check "rpm root: the installed egressctl runs" "$ROOT/usr/bin/egressctl" check "$ROOT/etc/egressd/policy.toml"
check "rpm -V in the root (files match the package)" rpm --root "$ROOT" -V --nodeps egressd
check "rpm -e in the root removes every file" bash -c "
  rpm --root '$ROOT' -e --noscripts egressd && ! find '$ROOT/usr' '$ROOT/etc' -type f | grep -q ."

# --- kubernetes -------------------------------------------------------------------------

echo "== kubernetes"
# python3-yaml comes with scripts/setup-packaging.sh: without it this check fails, never skips.
check "daemonset.yaml: Namespace, ConfigMap, DaemonSet; the ConfigMap's policy passes egressctl check" bash -c "
    python3 - <<'EOF' > '$WORK/k8s-policy.toml'
import yaml
docs = list(yaml.safe_load_all(open('packaging/kubernetes/daemonset.yaml')))
assert [d['kind'] for d in docs] == ['Namespace', 'ConfigMap', 'DaemonSet'], docs
caps = docs[2]['spec']['template']['spec']['containers'][0]['securityContext']['capabilities']
assert 'SYS_ADMIN' not in caps['add'], caps
# README, Memory: kernel maps (~80 MiB, charged to the pod) plus a policy reload's peak.
limit = docs[2]['spec']['template']['spec']['containers'][0]['resources']['limits']['memory']
assert limit.endswith('Mi') and int(limit[:-2]) >= 512, limit
print(docs[1]['data']['policy.toml'], end='')
EOF
    '$TARGET/release/egressctl' check '$WORK/k8s-policy.toml'"

summary
[ "$FAILED" -eq 0 ]
