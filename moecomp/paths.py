"""Checks of paths the user names on the command line, before any work is done: a missing
file, a folder where a file is expected, an output folder that does not exist or anything
unreadable becomes one ``PathError`` that names the option and the path."""

from __future__ import annotations

import os
from pathlib import Path

from moecomp.errors import PathError


def input_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` if it is a readable file; PathError otherwise. ``what``: the argument's name."""
    p = Path(path)
    if not p.exists():
        raise PathError(f"{what} {p}: no such file")
    if p.is_dir():
        raise PathError(f"{what} {p}: is a folder, expected a file")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise PathError(f"{what} {p}: cannot be read ({e.strerror})") from None
    return p


def input_folder(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` if it is a folder; PathError otherwise."""
    p = Path(path)
    if not p.exists():
        raise PathError(f"{what} {p}: no such folder")
    if not p.is_dir():
        raise PathError(f"{what} {p}: is a file, expected a folder")
    return p


def output_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` if a file can be written there: its folder exists and is writable, and the
    path is not a folder. PathError otherwise (nothing is created)."""
    p = Path(path)
    parent = p.parent
    if p.is_dir():
        raise PathError(f"{what} {p}: is a folder, expected a file name")
    if not parent.exists():
        raise PathError(f"{what} {p}: folder {parent} does not exist")
    if not parent.is_dir():
        raise PathError(f"{what} {p}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PathError(f"{what} {p}: folder {parent} is not writable")
    return p
