"""Label-free fidelity measures of the encoder example, for ``[objectives]`` in problem.toml.

``one_minus_cosine`` is a per-sample divergence (``divergence = "metrics:one_minus_cosine"``,
the same as the built-in ``"cosine"``); ``neighbour_agreement`` a task measure
(``metric = "metrics:neighbour_agreement"``, maximised): does the compressed encoder still
find the same nearest neighbour for each sentence as the original one?
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# Rows of the similarity matrix computed at once: bounds memory to CHUNK x n floats.
CHUNK = 1024


def one_minus_cosine(teacher_out: torch.Tensor, student_out: torch.Tensor) -> torch.Tensor:
    """1 - cos(teacher_i, student_i) per sample: (n, d), (n, d) -> (n,), in [0, 2]."""
    return 1.0 - F.cosine_similarity(teacher_out.float(), student_out.float(), dim=-1, eps=1e-8)


@torch.no_grad()
def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    """Index (n,) int64 of each row's top-1 cosine nearest neighbour among the other rows of
    ``emb`` (n, d), n >= 2. Ties go to the lowest index; an all-zero row is similar to
    nothing (cosine 0 with every row)."""
    n = emb.shape[0]
    if n < 2:
        raise ValueError(f"nearest neighbours need at least 2 samples, got {n}")
    unit = F.normalize(emb.float().reshape(n, -1), dim=-1, eps=1e-12)
    out = torch.empty(n, dtype=torch.int64)
    for lo in range(0, n, CHUNK):
        sim = unit[lo:lo + CHUNK] @ unit.T
        rows = torch.arange(sim.shape[0])
        sim[rows, lo + rows] = -torch.inf  # a sample is not its own neighbour
        out[lo:lo + CHUNK] = sim.argmax(dim=1)
    return out


def neighbour_agreement(teacher_out: torch.Tensor, student_out: torch.Tensor,
                        labels: torch.Tensor | None = None) -> float:
    """Percent (0-100) of samples whose nearest cosine neighbour within the split (itself
    excluded) is the same sample under the student's embeddings as under the teacher's.

    ``teacher_out`` and ``student_out``: (n, d) embeddings of the same n inputs. ``labels``
    is ignored (the measure needs none); the teacher against itself scores 100.
    """
    if teacher_out.shape[0] != student_out.shape[0]:
        raise ValueError(f"teacher has {teacher_out.shape[0]} samples, student "
                         f"{student_out.shape[0]}")
    same = nearest_neighbours(teacher_out) == nearest_neighbours(student_out)
    return 100.0 * float(same.float().mean())
