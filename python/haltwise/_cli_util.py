"""Checks the command line runs before any work: a bad argument is one line
on stderr and exit code 2, found before a run whose results it would lose."""
from __future__ import annotations

from pathlib import Path


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
