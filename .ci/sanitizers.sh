#!/usr/bin/env bash
# CI: builds haltwise with AddressSanitizer + UndefinedBehaviorSanitizer
# (CMake option HALTWISE_SANITIZE) into its own virtual environment and runs
# the scheduler and signal tests under it. Exits non-zero on any test failure
# or sanitizer report. Non-interactive (CI=true, no stdin needed).
#
# Environment (all optional):
#   SANITIZE_PYTHON   interpreter the venv is made from (default: python3)
#   SANITIZE_VENV     the venv (default: build/sanitize-venv); reused if it exists
#   SANITIZE_SYSTEM_SITE=1
#                     make the venv with --system-site-packages, reusing that
#                     interpreter's torch, numpy, pytest... (nothing is downloaded
#                     if they are there)
#   SANITIZE_TESTS    test files to run (default: the scheduler fuzz, the
#                     scheduler tests, the signal tests, the fork test)
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

python="${SANITIZE_PYTHON:-python3}"
venv="${SANITIZE_VENV:-$repo/build/sanitize-venv}"
tests="${SANITIZE_TESTS:-tests/test_scheduler_fuzz.py tests/test_scheduler.py tests/test_stop_table.py tests/test_signals.py tests/test_fork.py}"
start=$(date +%s)

if [ ! -x "$venv/bin/python" ]; then
  if [ "${SANITIZE_SYSTEM_SITE:-0}" = 1 ]; then
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
py="$venv/bin/python"
pip() { "$py" -m pip install --no-input --quiet "$@" </dev/null; }

# The CPU build of torch first: a bare `torch` requirement would pull CUDA wheels.
if ! "$py" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  pip "torch==2.13.0"
fi
for module in numpy pytest hypothesis scikit_build_core pybind11; do
  if ! "$py" -c "import $module" 2>/dev/null; then
    pip numpy "pytest>=7" "hypothesis>=6" "scikit-build-core>=0.10" "pybind11>=2.12"
    break
  fi
done

# The sanitized extension, in its own build directory (the normal build's is untouched).
pip --no-build-isolation --no-deps --force-reinstall "$repo" \
  --config-settings=cmake.define.HALTWISE_SANITIZE=ON \
  --config-settings=build-dir="$repo/build/sanitize-{wheel_tag}"

cxx="${CXX:-c++}"
asan="$("$cxx" -print-file-name=libasan.so)"
ubsan="$("$cxx" -print-file-name=libubsan.so)"
for lib in "$asan" "$ubsan"; do
  if [ ! -e "$lib" ]; then
    echo "sanitizers.sh: $lib not found (is $cxx the compiler that built the extension?)" >&2
    exit 2
  fi
done
# The installed extension must be the sanitized one.
so="$(cd / && "$py" -c 'import importlib.util as u; print(u.find_spec("haltwise._core").origin)')"
# ldd's output in a variable, not piped to `grep -q`: grep -q exits at the first match, ldd then dies of
# SIGPIPE if it is still writing, and pipefail turned that into a false "not linked" (seen under load).
deps="$(ldd "$so")"
if [[ "$deps" != *libasan* ]]; then
  echo "sanitizers.sh: $so is not linked with libasan" >&2
  exit 2
fi
# Run from a directory where ./python is not importable, so the installed,
# sanitized package is the one tested. LeakSanitizer is off: CPython and torch
# keep memory until exit by design.
log="$repo/build/sanitize-pytest.log"
cd "$repo/tests"
set +e
LD_PRELOAD="$asan:$ubsan" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
HALTWISE_SANITIZED=1 \
  "$py" -m pytest -q -p no:cacheprovider $(for t in $tests; do echo "$repo/$t"; done) 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if grep -qE "ERROR: AddressSanitizer|runtime error:|ERROR: UndefinedBehaviorSanitizer" "$log"; then
  echo "sanitizers.sh: sanitizer report(s) above" >&2
  status=1
fi
echo "sanitizers.sh: exit $status after $(( $(date +%s) - start )) s"
exit "$status"
