#!/usr/bin/env bash
# Build the peer venv for GPTQModel (benchmarks and interop checks run it through subprocess).
#
# Usage: benchmarks/gptqmodel_env.sh [DIR]        (default: benchmarks/.venv-gptqmodel)
#
# GPTQModel 7.7.0 pins torch>=2.14.1, which pulls a multi-GB CUDA build; it works with the CPU build of
# torch 2.13.0, so we install that first, install GPTQModel's dependencies under a constraint that keeps
# torch at 2.13.0, then GPTQModel itself with --no-deps (recipe: ../shared/REFERENCE.md, "GPTQ and its
# ecosystem"). Idempotent: a finished venv (marker file + importable gptqmodel) is left as it is.
# Prints the venv's python path on the last line.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/benchmarks/.venv-gptqmodel}"
PYTHON="${PYTHON:-python3.11}"
GPTQMODEL_VERSION="7.7.0"
TORCH_VERSION="2.13.0"
MARKER="$DIR/.sparsepack-built-gptqmodel-$GPTQMODEL_VERSION"

if [[ -f "$MARKER" ]] && "$DIR/bin/python" -c "import gptqmodel" >/dev/null 2>&1; then
    echo "gptqmodel venv already built: $DIR" >&2
    echo "$DIR/bin/python"
    exit 0
fi

if [[ ! -x "$DIR/bin/python" ]]; then
    "$PYTHON" -m venv "$DIR"
fi
# Keep the whole venv out of git without touching the repo's .gitignore.
echo '*' >"$DIR/.gitignore"

PIP=("$DIR/bin/python" -m pip install --disable-pip-version-check)
"${PIP[@]}" "torch==$TORCH_VERSION"

CONSTRAINTS="$DIR/constraints.txt"
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"
"${PIP[@]}" -c "$CONSTRAINTS" \
    accelerate numpy safetensors transformers threadpoolctl packaging device-smi protobuf pillow requests \
    pypcre tokenicer logbar jinja2 ninja maturin datasets pyarrow dill torchao defuser optimum
"${PIP[@]}" --no-deps "gptqmodel==$GPTQMODEL_VERSION"

# Refuse a venv whose torch drifted: the whole point of this recipe is the CPU 2.13.0 build.
"$DIR/bin/python" - "$TORCH_VERSION" <<'EOF'
import sys

import torch

want = sys.argv[1]
if torch.__version__.split("+")[0] != want:
    sys.exit(f"torch {torch.__version__} installed in the peer venv, expected {want}")
import gptqmodel  # noqa: F401  (import check)
EOF

touch "$MARKER"
echo "$DIR/bin/python"
