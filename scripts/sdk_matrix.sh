#!/usr/bin/env bash
# The SDK suite (tests/python/sdk) against every protobuf / grpcio pair the SDK
# declares, each in a venv of its own that this script creates (and reuses on later
# runs): training images pin their own versions, and `import mbox` must work with
# all of them. sdk/python/pyproject.toml declares exactly the ranges tested here.
#
#   MBOXD_BIN=/path/to/mboxd ./scripts/sdk_matrix.sh [NAME...]   # all, or the named envs
#
# MBOX_SDK_VENVS: where the venvs live (default /var/tmp/mbox-sdk-venvs);
# MBOX_SDK_PYTHON: the interpreter (default python3; CPython 3.9 to 3.13 are supported).
set -euo pipefail
cd "$(dirname "$0")/.."

VENVS="${MBOX_SDK_VENVS:-/var/tmp/mbox-sdk-venvs}"
PYTHON="${MBOX_SDK_PYTHON:-python3}"
PYVER="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
PIP_FLAGS=(-q --disable-pip-version-check)

# name, protobuf requirement, grpcio requirement. "newest" is upgraded on every run.
MATRIX=(
  "pb4.21-grpc1.56 protobuf==4.21.* grpcio==1.56.*"
  "pb5.29-grpc1.70 protobuf==5.29.* grpcio==1.70.*"
  "pb7.36.2-grpc1.84.0 protobuf==7.36.2 grpcio==1.84.0"
  "newest protobuf grpcio"
)
# What the SDK suite imports besides the SDK (pandas: search_df).
TEST_DEPS=(pytest psutil duckdb pyarrow numpy pandas)

selected=("$@")
wanted() {
  [ ${#selected[@]} -eq 0 ] && return 0
  local s
  for s in "${selected[@]}"; do [ "$s" = "$1" ] && return 0; done
  return 1
}

setup_venv() {  # name protobuf-req grpcio-req -> prints the venv's path
  local name="$1" pb="$2" grpc="$3"
  local venv="$VENVS/py$PYVER-$name"
  local stamp="$pb $grpc ${TEST_DEPS[*]}"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.mbox-matrix" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install "${PIP_FLAGS[@]}" "$pb" "$grpc" "${TEST_DEPS[@]}" >&2
    echo "$stamp" >"$venv/.mbox-matrix"
  elif [ "$name" = newest ]; then
    "$venv/bin/python" -m pip install "${PIP_FLAGS[@]}" --upgrade "$pb" "$grpc" >&2
  fi
  echo "$venv"
}

# The SDK as pip ships it: one wheel, installed into every venv (not editable).
WHEELS="$(mktemp -d)"
trap 'rm -rf "$WHEELS"' EXIT
"$PYTHON" -m pip wheel "${PIP_FLAGS[@]}" --no-deps -w "$WHEELS" ./sdk/python >/dev/null
WHEEL="$(ls "$WHEELS"/mbox-*.whl)"

results=()
failed=0
for entry in "${MATRIX[@]}"; do
  read -r name pb grpc <<<"$entry"
  wanted "$name" || continue
  echo "== SDK suite: $name (Python $PYVER, $pb, $grpc)"
  started=$SECONDS
  venv="$(setup_venv "$name" "$pb" "$grpc")"
  "$venv/bin/python" -m pip install "${PIP_FLAGS[@]}" --force-reinstall --no-deps "$WHEEL"
  # The SDK's declared requirements hold for the versions under test.
  "$venv/bin/python" -m pip check >/dev/null
  versions="$("$venv/bin/python" -c 'import google.protobuf as p, grpc
from google.protobuf.internal import api_implementation as a
print(f"protobuf {p.__version__} ({a.Type()}), grpcio {grpc.__version__}")')"
  echo "   $versions"
  if "$venv/bin/python" -m pytest tests/python/sdk -q --tb=short -p no:cacheprovider; then
    results+=("PASS $name: $versions ($((SECONDS - started)) s)")
  else
    results+=("FAIL $name: $versions ($((SECONDS - started)) s)")
    failed=1
  fi
done

echo "== SDK matrix"
printf '   %s\n' "${results[@]}"
exit $failed
