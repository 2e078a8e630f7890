#!/usr/bin/env bash
# Runs every cargo-fuzz target of egressd for a bounded time each:
#   scripts/fuzz.sh [SECONDS] [TARGET...]     (default 60 seconds; default every target)
# The targets are found in every */fuzz/ cargo-fuzz project of the repo (today
# controlplane/dns: parse_response, controlplane/policy: parse_policy, controlplane/proto:
# decode_request). Installs cargo-fuzz if missing; needs the nightly toolchain (rustup).
# Prints executions and crashes per target, and each crash's input (base64) and where
# libFuzzer left it (PROJECT/fuzz/artifacts/TARGET/). Exits non-zero if any target crashed
# or could not run; the other targets still run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

seconds="${1:-60}"
case "$seconds" in
  '' | *[!0-9]*) echo "fuzz.sh: SECONDS must be a whole number, got '$seconds'" >&2; exit 2 ;;
esac
shift $(( $# > 0 ? 1 : 0 ))
wanted=("$@")

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz.sh: the nightly toolchain is needed: rustup toolchain install nightly" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi

# Crate directories that hold a cargo-fuzz project in fuzz/.
projects=()
while IFS= read -r manifest; do
  if grep -q '^cargo-fuzz = true' "$manifest"; then
    projects+=("$(dirname "$(dirname "$manifest")")")
  fi
done < <(find "$root" \( -name target -o -name .git -o -name node_modules \) -prune -o \
  -path '*/fuzz/Cargo.toml' -print | sort)
if [ "${#projects[@]}" -eq 0 ]; then
  echo "fuzz.sh: no cargo-fuzz project found under $root" >&2
  exit 1
fi

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
summary=()
failed=0
ran=0

for project in "${projects[@]}"; do
  cd "$project"
  for target in $(cargo +nightly fuzz list); do
    if [ "${#wanted[@]}" -gt 0 ] && ! printf '%s\n' "${wanted[@]}" | grep -qx "$target"; then
      continue
    fi
    ran=$((ran + 1))
    name="${project#"$root"/}/$target"
    echo "== fuzz $name for ${seconds}s"
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
    # The corpus grows in fuzz/corpus (ignored by git); fuzz/seeds holds hand-made inputs.
    seeds=()
    if [ -d "fuzz/seeds/$target" ]; then seeds=("fuzz/seeds/$target"); fi
    before="$logs/$target.before"
    ls -1 "fuzz/artifacts/$target" | sort >"$before"
    log="$logs/$target.log"
    set +e
    cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "${seeds[@]}" -- \
      -max_total_time="$seconds" -print_final_stats=1 2>&1 | tee "$log"
    status="${PIPESTATUS[0]}"
    set -e

    execs="$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)"
    if [ -z "$execs" ]; then
      # No final stats (e.g. killed): the last status line's count.
      execs="$(sed -n 's/^#\([0-9][0-9]*\)\t.*/\1/p' "$log" | tail -n 1)"
    fi
    mapfile -t found < <(ls -1 "fuzz/artifacts/$target" | sort | comm -13 "$before" - |
      grep -E '^(crash|leak|oom|timeout)-' || true)
    crashes="${#found[@]}"
    if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then
      result="FAILED (exit $status, no crash input: see the output above)"
      failed=1
    elif [ "$crashes" -gt 0 ]; then
      result="CRASH"
      failed=1
      for artifact in "${found[@]}"; do
        path="$project/fuzz/artifacts/$target/$artifact"
        echo "-- $name: $path"
        echo "   base64: $(base64 -w0 "$path")"
      done
      # The panic message (up to the backtrace), else the sanitizer's or libFuzzer's verdict.
      if grep -q 'panicked at' "$log"; then
        awk '/panicked at/ { on = 1 } /^(stack backtrace:|note: )/ { on = 0 } on' "$log" |
          sed 's/^/   /'
      else
        grep -m1 -E 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)' "$log" | sed 's/^/   /' || true
      fi
    else
      result="ok"
    fi
    summary+=("$(printf '%-50s executions %-12s crashes %-3s %s' "$name" "${execs:-?}" "$crashes" "$result")")
  done
done

if [ "$ran" -eq 0 ]; then
  echo "fuzz.sh: no target named ${wanted[*]}" >&2
  exit 2
fi
echo
echo "== fuzz summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
exit "$failed"
