#!/usr/bin/env bash
# Refresh the pinned browser assets in api/static/vendor from npm (versions in its package.json).
# Run by a maintainer when bumping a version; the copied files are committed, so nothing runs at setup.
set -euo pipefail
cd "$(dirname "$0")/.."
V=api/static/vendor
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cp "$V/package.json" "$TMP/"
(cd "$TMP" && npm install --no-audit --no-fund --ignore-scripts >/dev/null)
N=$TMP/node_modules
mkdir -p "$V/swagger-ui" "$V/redoc" "$V/uplot" "$V/js-yaml"
cp "$N"/swagger-ui-dist/{swagger-ui-bundle.js,swagger-ui.css,favicon-32x32.png,oauth2-redirect.html,LICENSE} "$V/swagger-ui/"
cp "$N"/redoc/bundles/redoc.standalone.js "$N"/redoc/LICENSE "$V/redoc/"
cp "$N"/uplot/dist/{uPlot.iife.min.js,uPlot.min.css} "$N"/uplot/LICENSE "$V/uplot/"
cp "$N"/js-yaml/dist/js-yaml.min.js "$N"/js-yaml/LICENSE "$V/js-yaml/"
# Source maps are not vendored: drop the comments that would make browsers ask for them.
sed -i '/^\/[/*]# sourceMappingURL=[^ ]*$/d' "$V/redoc/redoc.standalone.js" "$V/swagger-ui/swagger-ui.css"
# ReDoc's footer loads its logo from cdn.redoc.ly: point it at a local file (the page must work offline).
sed -i 's|src:"https://cdn.redoc.ly/redoc/logo-mini.svg"|src:"/static/vendor/redoc/logo-mini.svg"|' "$V/redoc/redoc.standalone.js"
grep -q 'src:"/static/vendor/redoc/logo-mini.svg"' "$V/redoc/redoc.standalone.js"
echo "vendored: $(grep -o '"[a-z-]*": "[0-9.]*"' "$V/package.json" | tr '\n' ' ')"
