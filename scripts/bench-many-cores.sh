#!/usr/bin/env bash
# The standard matrix (scripts/bench.sh) on a many-core host, from binaries built
# elsewhere: no cargo, no network. On the build machine:
#
#   scripts/bench.sh --package bench-pkg      # stripped mboxd + loadgen
#
# then copy bench-pkg/ and this checkout's scripts/ and config/ to the host and run
#
#   scripts/bench-many-cores.sh bench-pkg
#
# More clients than on two cores, so the daemon, not the clients, is what saturates;
# at most 64 (the default server.max_connections): clients past it wait in the
# listen backlog for the whole run. Override any of these from the environment.
set -euo pipefail
BIN="$(cd "${1:?usage: scripts/bench-many-cores.sh DIR-with-mboxd-and-loadgen}" && pwd)"
cd "$(dirname "$0")/.."
for f in mboxd loadgen; do
  [ -x "$BIN/$f" ] || { echo "no executable $BIN/$f" >&2; exit 1; }
done
command -v taskset >/dev/null || { echo "taskset (util-linux) is needed" >&2; exit 1; }
export MBOXD_BENCH_BIN="$BIN"
export BATCH_CLIENTS="${BATCH_CLIENTS:-32}"
export SINGLE_CLIENTS="${SINGLE_CLIENTS:-64}"
export OVERLOAD_CLIENTS="${OVERLOAD_CLIENTS:-64}"
export BENCH_SECONDS="${BENCH_SECONDS:-8}"
exec scripts/bench.sh
