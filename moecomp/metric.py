"""The task metric: what a user reads fidelity in (accuracy, or their own measure).

A metric scores a student's outputs on a whole split against the teacher's: ``fn(teacher_out,
student_out, labels) -> float`` (a number, a 0-d tensor, or an ``(n,)`` tensor of per-sample
values that is averaged). It is computed over all of a split's outputs at once, so measures
that compare samples with each other (nearest neighbours, ranking) are allowed; labels may
be None. Its *drop* is how much worse the student is than the teacher on the same split, in
the metric's own units (points for a percentage), positive = worse: ``teacher - student``
for a metric to maximise, ``student - teacher`` for one to minimise.

Built-in: ``accuracy``, top-1 agreement of the outputs' argmax with integer labels, in %
(reads :func:`moecomp.outputs.default_part`). Without a metric (no labels, none named),
moecomp works on divergence alone and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from moecomp import outputs
from moecomp.errors import ConfigError, TargetError

MetricFn = Callable[[Any, Any, "torch.Tensor | None"], Any]
"""``fn(teacher_out, student_out, labels) -> float``: a user metric."""

Direction = Literal["maximize", "minimize"]


def accuracy(teacher_out: Any, student_out: Any, labels: torch.Tensor | None) -> float:
    """Top-1 accuracy (%) of the student's outputs against ``labels``."""
    if labels is None:
        raise TargetError("objectives.metric: accuracy needs labels, and this split has none")
    return float(accuracy_batched(outputs.default_part(student_out).unsqueeze(0), labels)[0])


def accuracy_batched(students: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy (%) of ``students: (P, n, ..., c)`` against ``labels: (n, ...)``,
    ``(P,)``."""
    return _hits(students, labels).mean(-1) * 100.0


def _hits(students: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(P, labels)`` float64: 1 where a student's argmax is the label, else 0."""
    hit = (students.argmax(-1) == labels.to(students.device)).double()
    return hit.reshape(hit.shape[0], -1)


def classifies(out: Any, labels: torch.Tensor | None) -> bool:
    """Whether ``accuracy`` applies: integer labels whose shape is the outputs' without the
    class axis."""
    if labels is None or labels.is_floating_point() or labels.dtype == torch.bool:
        return False
    try:
        part = outputs.default_part(out)
    except ConfigError:
        return False
    return part.dim() >= 2 and tuple(part.shape[:-1]) == tuple(labels.shape)


@dataclass(frozen=True)
class Metric:
    """A task metric bound to its settings.

    name: shown in tables and on plot axes (``accuracy``, ``neighbour agreement``).
    ref: ``accuracy`` or the user's ``module:function``.
    unit: ``%`` (drops in points) or the user's unit (may be empty).
    """

    name: str
    ref: str
    fn: MetricFn
    direction: Direction = "maximize"
    unit: str = ""

    @property
    def builtin(self) -> bool:
        return self.ref == "accuracy"

    @property
    def drop_label(self) -> str:
        """Axis / column label of the drop, e.g. ``accuracy drop (points)``."""
        return drop_label(self.name, self.unit)

    @property
    def label(self) -> str:
        """Axis label of the metric itself, e.g. ``accuracy (%)``."""
        return f"{self.name} ({self.unit})" if self.unit else self.name

    def __call__(self, teacher_out: Any, student_out: Any, labels: torch.Tensor | None
                 ) -> float:
        return self.evaluate(teacher_out, student_out, labels)[0]

    def evaluate(self, teacher_out: Any, student_out: Any, labels: torch.Tensor | None
                 ) -> tuple[float, np.ndarray | None]:
        """The value, and the per-sample values it is the mean of when the metric has them
        (the built-in accuracy: 100 or 0 per label; a user metric that returns ``(n,)``
        values); None for a metric that returns one number."""
        if self.builtin and labels is not None:
            # the value as accuracy_batched computes it (same reduction, same float)
            hit = _hits(outputs.default_part(student_out).unsqueeze(0), labels)
            return float(hit.mean(-1)[0] * 100.0), (hit[0] * 100.0).cpu().numpy()
        v = self.fn(teacher_out, student_out, labels)
        if isinstance(v, torch.Tensor):
            if v.dim() > 1 or v.numel() == 0:
                raise TargetError(f"objectives.metric: {self.ref} must return a number (or "
                                  f"(n,) per-sample values); it returned shape "
                                  f"{tuple(v.shape)}")
            if v.dim() == 1:
                values = v.detach().double()
                return float(values.mean()), values.cpu().numpy()
            v = v.item()
        try:
            value = float(v)
        except (TypeError, ValueError):
            raise TargetError(f"objectives.metric: {self.ref} must return a number; it "
                              f"returned {type(v).__name__}") from None
        return value, None

    def batched(self, teacher_out: Any, students_out: Any, labels: torch.Tensor | None
                ) -> np.ndarray:
        """Values ``(P,)`` for ``P`` students whose outputs carry a leading student axis."""
        if self.builtin and labels is not None:
            s = outputs.default_part(students_out)
            return accuracy_batched(s, labels).cpu().numpy().astype(np.float64)
        P = outputs.tensors(students_out)[0].shape[0]
        return np.array([self(teacher_out, outputs.take(students_out, i), labels)
                         for i in range(P)], dtype=np.float64)

    def drop(self, teacher_value: float | np.ndarray, student_value: float | np.ndarray
             ) -> Any:
        """How much worse the student is (positive = worse), in the metric's units."""
        if self.direction == "maximize":
            return teacher_value - student_value
        return student_value - teacher_value


def drop_unit(unit: str) -> str:
    """The unit of a drop in a metric of ``unit``: ``points`` for a percentage, else its own."""
    return "points" if unit == "%" else unit


def drop_label(name: str, unit: str) -> str:
    """Label of a metric's drop with its units: ``accuracy drop (points)`` for a percentage."""
    u = drop_unit(unit)
    return f"{name} drop ({u})" if u else f"{name} drop"


def builtin_accuracy() -> Metric:
    return Metric("accuracy", "accuracy", accuracy, "maximize", "%")
