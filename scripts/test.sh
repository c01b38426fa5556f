#!/usr/bin/env bash
# One command for the whole test suite: install (with test extras), then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
bash scripts/install_test_tools.sh
exec .venv/bin/python -m pytest "$@"
