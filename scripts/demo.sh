#!/usr/bin/env bash
# One command for the embedded default: install, then `featurescope demo` (train or reuse the demo SAEs,
# precompute them into DuckDB, serve the explorer at http://127.0.0.1:8000). Extra args go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# A local htmx copy lets the explorer work offline; without npm the pages load htmx from its CDN.
if [ ! -f node_modules/htmx.org/dist/htmx.min.js ] && command -v npm >/dev/null 2>&1; then
    npm install --no-save --no-audit --no-fund --silent --prefix "$PWD" htmx.org@2 || echo "npm could not fetch htmx: pages will load it from its CDN."
fi
exec .venv/bin/featurescope demo "$@"
