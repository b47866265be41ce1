"""Text the encoder example trains on, its word-level tokenizer and its vocabulary.

Nothing is downloaded: the text is CPython's own documentation as installed with Python 3.11,
read without importing anything:

* ``pydoc_data.topics``: the language-reference topics behind ``help("if")`` (~0.47 MB);
* the docstrings of the standard library's ``.py`` files, parsed with :mod:`ast` (~1.5 MB),
  skipping the parts Debian ships in separate packages (``test``, ``idlelib``, ``tkinter``,
  ``lib2to3``, ``distutils``, ``ensurepip``, ``turtledemo``, ``config-*``) and installed
  third-party code.

About 1.9 MB of text, 0.46 M tokens, 9.6 k distinct tokens on CPython 3.11.7. The result is a
deterministic function of the CPython version. Patch releases edit docstrings, enough to
reorder the frequency ranks: the vocabularies of 3.11.2 and 3.11.7 differ from id 10 on. So
``train.py`` records :func:`vocab_sha256` in the teacher's safetensors metadata and
``data.check_teacher`` compares it with the running CPython's.

Tokens: lowercase runs of letters, runs of digits, and every other non-space character on its
own. The vocabulary is ``SPECIALS`` followed by the most frequent tokens (ties broken
alphabetically); anything else maps to ``[UNK]``.

A *segment* is one paragraph (blank-line separated) of a document, cut into pieces of at most
``MAX_LEN - 1`` tokens (room for ``[CLS]``); pieces shorter than ``MIN_TOKENS`` are dropped
and repeated pieces (same ids) kept once, so no two segments of a split embed identically.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sysconfig
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[MASK]")
PAD, UNK, CLS, MASK = 0, 1, 2, 3
# 8,192 ids cover 99.7 % of the corpus's tokens; the corpus has only ~9.6 k distinct tokens,
# so a larger table would hold rows no training step ever touches.
VOCAB_SIZE = 8192
# Longest sequence in tokens, [CLS] included (the encoders' position table has this many rows).
MAX_LEN = 48
MIN_TOKENS = 5
TOKEN_RE = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")
# Top-level stdlib folders left out: not part of Debian's libpython3.11-stdlib, or not ours.
SKIP_DIRS = frozenset({"test", "idlelib", "tkinter", "lib2to3", "distutils", "ensurepip",
                       "turtledemo", "site-packages", "dist-packages", "__pycache__"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def tokenize(text: str) -> list[str]:
    """Lowercase word / number / punctuation tokens of ``text``."""
    return TOKEN_RE.findall(text.lower())


def stdlib_docstrings(lib: Path | None = None) -> list[str]:
    """Docstrings of every module, class and function of the stdlib under ``lib``, in sorted
    file order and :func:`ast.walk` order within a file (the running Python's stdlib by
    default)."""
    lib = Path(sysconfig.get_paths()["stdlib"]) if lib is None else lib
    docs = []
    for path in sorted(lib.rglob("*.py")):
        folders = path.relative_to(lib).parts[:-1]
        if SKIP_DIRS.intersection(folders) or any(f.startswith("config-") for f in folders):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue  # a stray non-Python-3.11 file (none in CPython 3.11.7); not text we need
        for node in ast.walk(tree):
            if isinstance(node, _DOC_NODES):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    return docs


@lru_cache(maxsize=1)
def documents() -> tuple[str, ...]:
    """The corpus as documents: pydoc topics (sorted by name), then stdlib docstrings.

    Memoised: parsing the stdlib takes ~4 s on one core.
    """
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return tuple(topics[k] for k in sorted(topics)) + tuple(stdlib_docstrings())


def corpus_sha256(docs: Sequence[str]) -> str:
    """Hash of the documents, to tell whether two machines read the same text."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def build_vocab(docs: Sequence[str], size: int = VOCAB_SIZE) -> tuple[str, ...]:
    """``SPECIALS`` then the ``size - len(SPECIALS)`` most frequent tokens of ``docs``
    (frequency descending, ties alphabetical, so the order never depends on dict order)."""
    if size <= len(SPECIALS):
        raise ValueError(f"vocabulary size must exceed {len(SPECIALS)}, got {size}")
    counts = Counter(t for d in docs for t in tokenize(d))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return SPECIALS + tuple(t for t, _ in ranked[: size - len(SPECIALS)])


@lru_cache(maxsize=1)
def vocab() -> tuple[str, ...]:
    """The example's vocabulary (``VOCAB_SIZE`` tokens) built from :func:`documents`."""
    return build_vocab(documents(), VOCAB_SIZE)


def vocab_sha256(tokens: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(tokens)).encode("utf-8")).hexdigest()


def encode(text: str, tokens: Sequence[str]) -> list[int]:
    """Token ids of ``text`` under the vocabulary ``tokens`` (no [CLS], no padding)."""
    index = {t: i for i, t in enumerate(tokens)}
    return [index.get(t, UNK) for t in tokenize(text)]


def build_segments(docs: Sequence[str], tokens: Sequence[str], *, max_len: int = MAX_LEN,
                   min_tokens: int = MIN_TOKENS) -> list[tuple[int, ...]]:
    """Unique paragraph pieces of ``docs`` as id tuples of ``min_tokens..max_len - 1`` ids,
    in corpus order (first occurrence kept)."""
    index = {t: i for i, t in enumerate(tokens)}
    width = max_len - 1
    seen: dict[tuple[int, ...], None] = {}
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc):
            ids = [index.get(t, UNK) for t in tokenize(para)]
            for i in range(0, len(ids), width):
                piece = tuple(ids[i:i + width])
                if len(piece) >= min_tokens:
                    seen.setdefault(piece, None)
    return list(seen)


@lru_cache(maxsize=1)
def segments() -> tuple[tuple[int, ...], ...]:
    """All segments of the corpus under :func:`vocab` (~16 k on CPython 3.11.7)."""
    return tuple(build_segments(documents(), vocab()))


def pad(segs: Sequence[Sequence[int]], *, length: int | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS]`` + ids, right-padded with ``[PAD]`` to ``length`` (default: longest + 1).

    Returns ``input_ids`` int64 (n, length) and ``attention_mask`` int64 (n, length), 1 on
    real tokens ([CLS] included), 0 on padding.
    """
    longest = 1 + max((len(s) for s in segs), default=0)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"pad length {length} is shorter than the longest sequence {longest}")
    ids = torch.full((len(segs), length), PAD, dtype=torch.int64)
    mask = torch.zeros((len(segs), length), dtype=torch.int64)
    for row, seg in enumerate(segs):
        ids[row, 0] = CLS
        ids[row, 1:1 + len(seg)] = torch.tensor(seg, dtype=torch.int64)
        mask[row, :1 + len(seg)] = 1
    return ids, mask
