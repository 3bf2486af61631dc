#!/usr/bin/env bash
# The whole test suite from a fresh clone. Installs what the tests need (an
# S3-compatible server, a Python venv with the test packages), then runs format
# and lint checks, the Rust suite and the Python suites against real mboxd
# processes.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/mboxd-target}"
export CARGO_TERM_COLOR=never
VENV="${MBOX_VENV:-.venv}"

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings

echo "== S3-compatible test server (s3s-fs)"
# Built from crates once and kept outside the clone; newer releases need a newer
# Rust than this project's.
TOOLS="${MBOXD_TOOLS:-/var/tmp/mboxd-tools}"
S3S_VERSION=0.14.1
if ! "$TOOLS/bin/s3s-fs" --version 2>/dev/null | grep -qx "s3s-fs $S3S_VERSION"; then
  cargo install --locked --quiet --root "$TOOLS" --features binary "s3s-fs@$S3S_VERSION"
fi
export MBOXD_S3S_FS="$TOOLS/bin/s3s-fs"

# Debian 12's kubernetes-client (1.20) renders only the overlays without a Kustomize
# component; the standalone ones need kubectl 1.21 or later (MBOXD_KUBECTL picks one).
if ! command -v kubectl >/dev/null; then
  echo "== kubectl (Debian's kubernetes-client), to render deploy/kubernetes"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client
fi

if [ ! -x /usr/bin/chromium ]; then
  echo "== Chromium (Debian's), for the web view's browser tests"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
fi

echo "== Rust tests"
cargo test --locked

echo "== Python environment ($VENV)"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt
# The SDK as a user installs it (not editable): the suite tests what pip ships.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps ./sdk/python

echo "== Python tests"
# Playwright drives the system Chromium above; it never downloads a browser of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
export MBOX_CHROMIUM="${MBOX_CHROMIUM:-/usr/bin/chromium}"
# Screenshots of the browser tests (git-ignored).
export MBOX_WEB_SCREENSHOTS="${MBOX_WEB_SCREENSHOTS:-target/web-screenshots}"
export MBOXD_BIN="$CARGO_TARGET_DIR/debug/mboxd"
# The ModelBox-compat stubs declare the same protobuf symbols as mboxd's own, so
# they run in a process of their own.
"$VENV/bin/python" -m pytest tests/python/compat -q --tb=short
# The SDK suite (tests/python/sdk) runs in the matrix below, once per protobuf and
# grpcio pair the SDK supports, each in a venv of its own.
"$VENV/bin/python" -m pytest tests/python --ignore=tests/python/compat --ignore=tests/python/sdk -q --tb=short

echo "== SDK matrix"
./scripts/sdk_matrix.sh
