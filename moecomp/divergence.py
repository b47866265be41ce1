"""Teacher-student divergence: the fidelity objective.

A divergence compares a student's outputs with the teacher's, sample by sample: zero means
the student reproduces the teacher. The search minimises its mean over the calibration
samples.

Built-ins (they read :func:`moecomp.outputs.default_part` of the output, or the part named
by ``objectives.output``; outputs ``(n, ...)``):

- ``kl``: KL(teacher || student) of the softmax over the last axis, in nats, averaged over
  any axes between the sample axis and the last (e.g. the tokens of ``(n, T, V)`` logits);
- ``nmse``: squared error averaged over a sample's values, divided by the mean square of the
  teacher's outputs over the calibration set (one constant, fitted once; unitless);
- ``cosine``: 1 - cosine similarity of each sample's flattened output, in [0, 2].

A user divergence is ``"package.module:function"``: ``fn(teacher_out, student_out) ->
Tensor (n,)`` on one student's outputs for ``n`` samples (the whole output as the model
returns it, or the part ``objectives.output`` names). It must return a float tensor of
shape ``(n,)``; anything else is refused with the shapes it got.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from moecomp import outputs
from moecomp.errors import ConfigError, TargetError

DIVERGENCES = ("kl", "nmse", "cosine")

PerSample = Callable[[Any, Any], torch.Tensor]
"""``fn(teacher_out, student_out) -> (n,)``: a user divergence."""


def _reduce_sample(v: torch.Tensor, lead: int) -> torch.Tensor:
    """Mean over every axis after the sample axis ``lead`` (``v: (*lead, n, ...)``)."""
    dims = tuple(range(lead + 1, v.dim()))
    return v.mean(dim=dims) if dims else v


def kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(teacher || student) of the softmax over the last axis, in nats.

    t: ``(n, ..., c)`` teacher logits; s: ``(*lead, n, ..., c)`` student logits (``lead``
    axes of students allowed). Returns ``(*lead, n)``.
    """
    lead = s.dim() - t.dim()
    lt = torch.log_softmax(t.float(), dim=-1)
    ls = torch.log_softmax(s.float(), dim=-1)
    per = (lt.exp() * (lt - ls)).sum(-1)
    return _reduce_sample(per, lead)


def nmse(t: torch.Tensor, s: torch.Tensor, scale: float | torch.Tensor | None = None
         ) -> torch.Tensor:
    """Per-sample mean squared error divided by ``scale``, the teacher outputs' mean square
    (of ``t`` itself when None). ``t: (n, ...)``, ``s: (*lead, n, ...)`` -> ``(*lead, n)``."""
    t = t.float()
    if scale is None:
        scale = t.pow(2).mean()
    scale_t = torch.as_tensor(scale, dtype=torch.float32).clamp_min(
        torch.finfo(torch.float32).tiny)
    lead = s.dim() - t.dim()
    return _reduce_sample((s.float() - t).pow(2), lead) / scale_t


def cosine(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 - cosine similarity of the flattened outputs, in [0, 2].
    ``t: (n, ...)``, ``s: (*lead, n, ...)`` -> ``(*lead, n)``."""
    lead = s.dim() - t.dim()
    tf = t.float().reshape(t.shape[0], -1)
    sf = s.float().reshape(*s.shape[: lead + 1], -1)
    return 1.0 - torch.nn.functional.cosine_similarity(sf, tf.expand_as(sf), dim=-1)


@dataclass(frozen=True)
class Divergence:
    """A divergence bound to its settings.

    name: a built-in (``kl``, ``nmse``, ``cosine``) or the ``module:function`` of ``fn``.
    fn: the user's per-sample function (None for built-ins).
    scale: the ``nmse`` normaliser (see :meth:`fitted`).
    """

    name: str
    fn: PerSample | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.fn is None and self.name not in DIVERGENCES:
            raise ConfigError("objectives.divergence", f"must be one of "
                              f"{', '.join(DIVERGENCES)} or 'package.module:function'; got "
                              f"{self.name!r}")

    @property
    def builtin(self) -> bool:
        return self.fn is None

    def fitted(self, teacher_out: Any) -> Divergence:
        """This divergence with what it needs from the teacher's calibration outputs (the
        ``nmse`` scale); others are returned unchanged."""
        if self.name != "nmse" or not self.builtin:
            return self
        t = outputs.default_part(teacher_out).float()
        return replace(self, scale=float(t.pow(2).mean()))

    def __call__(self, teacher_out: Any, student_out: Any) -> torch.Tensor:
        """Per-sample divergence ``(n,)`` of one student."""
        if self.fn is None:
            return self._builtin(outputs.default_part(teacher_out),
                                 outputs.default_part(student_out))
        d = self.fn(teacher_out, student_out)
        n = outputs.default_part(teacher_out).shape[0] if outputs.tensors(teacher_out) else -1
        if not isinstance(d, torch.Tensor) or d.dim() != 1 or (n >= 0 and d.shape[0] != n):
            got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise TargetError(f"objectives.divergence: {self.name} must return a tensor of "
                              f"shape (n,) = ({n},), one value per sample; it returned {got}")
        return d.float()

    def batched(self, teacher_out: Any, students_out: Any) -> torch.Tensor:
        """Per-sample divergence ``(P, n)`` of ``P`` students whose outputs carry a leading
        student axis."""
        if self.fn is None:
            t = outputs.default_part(teacher_out)
            s = outputs.default_part(students_out)
            return self._builtin(t, s)
        P = outputs.tensors(students_out)[0].shape[0]
        return torch.stack([self(teacher_out, outputs.take(students_out, i))
                            for i in range(P)])

    def _builtin(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if s.shape[s.dim() - t.dim():] != t.shape:
            raise TargetError(f"objectives.divergence: student outputs {tuple(s.shape)} do "
                              f"not match the teacher's {tuple(t.shape)}")
        if self.name == "kl":
            return kl(t, s)
        if self.name == "nmse":
            return nmse(t, s, self.scale)
        return cosine(t, s)


def divergence_label(name: str) -> str:
    """Axis label with units of a divergence by name (a built-in or a user's reference)."""
    return {
        "kl": "KL divergence (nats)",
        "nmse": "normalised MSE (unitless)",
        "cosine": "1 - cosine similarity",
    }.get(name, f"divergence {name.partition(':')[2] or name}")


def builtin(name: str) -> Divergence:
    """A built-in divergence by name."""
    return Divergence(name)
