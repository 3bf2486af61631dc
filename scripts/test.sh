#!/usr/bin/env bash
# The whole test suite from a fresh clone. Installs what the tests need (a Python
# venv with the test packages), then runs format and lint checks, the Rust suite
# and the Python suites against real mboxd processes.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/mboxd-target}"
export CARGO_TERM_COLOR=never
VENV="${MBOX_VENV:-.venv}"

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings

echo "== Rust tests"
cargo test --locked

echo "== Python environment ($VENV)"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt
# The SDK as a user installs it (not editable): the suite tests what pip ships.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps ./sdk/python

echo "== Python tests"
export MBOXD_BIN="$CARGO_TARGET_DIR/debug/mboxd"
# The ModelBox-compat stubs declare the same protobuf symbols as mboxd's own, so
# they run in a process of their own.
"$VENV/bin/python" -m pytest tests/python/compat -q --tb=short
"$VENV/bin/python" -m pytest tests/python --ignore=tests/python/compat -q --tb=short
