#!/usr/bin/env bash
# Test tools for the web explorer's tests (idempotent; a second run does nothing and takes ~1 s):
#   Debian's chromium (driven by Playwright, which never downloads a browser of its own),
#   docker-compose (validates docker-compose.yml), a local copy of htmx 2 in ./node_modules
#   (the CDN is unreachable in tests), and the Python playwright package in ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv

apt_missing=()
[ -x /usr/bin/chromium ] || apt_missing+=(chromium)
command -v docker-compose >/dev/null 2>&1 || apt_missing+=(docker-compose)
if [ "${#apt_missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
        echo "Missing ${apt_missing[*]}: install them with apt-get (needs root)." >&2
        exit 1
    fi
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "Installing ${apt_missing[*]} with apt-get ..."
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

if [ ! -f node_modules/htmx.org/dist/htmx.min.js ]; then
    echo "Installing htmx.org@2 into ./node_modules ..."
    npm install --no-save --no-audit --no-fund --silent --prefix "$PWD" htmx.org@2
fi

if ! "$VENV/bin/python" -c "import playwright" 2>/dev/null; then
    echo "Installing the playwright Python package (no browser download) ..."
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check playwright
fi
