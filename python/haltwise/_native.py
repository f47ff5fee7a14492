"""Loads the compiled extension ``haltwise._core`` once, on first use, with an
error that says how to build it."""
from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def core() -> ModuleType:
    try:
        from . import _core
    except ImportError as err:  # pragma: no cover - only on a broken install
        raise ImportError(
            "haltwise._core (the compiled extension) could not be imported; "
            "install haltwise with `pip install .` from the repository root"
        ) from err
    return _core
