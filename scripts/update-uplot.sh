#!/usr/bin/env bash
# Refreshes the vendored uPlot under web/vendor/uplot/ from the npm registry:
#   scripts/update-uplot.sh            # the latest release
#   scripts/update-uplot.sh 1.6.32     # a given version
# The web view has no build step, so it ships uPlot's own minified browser build
# (uPlot.iife.min.js, which defines the global `uPlot`; 50 KB against 145 KB for the
# unminified ES module), its stylesheet and its licence as they are published, plus
# a VERSION file. mboxd
# embeds every file under web/, so keep this list of files stable.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${1:-$(npm view uplot version)}"
DEST=web/vendor/uplot
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

(cd "$TMP" && npm pack --silent "uplot@$VERSION" >/dev/null)
tar -xzf "$TMP"/uplot-*.tgz -C "$TMP"
PKG="$TMP/package"
[ "$(node -p "require('$PKG/package.json').version")" = "$VERSION" ] || {
  echo "npm pack returned another version than $VERSION" >&2; exit 1; }

mkdir -p "$DEST"
rm -f "$DEST"/uPlot.*
cp "$PKG/dist/uPlot.iife.min.js" "$DEST/uPlot.iife.min.js"
cp "$PKG/dist/uPlot.min.css" "$DEST/uPlot.min.css"
cp "$PKG/LICENSE" "$DEST/LICENSE"
echo "$VERSION" > "$DEST/VERSION"
echo "uPlot $VERSION vendored into $DEST:"
ls -l "$DEST"
