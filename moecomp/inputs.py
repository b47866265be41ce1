"""Model inputs of any structure: what a teacher is called with.

A model's inputs for ``n`` samples are one of

- a tensor ``(n, ...)``: ``model(x)``;
- a tuple of tensors, each ``(n, ...)``: positional arguments, ``model(*xs)``;
- a dict of tensors, each ``(n, ...)``: keyword arguments, ``model(**kw)``.

Every tensor shares the leading (sample) dimension. The functions here are the only place
that knows the three forms: everything downstream of the Target takes ``Inputs`` and calls
:func:`call` / :func:`functional`, so nothing assumes one input tensor.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from moecomp.errors import DataError

Inputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
"""A model's inputs for a batch of samples (see the module docstring)."""

Index = slice | torch.Tensor
"""Samples to take: a slice, or an int64 index tensor ``(m,)``."""


def leaves(inputs: Inputs) -> list[tuple[str, torch.Tensor]]:
    """The tensors of ``inputs`` with stable names: ``""`` for a single tensor, ``"0"``,
    ``"1"``, ... for positional arguments, the keys (in order) for keyword arguments."""
    if isinstance(inputs, torch.Tensor):
        return [("", inputs)]
    if isinstance(inputs, tuple):
        return [(str(i), t) for i, t in enumerate(inputs)]
    return list(inputs.items())


def rebuild(inputs: Inputs, tensors: list[torch.Tensor]) -> Inputs:
    """``inputs``' structure with its tensors replaced by ``tensors`` (same order as
    :func:`leaves`)."""
    if isinstance(inputs, torch.Tensor):
        return tensors[0]
    if isinstance(inputs, tuple):
        return tuple(tensors)
    return dict(zip(inputs.keys(), tensors, strict=True))


def map_inputs(inputs: Inputs, fn: Any) -> Inputs:
    """``inputs`` with ``fn`` applied to every tensor."""
    return rebuild(inputs, [fn(t) for _, t in leaves(inputs)])


def check(inputs: Any, where: str) -> int:
    """The number of samples of ``inputs``; a :class:`DataError` naming ``where`` when it is
    not a tensor, a non-empty tuple or dict of tensors sharing the leading dimension."""
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if isinstance(inputs, torch.Tensor):
        parts = [("", inputs)]
    elif isinstance(inputs, tuple | dict) and len(inputs) > 0:
        if isinstance(inputs, dict) and not all(isinstance(k, str) for k in inputs):
            raise DataError(f"{where}: the keys of a dict of inputs must be strings "
                            f"(keyword arguments), got {list(inputs)!r}")
        parts = leaves(inputs)
        bad = [k for k, t in parts if not isinstance(t, torch.Tensor)]
        if bad:
            raise DataError(f"{where}: every input must be a tensor; "
                            f"{_label(bad[0])} is {type(dict(parts)[bad[0]]).__name__}")
    else:
        raise DataError(f"{where}: inputs must be a tensor, a tuple of tensors (positional "
                        f"arguments) or a dict of tensors (keyword arguments); got "
                        f"{type(inputs).__name__}")
    if any(t.dim() == 0 for _, t in parts):
        raise DataError(f"{where}: inputs need a leading sample dimension; got "
                        f"{describe(rebuild_any(inputs, parts))}")
    sizes = {int(t.shape[0]) for _, t in parts}
    if len(sizes) != 1:
        raise DataError(f"{where}: the inputs do not share the leading (sample) dimension: "
                        f"{describe(rebuild_any(inputs, parts))}")
    return sizes.pop()


def rebuild_any(inputs: Any, parts: list[tuple[str, Any]]) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return inputs
    if isinstance(inputs, tuple):
        return tuple(t for _, t in parts)
    return dict(parts)


def normalise(inputs: Any) -> Inputs:
    """A list of tensors becomes a tuple (positional arguments); other forms are kept."""
    return tuple(inputs) if isinstance(inputs, list) else inputs


def n_samples(inputs: Inputs) -> int:
    """Leading dimension shared by every tensor of ``inputs``."""
    return int(leaves(inputs)[0][1].shape[0])


def take(inputs: Inputs, index: Index) -> Inputs:
    """The samples ``index`` (a slice or an index tensor) of every tensor."""
    return map_inputs(inputs, lambda t: t[index])


def head(inputs: Inputs, n: int) -> Inputs:
    """The first ``n`` samples (all of them when there are fewer)."""
    return take(inputs, slice(0, n))


def batches(inputs: Inputs, batch_size: int) -> Iterator[tuple[int, Inputs]]:
    """``(start, batch)`` over consecutive batches of at most ``batch_size`` samples."""
    n = n_samples(inputs)
    for s in range(0, n, max(1, batch_size)):
        yield s, take(inputs, slice(s, s + batch_size))


def repeat(inputs: Inputs, p: int) -> Inputs:
    """Every tensor repeated ``p`` times along the sample axis: ``(p * n, ...)``, the
    inputs of ``p`` students stacked sample-wise."""
    return map_inputs(inputs, lambda t: t.repeat(p, *([1] * (t.dim() - 1))))


def cat(parts: list[Inputs]) -> Inputs:
    """Concatenate inputs of one structure along the sample axis."""
    names = [k for k, _ in leaves(parts[0])]
    cols = [torch.cat([dict(leaves(p))[k] for p in parts]) for k in names]
    return rebuild(parts[0], cols)


