"""Helpers for the examples' tests (and the CLI tests that run the examples later).

Every example keeps its modules in its own folder under generic names (``data``, ``train``),
the way a user's project would, and moecomp imports a problem file's factories with that
folder on ``sys.path``. :func:`import_example` does the same for a test: it puts the example's
folder first on ``sys.path`` and first drops the modules another example loaded under the
same names, so ``data`` is always the data module of the example asked for.

Trained teachers: the ``*_teacher`` fixtures train once per test session into a temporary
folder through each example's ``train.ensure_teacher`` (which trains only when the file is
missing); call ``ensure_teacher()`` without a path for the repository's
``artifacts/examples/<name>/teacher.safetensors``, the file the problem files name.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def import_example(example: str, module: str) -> ModuleType:
    """Import ``examples/<example>/<module>.py`` as the top-level module ``module``."""
    folder = (EXAMPLES / example).resolve()
    if not (folder / f"{module}.py").is_file():
        raise FileNotFoundError(f"no module {module}.py in {folder}")
    own = {p.stem for p in folder.glob("*.py")}
    for name, mod in list(sys.modules.items()):
        file = getattr(mod, "__file__", None)
        if file is None:
            continue
        parent = Path(file).resolve().parent
        # another example's module, or one of this example's names loaded from elsewhere
        # (a copy of an example that moecomp imported from a test's problem folder)
        if parent != folder and (parent.parent == EXAMPLES or name in own):
            del sys.modules[name]
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve().parent != EXAMPLES]
    sys.path.insert(0, str(folder))
    return importlib.import_module(module)


@pytest.fixture(scope="session")
def convbn_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A convbn teacher trained for 150 steps (85.8 % test accuracy, ~17 s)."""
    train = import_example("convbn", "train")
    return train.ensure_teacher(tmp_path_factory.mktemp("convbn") / "teacher.safetensors")


@pytest.fixture(scope="session")
def dictinput_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fully trained dictinput teacher (a few seconds)."""
    train = import_example("dictinput", "train")
    return train.ensure_teacher(tmp_path_factory.mktemp("dictinput") / "teacher.safetensors")


@pytest.fixture(scope="session")
def transformer_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small-encoder teacher trained for 40 steps: a trained, non-random function to
    compress, which is all the CLI tests need (~1 CPU minute). Its record is measured on a
    test split of 64 sequences instead of 1,024 (the evaluation would cost more than the
    training); the teacher therefore also trains on segments of the full-size splits."""
    train = import_example("transformer", "train")
    data = import_example("transformer", "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "N_TEST", 64)
        return train.ensure_teacher(
            tmp_path_factory.mktemp("transformer") / "teacher.safetensors", size="small",
            steps=40)


@pytest.fixture(scope="session")
def example():
    """:func:`import_example` for tests (conftest modules cannot be imported by name)."""
    return import_example
