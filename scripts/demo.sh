#!/usr/bin/env bash
# One command for the embedded default: install, then run `featurescope demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/featurescope demo "$@"
