#!/usr/bin/env bash
# Runs egressd's end-to-end tests inside VMs on the kernels Debian ships, one VM per kernel:
#
#   scripts/kernel-matrix.sh [--tests a,b] [--filter SUBSTRING] [--accel auto|kvm|tcg]
#                            [--record] [KERNEL...]
#
# KERNEL is 5.10 (Debian 11 bullseye), 6.1 (Debian 12 bookworm) or 6.12 (Debian 13 trixie);
# default all three. --tests names test binaries of tests/tests (default: enforcement,modes, the
# core enforcement tests; `all` for every one; `none` only checks that egressd starts); --filter
# is passed to libtest; --record writes the results table into README.md (between the
# kernel-matrix markers). EGRESSD_VM_TIMEOUT bounds each VM (seconds, default 3600).
#
# For each kernel it reads the suite's signed index (InRelease checked with gpgv against
# debian-archive-keyring, then the Packages index and the .deb by their SHA256), takes the
# newest linux-image-amd64 of the suite and its security updates, boots its vmlinuz under
# qemu-system-x86_64 with an initramfs made here (busybox, the test binaries and their shared
# libraries, scripts/vm/init) and reads the results the VM writes to its second serial port.
# KVM is used when a probe boot under KVM works, software emulation (TCG) otherwise.
#
# Downloads and images are cached in target/vm-cache (EGRESSD_VM_CACHE); console logs and the
# results table of the last run are in target/vm-cache/results/. Exits non-zero when a kernel
# from the declared minimum (MINIMUM_KERNEL, README: Kernel requirements) on does not pass every
# selected test, or an older one neither passes nor refuses cleanly (egressd naming what the
# kernel lacks or which program its verifier refused). Must run as root (installs Debian
# packages; the build step is scripts/setup-toolchain.sh).
set -euo pipefail
# Functions below run in command substitutions: let errors there stop them too.
shopt -s inherit_errexit
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
log() { printf 'kernel-matrix: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

MIRROR="${EGRESSD_DEBIAN_MIRROR:-http://deb.debian.org}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
CACHE="${EGRESSD_VM_CACHE:-$root/target/vm-cache}"
# Per kernel: boot plus every selected test. Under TCG the core tests take a few minutes.
VM_TIMEOUT="${EGRESSD_VM_TIMEOUT:-3600}"
VM_MEMORY="${EGRESSD_VM_MEMORY:-2G}"
# A working KVM boots the probe kernel in seconds; a broken one hangs or reports an error.
KVM_PROBE_TIMEOUT=60
APT_PACKAGES=(qemu-system-x86 busybox-static cpio gpgv debian-archive-keyring curl jq xz-utils binutils)
ALL_KERNELS=(5.10 6.1 6.12)
# Kernels from this one on must pass; egressd refuses older ones (datapath/src/kernel.rs,
# TESTED_MINIMUM).
MINIMUM_KERNEL=6.12
README_BEGIN='<!-- kernel-matrix:begin -->'
README_END='<!-- kernel-matrix:end -->'

# Debian release of each kernel line: "suite codename".
debian_suite() {
  case "$1" in
    5.10) echo "bullseye 11" ;;
    6.1) echo "bookworm 12" ;;
    6.12) echo "trixie 13" ;;
    *) return 1 ;;
  esac
}

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

tests="enforcement,modes"
filter=""
accel=auto
record=no
kernels=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tests) tests="${2:?--tests needs a list}"; shift 2 ;;
    --filter) filter="${2:?--filter needs a substring}"; shift 2 ;;
    --accel) accel="${2:?--accel needs auto, kvm or tcg}"; shift 2 ;;
    --record) record=yes; shift ;;
    -h | --help) usage ;;
    -*) log "unknown option $1"; usage ;;
    *) debian_suite "$1" >/dev/null || die "unknown kernel $1 (known: ${ALL_KERNELS[*]})"
       kernels+=("$1"); shift ;;
  esac