def to(inputs: Inputs, device: torch.device | str) -> Inputs:
    return map_inputs(inputs, lambda t: t.to(device))


def device_of(inputs: Inputs) -> torch.device:
    return leaves(inputs)[0][1].device


def nbytes(inputs: Inputs) -> int:
    """Bytes held by the tensors of ``inputs``."""
    return sum(t.numel() * t.element_size() for _, t in leaves(inputs))


def bytes_per_sample(inputs: Inputs) -> int:
    n = n_samples(inputs)
    return math.ceil(nbytes(inputs) / max(n, 1))


def _label(name: str) -> str:
    if name == "":
        return "input"
    return f"argument {name}" if name.isdigit() else f"{name!r}"


def describe(inputs: Inputs) -> str:
    """Shapes and dtypes, e.g. ``input_ids (256, 32) int64, attention_mask (256, 32) int64``."""
    out = []
    for k, t in leaves(inputs):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else "?"
        dtype = str(t.dtype).replace("torch.", "") if isinstance(t, torch.Tensor) else \
            type(t).__name__
        out.append(f"{_label(k)} {shape} {dtype}")
    return ", ".join(out)


def names(inputs: Inputs) -> list[str]:
    """Names for the inputs of an exported graph: the keyword names, or ``input`` /
    ``input_0``, ``input_1``, ..."""
    if isinstance(inputs, torch.Tensor):
        return ["input"]
    if isinstance(inputs, tuple):
        return [f"input_{i}" for i in range(len(inputs))]
    return list(inputs)


def call(model: nn.Module | Any, inputs: Inputs, *, layout: bool = True) -> Any:
    """``model`` called on ``inputs``: one tensor, positional or keyword arguments. A module
    with 2-D convolutions on the CPU runs them channels-last (:func:`channels_last`) unless
    ``layout`` is False (the model's own tensors, as they are, read where the forward reads
    them)."""
    if layout and isinstance(model, nn.Module) and _conv2d_weights(model):
        fast = channels_last(model, {})
        if fast:
            return functional(model, fast, inputs)
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(**inputs)


def functional(model: nn.Module, params: dict[str, torch.Tensor], inputs: Inputs) -> Any:
    """``torch.func.functional_call`` of ``model`` with ``params`` on ``inputs``; 2-D
    convolution weights on the CPU go channels-last (:func:`channels_last`)."""
    fast = channels_last(model, params)
    if fast:  # else the caller's dict as it is (no copy per call on a model without convs)
        params = {**params, **fast}
    if isinstance(inputs, torch.Tensor):
        return torch.func.functional_call(model, params, (inputs,))
    if isinstance(inputs, tuple):
        return torch.func.functional_call(model, params, inputs)
    return torch.func.functional_call(model, params, (), inputs)


_CONV2D: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[str, ...], ...]] = \
    weakref.WeakKeyDictionary()


def _conv2d_weights(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    """The weights of ``model``'s ``nn.Conv2d`` modules (found once per model), each as the
    names of one parameter: all names it has in the model (one, unless it is tied)."""
    groups = _CONV2D.get(model)
    if groups is None:
        names: dict[int, list[str]] = {}
        for name, t in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(t), []).append(name)
        convs = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)}
        groups = tuple(tuple(names[i]) for i in names if i in convs)
        _CONV2D[model] = groups
    return groups


def channels_last(model: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``nn.Conv2d`` weights of ``model`` (from ``params``, else the module's own) that
    are on the CPU and not channels-last yet, as channels-last copies under every name they
    have: oneDNN's convolution then runs in that layout, about 2x faster for LeNet-5 on one
    thread (the same values up to float rounding; docs/decisions.md). Tensors inside a
    ``torch.func`` transform (vmap) are left as they are; none inside :func:`own_layout`."""
    if not _LAYOUT[0]:
        return {}
    out: dict[str, torch.Tensor] = {}
    for names in _conv2d_weights(model):
        given = [params[n] for n in names if n in params]
        w = given[0] if given else model.get_parameter(names[0])
        if any(g is not w for g in given) or w.device.type != "cpu" or w.dim() != 4 or \
                torch._C._functorch.is_functorch_wrapped_tensor(w):
            continue  # tied names given different values: functional_call says so
        strides = _channels_last_strides(w.shape)
        if w.stride() != strides:  # a copy autograd sees through (fine-tuning)
            copy = torch.empty_strided(w.shape, strides, dtype=w.dtype).copy_(w)
            out |= dict.fromkeys(names, copy)
    return out


_LAYOUT = [True]


@contextmanager
def own_layout() -> Iterator[None]:
    """While active, convolutions run in the layout of the tensors given (no channels-last
    copies): the way before, for benchmarks that measure the difference."""
    before = _LAYOUT[0]
    _LAYOUT[0] = False
    try:
        yield
    finally:
        _LAYOUT[0] = before


def _channels_last_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a channels-last tensor ``(n, c, h, w)``. Set exactly: with one channel
    an NCHW tensor also counts as channels-last contiguous (``.contiguous`` leaves it), but
    convolution picks its layout from the strides, so such a weight would still run NCHW."""
    _, c, h, w = shape
    return (c * h * w, 1, w * c, c)


def args_kwargs(inputs: Inputs) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Positional and keyword arguments of ``inputs``."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, tuple):
        return inputs, {}
    return (), dict(inputs)
