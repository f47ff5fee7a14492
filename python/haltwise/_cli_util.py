"""Checks the command line runs before any work: a bad argument is one line
on stderr and exit code 2, found before a run whose results it would lose."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class CliError(Exception):
    """A user error in the command line: printed as one line, exit code 2."""


def check_output(option: str, path: str | None) -> None:
    """Raise CliError unless `path` can be written (its folder is created).
    A file that did not exist is removed again after the probe."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise CliError(f"{option} {path}: is a directory, expected a file path")
    existed = target.exists()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "ab"):
            pass
    except OSError as e:
        raise CliError(f"{option} {path}: cannot be written ({e.strerror or e})") from None
    if not existed:
        target.unlink()


def check_plot(option: str, path: str | None) -> None:
    """A plot needs matplotlib, which a plain install lacks: say so before the run."""
    if not path:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError(f"{option} {path}: plotting needs matplotlib, which is not installed "
                       f"(pip install matplotlib, or drop {option})") from None
    check_output(option, path)


def json_default(value):
    """``json.dumps(default=...)`` of the command line's JSON output: numpy
    values become JSON values (a numpy bool a JSON bool, not the string
    "True"); anything else raises TypeError."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"json_default: {type(value).__name__} is not JSON serialisable")