done
[ "${#kernels[@]}" -gt 0 ] || kernels=("${ALL_KERNELS[@]}")
case "$accel" in auto | kvm | tcg) ;; *) die "--accel must be auto, kvm or tcg, not $accel" ;; esac
# The guest reads these from the kernel command line: keep them to one plain word.
[[ "$tests" =~ ^[A-Za-z0-9_,-]+$ ]] || die "--tests: names separated by commas, got '$tests'"
[[ -z "$filter" || "$filter" =~ ^[A-Za-z0-9_:-]+$ ]] || die "--filter: one word of [A-Za-z0-9_:-], got '$filter'"

require_root
ensure_apt_packages --no-install-recommends "${APT_PACKAGES[@]}"
for tool in qemu-system-x86_64 cpio gpgv curl jq xz dpkg-deb objcopy readelf; do
  command -v "$tool" >/dev/null || die "$tool is missing although its package is installed"
done
# The initramfs has no dynamic loader for busybox: it must be the static build.
if [ ! -x /bin/busybox ] || readelf -l /bin/busybox | grep -q INTERP; then
  die "/bin/busybox is not the static busybox (package busybox-static)"
fi

mkdir -p "$CACHE"/{indexes,debs,kernels,results}
work="$(mktemp -d "$CACHE/run.XXXXXX")"
qemu_pid=""
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  if [ -n "$qemu_pid" ]; then kill "$qemu_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fetch() { # URL FILE: bounded download, fails loudly
  curl --fail --silent --show-error --location --retry 3 --connect-timeout 20 --max-time 900 \
    -o "$2.part" "$1" || die "download failed: $1"
  mv "$2.part" "$2"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Prints the path of the verified Packages index of ARCHIVE/SUITE (e.g. debian bullseye,
# debian-security bullseye-security), downloading it when the signed index names a new one.
packages_index() {
  local archive=$1 suite=$2 dir inrelease want
  dir="$CACHE/indexes/$suite"
  mkdir -p "$dir"
  inrelease="$work/InRelease.$suite"
  fetch "$MIRROR/$archive/dists/$suite/InRelease" "$inrelease"
  gpgv --keyring "$KEYRING" "$inrelease" 2>"$work/gpgv.$suite" >/dev/null ||
    die "$suite: InRelease signature does not verify: $(cat "$work/gpgv.$suite")"
  gpgv --keyring "$KEYRING" --output "$work/Release.$suite" "$inrelease" 2>/dev/null
  want=$(awk '/^SHA256:/ { on = 1; next } /^[^ ]/ { on = 0 }
              on && $3 == "main/binary-amd64/Packages.xz" { print $1 }' "$work/Release.$suite")
  [ -n "$want" ] || die "$suite: the Release file lists no main/binary-amd64/Packages.xz"
  if [ ! -f "$dir/Packages.xz" ] || [ "$(sha256_of "$dir/Packages.xz")" != "$want" ]; then
    log "$suite: downloading the package index"
    fetch "$MIRROR/$archive/dists/$suite/main/binary-amd64/Packages.xz" "$dir/Packages.xz"
    [ "$(sha256_of "$dir/Packages.xz")" = "$want" ] || die "$suite: Packages.xz does not match its Release file"
    xz -dc "$dir/Packages.xz" >"$dir/Packages"
  fi
  echo "$dir/Packages"
}

# FIELD of package NAME in a Packages index (the stanza with the highest version).
package_field() {
  local index=$1 name=$2 field=$3
  awk -v name="$name" -v field="$field" '
    /^Package: / { pkg = $2 }
    pkg == name && index($0, field ": ") == 1 { print substr($0, length(field) + 3) }
    /^$/ { pkg = "" }' "$index" | tail -n 1
}

# Resolves kernel line K to "ARCHIVE INDEX PACKAGE VERSION": the newest linux-image-amd64 of
# the suite and its security suite, and the image package it depends on.
resolve_kernel() {
  local suite best="" best_version="" archive index version depends pair archive_suite
  read -r suite _ <<<"$(debian_suite "$1")"
  for pair in "debian $suite" "debian-security $suite-security"; do
    read -r archive archive_suite <<<"$pair"
    index=$(packages_index "$archive" "$archive_suite")
    version=$(package_field "$index" linux-image-amd64 Version)
    [ -n "$version" ] || continue
    if [ -z "$best_version" ] || dpkg --compare-versions "$version" gt "$best_version"; then
      depends=$(package_field "$index" linux-image-amd64 Depends)
      best="$archive $index ${depends%% *} $version"
      best_version=$version
    fi
  done
  [ -n "$best" ] || die "kernel $1: no linux-image-amd64 in $suite or $suite-security"
  echo "$best"
}

# Prints the path of the vmlinuz of kernel line K, downloading and checking it once.
kernel_image() {
  local archive index package version filename sha dir deb resolved
  resolved=$(resolve_kernel "$1")
  read -r archive index package version <<<"$resolved"
  filename=$(package_field "$index" "$package" Filename)
  sha=$(package_field "$index" "$package" SHA256)
  if [ -z "$filename" ] || [ -z "$sha" ]; then
    die "kernel $1: $package is not in the index that names it"
  fi
  dir="$CACHE/kernels/${package}_$version"
  if [ ! -f "$dir/vmlinuz" ]; then
    deb="$CACHE/debs/$(basename "$filename")"
    if [ ! -f "$deb" ] || [ "$(sha256_of "$deb")" != "$sha" ]; then
      log "kernel $1: downloading $package $version"
      fetch "$MIRROR/$archive/$filename" "$deb"
      [ "$(sha256_of "$deb")" = "$sha" ] || die "kernel $1: $deb does not match the index's SHA256"
    fi
    rm -rf "$work/deb" && mkdir -p "$work/deb" "$dir.part"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work/deb" --wildcards './boot/*'
    cp "$work/deb"/boot/vmlinuz-* "$dir.part/vmlinuz"
    cp "$work/deb"/boot/config-* "$dir.part/config"
    rm -rf "$dir" && mv "$dir.part" "$dir"
  fi
  echo "$package $version $dir/vmlinuz"
}

# --- build on the host, once ---------------------------------------------------------------
bash scripts/setup-toolchain.sh
log "building egressd and the test binaries"
cargo build --bins --locked
cargo test -p egressd-tests --no-run --locked --message-format=json 2>/dev/null |
  jq -r 'select(.reason == "compiler-artifact" and .executable != null
                and (.target.kind | index("test"))) | [.target.name, .executable] | @tsv' \
  >"$work/tests.tsv"
[ -s "$work/tests.tsv" ] || die "cargo listed no test binaries of egressd-tests"
if [ "$tests" = all ]; then
  tests=$(cut -f1 "$work/tests.tsv" | sort | paste -sd, -)
fi
for name in ${tests//,/ }; do
  [ "$name" != none ] || continue
  grep -q "^$name	" "$work/tests.tsv" || die "no test binary $name (have: $(cut -f1 "$work/tests.tsv" | sort | paste -sd' ' -))"
done
bin_dir="$(dirname "$(cut -f2 "$work/tests.tsv" | head -n 1)")"
bin_dir="${bin_dir%/deps}"

# --- the initramfs ---------------------------------------------------------------------------
# Files keep their host paths; shared libraries come from ldd. Debug info is stripped (the
# debug binaries are mostly DWARF) so the image stays small.
image="$work/rootfs"
mkdir -p "$image"/{bin,egressd,etc,tmp}
add_file() { # PATH [strip]
  mkdir -p "$image$(dirname "$1")"
  if [ "${2:-}" = strip ]; then
    objcopy --strip-debug "$1" "$image$1"
  else
    cp -L "$1" "$image$1"
  fi
}
add_executable() { # PATH: the file, stripped, and every shared library it loads
  local lib
  add_file "$1" strip
  for lib in $(ldd "$1" | awk '/=> \// { print $3 } /^[ \t]*\// { print $1 }'); do
    [ -e "$image$lib" ] || add_file "$lib"
  done
}
cp /bin/busybox "$image/bin/busybox"
cp scripts/vm/init "$image/init"
for binary in egressd egressctl egressd-probe; do add_executable "$bin_dir/$binary"; done
while IFS=$'\t' read -r name path; do
  case ",$tests," in *",$name,"*) add_executable "$path" ;; esac
done <"$work/tests.tsv"
# The FQDN tests run a real resolver; policy examples are read by the `check` tests.
if [ -x /usr/sbin/dnsmasq ]; then add_executable /usr/sbin/dnsmasq; fi
mkdir -p "$image$root" && cp -r "$root/config" "$image$root/config"
mkdir -p "$image$root/tests"
cp "$work/tests.tsv" "$image/egressd/tests.tsv"
printf 'bin_dir=%q\npackage_dir=%q\n' "$bin_dir" "$root/tests" >"$image/egressd/env"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$image/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$image/etc/group"
# No resolver in the VM: egressd's default resolvers come from here.
printf 'nameserver 127.0.0.53\n' >"$image/etc/resolv.conf"
initramfs="$CACHE/initramfs.cpio"
(cd "$image" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$initramfs.part"
mv "$initramfs.part" "$initramfs"
log "initramfs: $(du -h "$initramfs" | cut -f1) ($tests)"

# --- accelerator -----------------------------------------------------------------------------
# Boots KERNEL with the busybox-only init of a probe image; true when it reaches userspace.
kvm_works() {
  local kernel=$1 probe="$work/probe" probe_log="$work/kvm-probe.log"
  if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    log "no usable /dev/kvm"
    return 1
  fi
  mkdir -p "$probe/bin"
  cp /bin/busybox "$probe/bin/busybox"
  printf '#!/bin/busybox sh\necho kvm-probe-reached-userspace\n/bin/busybox poweroff -f\n' >"$probe/init"
  chmod +x "$probe/init"
  (cd "$probe" && find . | cpio -o -H newc --quiet) >"$work/probe.cpio"
  qemu-system-x86_64 -accel kvm -cpu host -m 512M -nodefaults -display none -no-reboot \
    -serial "file:$probe_log" -kernel "$kernel" -initrd "$work/probe.cpio" \
    -append "console=ttyS0 panic=-1 quiet" </dev/null >"$work/kvm-probe.qemu" 2>&1 &
  qemu_pid=$!
  # A broken KVM either says so (an internal error, after which qemu waits forever) or hangs.
  local waited=0 reached=no
  while [ "$waited" -lt "$KVM_PROBE_TIMEOUT" ] && kill -0 "$qemu_pid" 2>/dev/null; do
    if grep -aq kvm-probe-reached-userspace "$probe_log" 2>/dev/null; then reached=yes; break; fi
    if grep -aq 'KVM internal error\|failed to initialize kvm' "$work/kvm-probe.qemu"; then break; fi
    sleep 1
    waited=$((waited + 1))
  done
  grep -aq kvm-probe-reached-userspace "$probe_log" 2>/dev/null && reached=yes
  kill "$qemu_pid" 2>/dev/null || true
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=""
  if [ "$reached" = yes ]; then return 0; fi
  log "KVM does not boot a guest here ($(grep -ah -m1 -E 'KVM|error' "$work/kvm-probe.qemu" "$probe_log" 2>/dev/null | head -n 1 || echo "no output within ${KVM_PROBE_TIMEOUT}s"))"
  return 1
}

# --- one VM per kernel ---------------------------------------------------------------------
declare -A row_of
overall=0
for kernel in "${kernels[@]}"; do
  image_info=$(kernel_image "$kernel")
  read -r package version vmlinuz <<<"$image_info"
  read -r suite release <<<"$(debian_suite "$kernel")"
  if [ "$accel" = auto ]; then
    if kvm_works "$vmlinuz"; then accel=kvm; else accel=tcg; fi
    log "accelerator: $accel"
  fi
  cpu=max
  [ "$accel" = kvm ] && cpu=host

  console="$CACHE/results/$kernel.console.log"
  results="$CACHE/results/$kernel.results"
  rm -f "$console" "$console.raw" "$results.txt" "$results.raw"
  log "kernel $kernel: booting $package $version ($accel)"
  started=$(date +%s)
  # ttyS0 (console) and ttyS1 (results) go to files; the console is shown as it grows.
  timeout --kill-after=10 "$VM_TIMEOUT" qemu-system-x86_64 -accel "$accel" -cpu "$cpu" \
    -smp 2 -m "$VM_MEMORY" -nodefaults -display none -no-reboot \
    -serial "file:$console.raw" -serial "file:$results.raw" \
    -kernel "$vmlinuz" -initrd "$initramfs" \
    -append "console=ttyS0 panic=-1 quiet egressd.tests=$tests${filter:+ egressd.filter=$filter}" \
    </dev/null >"$console.qemu" 2>&1 &
  qemu_pid=$!
  tail -n +1 -F --pid="$qemu_pid" "$console.raw" 2>/dev/null | sed -u "s/\r\$//; s/^/[$kernel] /" || true
  qemu_status=0
  wait "$qemu_pid" || qemu_status=$?
  qemu_pid=""
  elapsed=$(( $(date +%s) - started ))
  [ "$qemu_status" -eq 0 ] || log "kernel $kernel: qemu exited with $qemu_status: $(head -c 500 "$console.qemu")"
  touch "$console.raw" "$results.raw"
  tr -d '\r' <"$console.raw" >"$console"
  tr -d '\r' <"$results.raw" >"$results.txt"
  rm -f "$console.raw" "$results.raw"

  release_seen=$(awk '$2 == "kernel" { print $3 }' "$results.txt")
  daemon=$(awk '$2 == "daemon" { print $3 }' "$results.txt")
  refusal=$(awk '$2 == "daemon" && $3 == "refused" { $1 = $2 = $3 = $4 = ""; sub(/^ +/, ""); print }' "$results.txt")
  passed=$(awk '$2 == "test" { n += $5 } END { print n + 0 }' "$results.txt")
  failed=$(awk '$2 == "test" { n += $6 } END { print n + 0 }' "$results.txt")
  bad_binaries=$(awk '$2 == "test" && $4 != 0 { print $3 "(exit " $4 ")" }' "$results.txt" | paste -sd' ' -)
  if ! grep -q '^MATRIX done' "$results.txt"; then
    result="did not finish within ${VM_TIMEOUT}s (console: ${console#"$root"/})"
    overall=1
  elif [ "$daemon" = refused ]; then
    # The table keeps the kernel's words (which program, which rule); the console log and
    # the results file keep the whole message.
    result="egressd refuses to start: $(sed -e 's/.*\(refused eBPF program\)/\1/' \
      -e 's/.*\(lacks what egressd needs\)/\1/' -e 's/\. egressd runs on .*//' \
      -e 's/; egressd needs Linux .*//' <<<"$refusal")"
    if dpkg --compare-versions "$kernel" ge "$MINIMUM_KERNEL"; then
      overall=1
    elif ! grep -q 'refused eBPF program\|lacks what egressd needs' <<<"$refusal"; then
      result="$result (no clear reason)"
      overall=1
    fi
  elif [ -n "$bad_binaries" ]; then
    result="FAIL: $passed passed, $failed failed ($bad_binaries)"
    overall=1
  elif [ "$tests" = none ]; then
    result="egressd starts"
  else
    result="pass: $passed tests ($(awk '$2 == "test" { print $3 " " $5 }' "$results.txt" | paste -sd, - | sed 's/,/, /g'))"
  fi
  row_of[$kernel]="| $kernel | Debian $release ($suite) | \`$package\` $version | ${release_seen:-?} | $result | ${elapsed}s ($accel) |"
  log "kernel $kernel: $result in ${elapsed}s"
done

# --- report ----------------------------------------------------------------------------------
table="$CACHE/results/results.md"
{
  echo "Kernel matrix of $(date -u +%Y-%m-%d), commit $(git describe --always --dirty=+uncommitted 2>/dev/null || echo '?'), tests: \`$tests\`${filter:+, filter \`$filter\`}:"
  echo
  echo "| kernel | Debian | package | uname -r | result | time |"
  echo "|---|---|---|---|---|---|"
  for kernel in "${kernels[@]}"; do echo "${row_of[$kernel]}"; done
} >"$table"
cat "$table"

if [ "$record" = yes ]; then
  if ! grep -qF "$README_BEGIN" README.md || ! grep -qF "$README_END" README.md; then
    die "README.md has no $README_BEGIN ... $README_END section to record into"
  fi
  awk -v begin="$README_BEGIN" -v end="$README_END" -v table="$table" '
    $0 == begin { print; while ((getline line < table) > 0) print line; skip = 1; next }
    $0 == end { skip = 0 }
    !skip' README.md >"$work/README.md"
  cp "$work/README.md" README.md
  log "recorded in README.md"
fi
exit "$overall"
