#!/usr/bin/env bash
# Runs every coverage-guided fuzz target for a bounded time (FUZZ_SECONDS each, default 60),
# growing the corpus kept in fuzz/corpus/<target>. A crash stops the run with the input
# saved under fuzz/artifacts/<target>/ (turn it into a regression test, then commit it).
#
# Tools: the machine's stable toolchain only. cargo-fuzz comes from crates.io into
# target/fuzz-tools (once, about a minute on 2 cores); RUSTC_BOOTSTRAP=1 lets stable rustc take
# the sanitizer and coverage flags cargo-fuzz passes (no nightly toolchain is fetched).
#
# `render` runs `nft -c` in namespaces of its own (`unshare --net`) and makes cgroups below
# <cgroup2>/bosh-fuzz-render for it: it needs root, nft and util-linux, like the integration
# tests. `smtp` talks to the real alert listener on 127.0.0.1 (a free port).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
tools="$PWD/target/fuzz-tools"
if ! command -v cargo-fuzz >/dev/null 2>&1 && [ ! -x "$tools/bin/cargo-fuzz" ]; then
  echo "fuzz: installing cargo-fuzz into $tools" >&2
  cargo install cargo-fuzz --locked --root "$tools"
fi
export PATH="$tools/bin:$PATH"
export RUSTC_BOOTSTRAP=1
# A separate target directory: sanitizer builds never mix with the test build's artifacts.
export CARGO_TARGET_DIR="$PWD/target/fuzz"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi
cd fuzz
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "fuzz: $t for ${seconds}s" >&2
  # -rss_limit_mb bounds a target that would otherwise eat the machine; -max_len keeps
  # archives and texts at sizes the parsers meet in practice while still exercising limits.
  log="../target/fuzz/$t.log"
  mkdir -p ../target/fuzz
  status=0
  cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^stat::(number_of_executed_units|new_units_added|peak_rss_mb)|^#[0-9]+ +DONE' "$log" || true
  if [ "$status" -ne 0 ] || [ -n "$(ls -A "artifacts/$t" 2>/dev/null)" ]; then
    tail -40 "$log" >&2
    echo "fuzz: $t failed (a crash is saved in fuzz/artifacts/$t; the log is target/fuzz/$t.log)" >&2
    exit 1
  fi
done
echo "fuzz: ${#targets[@]} targets ran ${seconds}s each without a crash" >&2
