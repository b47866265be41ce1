"""User code named by a problem file: ``"package.module:function"`` references.

A problem file may name a model factory, a data factory, a divergence and a metric. They are
*code*: importing and calling them runs whatever the module does (README, "Security"). A
reference is resolved from the problem file's folder first (a ``module.py`` or ``module/``
package there), then from ``sys.path`` (``PYTHONPATH``, installed packages). Modules of
different problem folders may share a name (two examples each with a ``data.py``): each
problem gets its own folder's module (the other is forgotten by ``sys.modules``; a library
module of that name is never replaced: that is an error asking for a rename).

Every failure is a :class:`~moecomp.errors.ConfigError` naming the field, the reference, where
it was looked for and the module's own error, with what to do about it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import sysconfig
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moecomp.errors import ConfigError

_FOLDERS: list[str] = []
"""Problem folders modules were imported from, in order (for worker processes)."""


def user_folders() -> list[str]:
    """The problem folders user factories were imported from so far in this process."""
    return list(_FOLDERS)


def _in_folder(folder: Path, top: str) -> bool:
    return (folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file()


class _Clash(Exception):
    """A library module has the name of a module in the problem folder."""


def _inside(module: types.ModuleType, folder: Path) -> bool:
    origin = getattr(module, "__file__", None)
    return origin is not None and Path(origin).resolve().is_relative_to(folder)


def _is_library(module: types.ModuleType) -> bool:
    """Built-in, standard library or installed: never replaced by a problem folder's."""
    origin = getattr(module, "__file__", None)
    if origin is None:
        return True
    paths = sysconfig.get_paths()
    roots = {Path(paths[k]).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    where = Path(origin).resolve()
    return any(where.is_relative_to(r) for r in roots)


def _import_from_folder(folder: Path, mod_name: str) -> types.ModuleType:
    """Import ``mod_name``, whose top-level module lives in ``folder``. A module of the same
    name imported from elsewhere (another problem folder's ``data.py``) is forgotten first, so
    each folder gets its own modules; the module's imports of its siblings too."""
    here = {p.stem for p in folder.glob("*.py")} | {
        p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] not in here or mod is None or _inside(mod, folder):
            continue
        if _is_library(mod):
            raise _Clash(f"{folder} has a module {name.split('.')[0]!r}, the name of "
                         f"{getattr(mod, '__file__', None) or 'a built-in module'}; rename it")
        del sys.modules[name]
    # On the path only while importing (first, so this folder's module wins): a module left
    # on sys.path would shadow same-named modules of every later problem.
    entry = str(folder)
    if entry not in _FOLDERS:
        _FOLDERS.append(entry)
    sys.path.insert(0, entry)
    try:
        return importlib.import_module(mod_name)
    finally:
        sys.path.remove(entry)


def _forget_other_folders(top: str) -> None:
    """Forget a module ``top`` imported from a problem folder: a problem whose own folder
    lacks it must not silently get another problem's."""
    for name, mod in list(sys.modules.items()):
        if (name == top or name.startswith(top + ".")) and mod is not None and any(
                _inside(mod, Path(f)) for f in _FOLDERS):
            del sys.modules[name]


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
            _forget_other_folders(top)
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
