"""The committed type stub of the compiled extension matches what
tools/gen_stubs.py (pybind11-stubgen) makes of the installed one, and the
package says it is typed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import haltwise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(sys.version_info < (3, 10), reason="pybind11-stubgen 3 needs Python 3.10+ (the test extra "
                    "installs it only there); newer Pythons check the stub")
def test_core_stub_is_fresh(tmp_path):
    out = tmp_path / "_core.pyi"
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gen_stubs.py"), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(os.path.join(REPO, "python", "haltwise", "_core.pyi")) as f:
        committed = f.read()
    assert out.read_text() == committed, "python/haltwise/_core.pyi is stale: run python tools/gen_stubs.py"


def test_stub_types_every_native_attribute():
    """The stub declares each public name of _core, and the attributes of its
    hand-written classes (which pybind11-stubgen alone cannot see)."""
    from haltwise import _core

    with open(os.path.join(REPO, "python", "haltwise", "_core.pyi")) as f:
        stub = f.read()
    for name in dir(_core):
        if not name.startswith("_"):
            assert f"'{name}'" in stub.split("\n__all__", 1)[1].split("\n", 1)[0], name
    for attribute in ("request_id", "reason", "tokens", "signals"):
        assert f"def {attribute}(self) ->" in stub
    for attribute in ("finished", "keep", "admitted", "request_ids", "positions", "active", "free_slots"):
        assert f"def {attribute}(self) ->" in stub


def test_installed_package_is_typed():
    """py.typed and _core.pyi travel with the installed package (PEP 561)."""
    package = os.path.dirname(haltwise.__file__)
    assert os.path.isfile(os.path.join(package, "py.typed"))
    assert os.path.isfile(os.path.join(package, "_core.pyi"))
