"""The CPU kernel's run-time dispatch picks the widest instruction set that the
CPU and its kernel support, judged independently here from /proc/cpuinfo: a
build whose dispatch silently falls back to the generic kernel (as a wheel
built with a compiler runtime that cannot detect CPU features did) fails."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from haltwise._native import core

AVX2_FLAGS = {"avx2", "fma", "f16c"}
AVX512_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512dq", "avx512vl"}
ORDER = ["generic", "avx2", "avx512"]

x86_linux = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")),
    reason="x86-64 Linux only: the SIMD kernels are x86 and the flags come from /proc/cpuinfo",
)


def cpuinfo_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    raise AssertionError("/proc/cpuinfo has no flags line")


def best_isa(flags: set[str]) -> str:
    if AVX512_FLAGS <= flags:
        return "avx512"
    if AVX2_FLAGS <= flags:
        return "avx2"
    return "generic"


def isa_in_subprocess(requested: str | None) -> str:
    env = dict(os.environ)
    env.pop("HALTWISE_CPU_ISA", None)
    if requested is not None:
        env["HALTWISE_CPU_ISA"] = requested
    # Loads the compiled module by its path alone: no torch import, so it is quick.
    script = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('haltwise._core', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "print(module.signals_cpu_isa())\n"
    )
    return subprocess.run([sys.executable, "-c", script, core().__file__], env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


@x86_linux
def test_default_dispatch_is_the_widest_the_cpu_runs():
    assert isa_in_subprocess(None) == best_isa(cpuinfo_flags())


@x86_linux
@pytest.mark.parametrize("requested", ORDER)
def test_requested_isa_is_used_when_the_cpu_runs_it(requested):
    best = best_isa(cpuinfo_flags())
    expected = requested if ORDER.index(requested) <= ORDER.index(best) else best
    assert isa_in_subprocess(requested) == expected


@x86_linux
def test_this_process_runs_what_the_environment_asks():
    # Under HALTWISE_CPU_ISA (as CI runs the signal tests once per instruction
    # set), the kernel this process dispatches to is the one asked for.
    best = best_isa(cpuinfo_flags())
    requested = os.environ.get("HALTWISE_CPU_ISA")
    if requested is None:
        assert core().signals_cpu_isa() == best
    else:
        assert requested in ORDER, f"HALTWISE_CPU_ISA={requested!r} names no kernel"
        assert ORDER.index(requested) <= ORDER.index(best), f"this CPU cannot run {requested}"
        assert core().signals_cpu_isa() == requested


def test_isa_name_is_known():
    assert core().signals_cpu_isa() in ORDER
