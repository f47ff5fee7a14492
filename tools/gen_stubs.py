"""Regenerates python/haltwise/_core.pyi, the type stub of the compiled
extension, with pybind11-stubgen (the `test` extra pins it).

    python tools/gen_stubs.py            # rewrite the committed stub
    python tools/gen_stubs.py --check    # exit 1 if the committed stub is stale
    python tools/gen_stubs.py --output F # write the stub to F instead

It stubs the haltwise._core that Python imports (build and install first:
`pip install -e .`). pybind11-stubgen types everything bound with pybind11
from its signatures. It cannot type the attributes of a class written
directly against the CPython API (its read-only attributes are C getset
descriptors, which carry no signature): for such a class this script adds one
typed property per descriptor, the type taken from the annotation of the same
name on the public class it is registered under (haltwise.StepPlan,
haltwise.Finished), and fails if a descriptor has no annotation there.
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUB = os.path.join(REPO, "python", "haltwise", "_core.pyi")
MODULE = "haltwise._core"
# Names the public classes' annotations use, as the stub imports them.
EXTRA_IMPORTS = ["import numpy as np", "import numpy.typing as npt", "from haltwise.scheduler import StopReason"]


def stubgen_text() -> str:
    """pybind11-stubgen's stub of haltwise._core, as text."""
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pybind11_stubgen", MODULE, "--exit-code", "-o", tmp],
            capture_output=True, text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"pybind11-stubgen failed:\n{done.stdout}{done.stderr}")
        with open(os.path.join(tmp, *MODULE.split(".")) + ".pyi") as f:
            return f.read()


def getset_classes() -> dict[str, list[tuple[str, str]]]:
    """{class name: [(attribute, annotation)]} of the classes of _core whose
    attributes are C getset descriptors, in their definition order."""
    from haltwise import scheduler  # registers the native classes under the public ABCs

    scheduler._core()
    core = importlib.import_module(MODULE)
    public = [scheduler.StepPlan, scheduler.Finished]
    out: dict[str, list[tuple[str, str]]] = {}
    for name, cls in vars(core).items():
        if not isinstance(cls, type):
            continue
        getsets = [a for a, v in vars(cls).items() if isinstance(v, types.GetSetDescriptorType) and not a.startswith("__")]
        if not getsets:
            continue
        owners = [p for p in public if issubclass(cls, p)]
        if len(owners) != 1:
            raise SystemExit(f"{MODULE}.{name}: no public class it is registered under, to take its types from")
        hints = {}
        for klass in reversed(owners[0].__mro__):
            hints.update(getattr(klass, "__annotations__", {}))
        missing = [a for a in getsets if a not in hints]
        if missing:
            raise SystemExit(f"{MODULE}.{name}: {owners[0].__qualname__} does not annotate {missing}")
        out[name] = [(a, str(hints[a])) for a in getsets]
    return out


def add_properties(text: str, classes: dict[str, list[tuple[str, str]]]) -> str:
    """Appends the typed read-only properties to each class block of `classes`."""
    lines = text.splitlines()
    for name, attributes in classes.items():
        start = lines.index(f"class {name}:")
        end = start + 1
        while end < len(lines) and (lines[end].startswith(" ") or not lines[end]):
            end += 1
        block = []
        for attribute, annotation in attributes:
            block += ["    @property", f"    def {attribute}(self) -> {annotation}:", "        ..."]
        lines[end:end] = block
    if classes:
        anchor = max(i for i, line in enumerate(lines) if line.startswith(("import ", "from ")))
        lines[anchor + 1:anchor + 1] = EXTRA_IMPORTS
    return "\n".join(lines) + "\n"


def generate() -> str:
    return add_properties(stubgen_text(), getset_classes())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed stub differs")
    parser.add_argument("--output", default=STUB, help=f"where to write (default {os.path.relpath(STUB, REPO)})")
    args = parser.parse_args()
    text = generate()
    if args.check:
        with open(STUB) as f:
            if f.read() != text:
                print(f"{os.path.relpath(STUB, REPO)} is stale: run python tools/gen_stubs.py", file=sys.stderr)
                return 1
        return 0
    with open(args.output, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
