"""Model outputs of any structure, and the part of them fidelity is measured on.

Models return a tensor, a tuple / list (a named tuple too), a dict, or a dataclass-like
object (a ``@dataclass``, or a mapping with attribute access such as transformers'
``ModelOutput``). ``objectives.output`` names the part fidelity is measured on: a key, an
attribute or an index, dotted for nested outputs (``"pooler_output"``, ``"0"``,
``"hidden.1"``). Without it, the built-in divergences and the accuracy metric read
:func:`default_part`: the output itself if it is a tensor; else a ``logits`` entry when
there is one; else the first tensor inside (depth first). User callables get the whole
output, or the named part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from moecomp.errors import ConfigError


def _children(out: Any) -> list[tuple[str, Any]] | None:
    """Named children of a structured output, or None for a leaf."""
    if isinstance(out, torch.Tensor):
        return None
    if isinstance(out, Mapping):
        return [(str(k), v) for k, v in out.items()]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    if isinstance(out, tuple | list):
        fields = getattr(out, "_fields", None)  # a named tuple: names, and indices too
        if fields is not None:
            return list(zip(fields, out, strict=True))
        return [(str(i), v) for i, v in enumerate(out)]
    return None


def describe(out: Any, *, prefix: str = "") -> str:
    """The parts of an output, e.g. ``pooled (8, 256) float32, hidden (8, 32, 256) ...``."""
    if isinstance(out, torch.Tensor):
        dtype = str(out.dtype).replace("torch.", "")
        return f"{prefix or 'tensor'} {tuple(out.shape)} {dtype}"
    kids = _children(out)
    if kids is None:
        return f"{prefix or 'output'} {type(out).__name__}"
    return ", ".join(describe(v, prefix=f"{prefix}.{k}" if prefix else k) for k, v in kids)


def select(out: Any, path: str | None) -> Any:
    """The part of ``out`` named by ``path`` (dotted keys, attributes or indices), or ``out``
    itself when ``path`` is None. A missing part is a ConfigError on ``objectives.output``
    that lists the parts there are."""
    if path is None:
        return out
    cur = out
    for step in path.split("."):
        kids = _children(cur)
        found = False
        if kids is not None:
            for k, v in kids:
                if k == step:
                    cur, found = v, True
                    break
            if not found and isinstance(cur, tuple | list) and step.isdigit() and \
                    int(step) < len(cur):
                cur, found = cur[int(step)], True
        if not found:
            raise ConfigError("objectives.output", f"{path!r} names no part of the model's "
                              f"output; it has: {describe(out)}")
    return cur


def default_part(out: Any) -> torch.Tensor:
    """The tensor the built-in divergences and accuracy read (see the module docstring)."""
    if isinstance(out, torch.Tensor):
        return out
    kids = _children(out)
    if kids:
        for k, v in kids:
            if k == "logits" and isinstance(v, torch.Tensor):
                return v
        for _, v in kids:
            try:
                return default_part(v)
            except ConfigError:
                continue
    raise ConfigError("objectives.output", f"the model's output holds no tensor to compare "
                      f"({describe(out)}); name the part with objectives.output")


def map_tensors(out: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``out`` with ``fn`` applied to every tensor inside; other leaves are kept."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    kids = _children(out)
    if kids is None:
        return out
    mapped = [map_tensors(v, fn) for _, v in kids]
    return _rebuild(out, kids, mapped)


def _rebuild(out: Any, kids: list[tuple[str, Any]], values: list[Any]) -> Any:
    if isinstance(out, Mapping):
        keys = list(out.keys())
        try:
            cls: Any = type(out)
            return cls(zip(keys, values, strict=True))
        except TypeError:
            return dict(zip(keys, values, strict=True))
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return dataclasses.replace(out, **{k: v for (k, _), v in zip(kids, values,
                                                                    strict=True)})
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*values)
    return type(out)(values)


def named_tensors(out: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor inside ``out`` with its dotted path (``"output"`` for a bare tensor)."""
    if isinstance(out, torch.Tensor):
        return [(prefix or "output", out)]
    kids = _children(out)
    if kids is None:
        return []
    found = []
    for k, v in kids:
        found += named_tensors(v, f"{prefix}.{k}" if prefix else k)
    return found


def tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor inside ``out``, depth first."""
    found: list[torch.Tensor] = []
    map_tensors(out, found.append)
    return found


def cat(parts: list[Any], *, dim: int = 0) -> Any:
    """Outputs of consecutive sample batches joined along ``dim`` (the sample axis, or 1
    for outputs with a leading student axis). Non-tensor leaves come from the first part."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=dim)
    kids = _children(first)
    if kids is None:
        return first
    cols = [_children(p) or [] for p in parts]
    values = [cat([c[i][1] for c in cols], dim=dim) for i in range(len(kids))]
    return _rebuild(first, kids, values)


def take(out: Any, index: slice | int | torch.Tensor, *, dim: int = 0) -> Any:
    """``out`` with every tensor indexed along ``dim`` (``dim=0``: the student or sample
    axis)."""
    if dim == 0:
        return map_tensors(out, lambda t: t[index])
    return map_tensors(out, lambda t: t.index_select(dim, _as_index(index, t.shape[dim])))


def _as_index(index: slice | int | torch.Tensor, size: int) -> torch.Tensor:
    if isinstance(index, torch.Tensor):
        return index
    if isinstance(index, int):
        return torch.tensor([index])
    return torch.arange(size)[index]


def detach(out: Any) -> Any:
    return map_tensors(out, lambda t: t.detach())
