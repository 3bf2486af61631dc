#!/usr/bin/env bash
# The standard ingest matrix: batch and single-point, `wal-fsync` and `memory`, mboxd
# on one core and on all cores (taskset), plus the sidecar preset, a run at half the
# saturated rate and an overload run. Prints the load generator's own lines and then
# one Markdown table.
#
#   scripts/bench.sh                    # builds release binaries, then runs the matrix
#   scripts/bench.sh --package DIR      # only builds, and copies mboxd + loadgen to DIR
#   MBOXD_BENCH_BIN=DIR scripts/bench.sh  # runs from prebuilt binaries (no cargo)
#
# Tunables (environment): BENCH_SECONDS (10), BATCH (10000), BATCH_CLIENTS (8),
# SINGLE_CLIENTS (16), OVERLOAD_CLIENTS (4 x BATCH_CLIENTS), SIDECAR_CLIENTS (8, the
# preset's server.max_connections). Clients past a config's max_connections wait
# in the listen backlog for the whole run: keep the others at most 64, the default.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH="${BENCH_SECONDS:-10}"
BATCH="${BATCH:-10000}"
BATCH_CLIENTS="${BATCH_CLIENTS:-8}"
SINGLE_CLIENTS="${SINGLE_CLIENTS:-16}"
OVERLOAD_CLIENTS="${OVERLOAD_CLIENTS:-$((4 * BATCH_CLIENTS))}"
SIDECAR_CLIENTS="${SIDECAR_CLIENTS:-8}"

build() {
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/mboxd-target}"
  cargo build --locked --release --bin mboxd >&2
  local loadgen
  loadgen="$(cargo build --locked --release --bench loadgen --message-format=json |
    jq -r 'select(.reason == "compiler-artifact" and .target.name == "loadgen") | .executable')"
  mkdir -p "$1"
  cp "$CARGO_TARGET_DIR/release/mboxd" "$1/mboxd"
  cp "$loadgen" "$1/loadgen"
  # Without debug info: small enough to carry to another machine.
  strip "$1/mboxd" "$1/loadgen" 2>/dev/null || true
}

if [ "${1:-}" = "--package" ]; then
  build "${2:?usage: scripts/bench.sh --package DIR}"
  echo "mboxd and loadgen are in $2"
  exit 0
fi

BIN="${MBOXD_BENCH_BIN:-}"
if [ -z "$BIN" ]; then
  BIN="${CARGO_TARGET_DIR:-/var/tmp/mboxd-target}/bench-bin"
  build "$BIN"
fi
SIDECAR="$(pwd)/config/sidecar.toml"
CORES="$(nproc)"
ALL="0-$((CORES - 1))"

echo "machine: $CORES cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)," \
  "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"

ROWS=()
# run LABEL CPUS [loadgen flags...]: runs one load, records one table row, and echoes
# the saturated points/s in $RATE.
run() {
  local label="$1" cpus="$2"
  shift 2
  local out
  out="$("$BIN/loadgen" --mboxd "$BIN/mboxd" --mboxd-cpus "$cpus" --seconds "$SECONDS_EACH" "$@" 2>&1)" || {
    echo "$out" >&2
    echo "loadgen failed: $label" >&2
    exit 1
  }
  echo "$out"
  RATE="$(sed -n 's/^acked points: .* = \([0-9]*\) points\/s.*/\1/p' <<<"$out")"
  local errors lat rss
  errors="$(sed -n 's/^acked points: .*requests, \([0-9]*\) errors).*/\1/p' <<<"$out")"
  lat="$(sed -n 's/^ack latency ms: p50=\([0-9.]*\) p90=[0-9.]* p99=\([0-9.]*\) max=\([0-9.]*\)/\1 | \2 | \3/p' <<<"$out")"
  rss="$(sed -n 's/^mboxd peak RSS: \([0-9.]*\) MiB.*/\1/p' <<<"$out")"
  local ncpu="$CORES"
  [ "$cpus" = "$ALL" ] || ncpu=1
  ROWS+=("| $label | $ncpu | $(printf "%'d" "$RATE") | $lat | $rss | $errors |")
}

for durability in wal-fsync memory; do
  for cpus in 0 "$ALL"; do
    run "batch ${BATCH} x ${BATCH_CLIENTS} clients, $durability" "$cpus" \
      --mode batch --clients "$BATCH_CLIENTS" --batch "$BATCH" --durability "$durability"
  done
done
for durability in wal-fsync memory; do
  for cpus in 0 "$ALL"; do
    run "single-point x ${SINGLE_CLIENTS} clients, $durability" "$cpus" \
      --mode single --clients "$SINGLE_CLIENTS" --durability "$durability"
  done
done
run "batch, wal-fsync, saturated (reference)" "$ALL" \
  --mode batch --clients "$BATCH_CLIENTS" --batch "$BATCH" --durability wal-fsync
HALF=$((RATE / 2))
run "batch, wal-fsync, half the saturated rate ($(printf "%'d" "$HALF")/s)" "$ALL" \
  --mode batch --clients "$BATCH_CLIENTS" --batch "$BATCH" --durability wal-fsync --rate "$HALF"
run "batch, wal-fsync, overload: ${OVERLOAD_CLIENTS} clients" "$ALL" \
  --mode batch --clients "$OVERLOAD_CLIENTS" --batch "$BATCH" --durability wal-fsync
run "sidecar preset (config/sidecar.toml), batch, wal-fsync, paced at 2 M points/s" "$ALL" \
  --mode batch --clients "$SIDECAR_CLIENTS" --batch "$BATCH" --durability wal-fsync --rate 2000000 \
  "--mboxd-args=--config $SIDECAR"
run "sidecar preset (config/sidecar.toml), batch, wal-fsync, saturated" "$ALL" \
  --mode batch --clients "$SIDECAR_CLIENTS" --batch "$BATCH" --durability wal-fsync \
  "--mboxd-args=--config $SIDECAR"

echo
echo "| load | mboxd cores | points/s | ack p50 ms | ack p99 ms | ack max ms | peak RSS MiB | refused requests |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
