"""User code named by a problem file: ``"package.module:function"`` references.

A problem file may name a model factory, a data factory, a divergence and a metric. They are
*code*: importing and calling them runs whatever the module does (README, "Security"). A
reference is resolved from the problem file's folder first (a ``module.py`` or ``module/``
package there), then from ``sys.path`` (``PYTHONPATH``, installed packages). Modules of
different problem folders may share a name (two examples each with a ``data.py``): each
folder's module is imported once and kept apart.

Every failure is a :class:`~moecomp.errors.ConfigError` naming the field, the reference, where
it was looked for and the module's own error, with what to do about it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moecomp.errors import ConfigError

_FROM_FOLDER: dict[tuple[str, str], types.ModuleType] = {}
"""Modules imported from a problem folder: (folder, top-level name) -> module."""


def _in_folder(folder: Path, top: str) -> bool:
    return (folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file()


class _Clash(Exception):
    """A module of the same name is already imported from elsewhere."""


def _inside(module: types.ModuleType, folder: Path) -> bool:
    origin = getattr(module, "__file__", None)
    return origin is not None and Path(origin).resolve().is_relative_to(folder)


def _import_from_folder(folder: Path, mod_name: str) -> types.ModuleType:
    """Import ``mod_name``, whose top-level module lives in ``folder``, kept apart from
    same-named modules of other problem folders."""
    top = mod_name.split(".")[0]
    current = sys.modules.get(top)
    if current is not None and not _inside(current, folder):
        if not any(current is m for m in _FROM_FOLDER.values()):
            raise _Clash(f"a module named {top!r} is already imported from "
                         f"{getattr(current, '__file__', None) or 'a built-in'}; rename the "
                         f"module in {folder}")
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]
    # First on the path while importing (so this folder's module wins), then last, so that
    # the module's own later imports of its siblings work without shadowing anything else.
    entry = str(folder)
    while entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(0, entry)
    try:
        module = importlib.import_module(mod_name)
    finally:
        sys.path.remove(entry)
        sys.path.append(entry)
    _FROM_FOLDER[(entry, top)] = sys.modules[top]
    return module


def resolve(ref: str, field: str, *, folder: str | Path | None = None) -> Callable[..., Any]:
    """The callable ``package.module:function`` names, imported from ``folder`` (the problem
    file's) or ``sys.path``."""
    mod_name, _, attr = ref.partition(":")
    top = mod_name.split(".")[0]
    where = Path(folder).resolve() if folder is not None else None
    looked = f"{where} and PYTHONPATH" if where is not None else "PYTHONPATH"
    try:
        if where is not None and _in_folder(where, top):
            module = _import_from_folder(where, mod_name)
        else:
            module = importlib.import_module(mod_name)
    except _Clash as e:
        raise ConfigError(field, f"cannot import {mod_name!r} for {ref!r}: {e}") from None
    except ModuleNotFoundError as e:
        if e.name is not None and mod_name.startswith(e.name) or e.name == top:
            raise ConfigError(field, f"cannot import {mod_name!r} for {ref!r}: no such module "
                              f"in {looked}. Put the module next to the problem file or add "
                              "its folder to PYTHONPATH") from None
        raise ConfigError(field, f"importing {mod_name!r} for {ref!r} failed: "
                          f"ModuleNotFoundError: {e}. Install what it imports") from None
    except Exception as e:  # the user's module may raise anything while it is imported
        raise ConfigError(field, f"importing {mod_name!r} for {ref!r} failed: "
                          f"{type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(field, f"module {mod_name!r} ({getattr(module, '__file__', '?')}) "
                          f"has no {attr!r}")
    if not callable(fn):
        raise ConfigError(field, f"{ref!r} is a {type(fn).__name__}, not a function")
    return fn  # type: ignore[no-any-return]


def call(ref: str, field: str, *, folder: str | Path | None = None) -> Any:
    """Resolve ``ref`` and call it without arguments; its failure is a ConfigError on
    ``field`` carrying the factory's own error."""
    fn = resolve(ref, field, folder=folder)
    try:
        return fn()
    except Exception as e:  # a user factory may raise anything
        raise ConfigError(field, f"{ref}() failed: {type(e).__name__}: {e}") from None
