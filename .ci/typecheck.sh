#!/usr/bin/env bash
# CI: the type check. Runs the pinned mypy on python/haltwise with the
# settings in pyproject.toml ([tool.mypy]); fails on any error. Run it in the
# environment that has haltwise's dependencies installed (torch, numpy,
# transformers from the `hf` extra): mypy reads their type information.
# Installs the pinned mypy and stub packages first if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
MYPY_PIN="mypy==2.4.1"
STUBS=("types-tqdm==4.70.0.20261106")

have() {  # have "name==version": installed at exactly that version?
  "$PYTHON" - "$1" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
name, _, wanted = sys.argv[1].partition("==")
try:
    sys.exit(0 if version(name) == wanted else 1)
except PackageNotFoundError:
    sys.exit(1)
PY
}

missing=()
for requirement in "$MYPY_PIN" "${STUBS[@]}"; do
  have "$requirement" || missing+=("$requirement")
done
if ((${#missing[@]})); then
  "$PYTHON" -m pip install --quiet "${missing[@]}"
fi

# Files and strictness come from pyproject.toml; no cache left in the tree.
"$PYTHON" -m mypy --cache-dir "${TMPDIR:-/tmp}/haltwise-mypy-cache"
