#!/usr/bin/env bash
# The Triton-dependent tests under Triton 3.6 (the CUDA test machine's
# version), in a fresh venv; the Triton that pip resolves is covered by the
# main test run (.ci/run). Without a GPU the kernels run under the Triton
# interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
#
#   bash .ci/triton_versions.sh [WHEEL_OR_DIR]
#
# WHEEL_OR_DIR: a haltwise wheel (*.whl) to install, or a source tree to build
# and install (default: this repository). PYTHON: the interpreter the venv is
# made from (default: python3). The venv is build/triton-3.6/ (recreated each
# run). Non-interactive; exits non-zero on any failure, including a pytest run
# that collected no tests (exit code 5).
set -euo pipefail
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${1:-$REPO}
TRITON_VERSION=3.6.0
VENV=$REPO/build/triton-3.6
if [[ $TARGET != *.whl && ! -f $TARGET/pyproject.toml ]]; then
  echo "triton_versions.sh: WHEEL_OR_DIR must be a .whl file or a source tree with pyproject.toml, got '$TARGET'" >&2
  exit 2
fi
TARGET=$(cd "$(dirname "$TARGET")" && pwd)/$(basename "$TARGET")  # absolute: the tests run from $REPO

rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
PY=$VENV/bin/python
# The CPU build of torch first: a bare `torch` requirement would pull CUDA wheels.
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet "triton==$TRITON_VERSION" "pytest>=7"
if [[ $TARGET == *.whl ]]; then
  "$PY" -m pip install --quiet --only-binary haltwise "$TARGET"
else
  "$PY" -m pip install --quiet "$TARGET"
fi

# From the repository root ./python is not importable: the installed package is what runs.
cd "$REPO"
"$PY" - "$TRITON_VERSION" <<'EOF'
import sys
import haltwise, torch, triton
assert triton.__version__ == sys.argv[1], f"triton {triton.__version__} installed, expected {sys.argv[1]}"
assert "site-packages" in haltwise.__file__, f"haltwise imported from {haltwise.__file__}, not the venv"
print(f"triton {triton.__version__}, torch {torch.__version__}, haltwise from {haltwise.__file__}")
EOF
# Every test of test_signals_triton.py (it compares with the native backend too)
# and the Triton tests of test_signals.py; the rest does not depend on Triton.
"$PY" -m pytest -q -p no:cacheprovider tests/test_signals_triton.py tests/test_signals.py -k triton
echo "triton_versions.sh: Triton $TRITON_VERSION tests passed"
