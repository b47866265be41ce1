"""Whole-file writes that readers never see half done and writers never share.

Every file moecomp writes whole is written to a sibling temporary file and renamed over the
target (``os.replace``, atomic on one file system). The temporary's name is unique to the
process and the call (pid and a random part), so two processes writing the same file at once
(study workers all writing ``study.json``) each rename a complete file of their own, instead of
one renaming the other's half-written temporary or finding it gone. A write that fails leaves
no temporary behind.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temp_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden name in ``path``'s folder; ``suffix`` ends it (``.tmp.png`` keeps a
    format matplotlib reads from the name)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}{suffix}")


def replace_atomically(path: Path, write: Callable[[Path], object], *, suffix: str = ".tmp"
                       ) -> Path:
    """Call ``write(tmp)`` to fill a temporary beside ``path``, then rename it over ``path``."""
    tmp = temp_beside(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_figure(fig: Any, path: Path, *, dpi: int) -> Path:
    """A matplotlib figure as a PNG at ``path`` (its folder made), written whole: a user
    opening the plot while a search redraws it never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi), suffix=".tmp.png")
