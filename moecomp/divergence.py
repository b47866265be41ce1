"""Teacher-student divergence: the fidelity objective.

All functions take teacher outputs ``t: (n, c)`` and student outputs ``s: (..., n, c)``
(a leading population axis is allowed) and return the mean over the n samples, shape
``(...)``. Zero means the student reproduces the teacher.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DIVERGENCES = ("kl", "nmse", "cosine")


def kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the softmax of logits, in nats per sample."""
    lt = torch.log_softmax(t.float(), dim=-1)
    ls = torch.log_softmax(s.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean(-1)


def nmse(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Mean squared error normalised by the teacher outputs' mean square (unitless)."""
    t = t.float()
    scale = t.pow(2).mean().clamp_min(torch.finfo(torch.float32).tiny)
    return (s.float() - t).pow(2).mean(dim=(-2, -1)) / scale


def cosine(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of each sample's output vector, averaged (in [0, 2])."""
    t = t.float().flatten(1) if t.dim() > 2 else t.float()
    return (1.0 - torch.nn.functional.cosine_similarity(s.float(), t.expand_as(s), dim=-1)
            ).mean(-1)


_FUNCS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "kl": kl, "nmse": nmse, "cosine": cosine,
}


def divergence(t: torch.Tensor, s: torch.Tensor, kind: str) -> torch.Tensor:
    """Divergence ``kind`` (kl | nmse | cosine) of student outputs from teacher outputs."""
    try:
        fn = _FUNCS[kind]
    except KeyError:
        raise ValueError(f"unknown divergence {kind!r}; allowed: {', '.join(DIVERGENCES)}")\
            from None
    return fn(t, s)
