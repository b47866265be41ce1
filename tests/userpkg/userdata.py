"""Data factories and fidelity measures for the bring-your-own-model tests."""

from __future__ import annotations

import torch
from usermodels import SEQ, VOCAB


def token_splits(n: int = 48, seed: int = 0) -> dict[str, tuple[dict[str, torch.Tensor], None]]:
    """Random token sequences with padding, no labels: keyword inputs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, name in enumerate(("calibration", "validation", "test")):
        ids = torch.randint(1, VOCAB, (n + 8 * k, SEQ), generator=g)
        lengths = torch.randint(2, SEQ + 1, (n + 8 * k,), generator=g)
        mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
        out[name] = ({"input_ids": ids * mask, "attention_mask": mask}, None)
    return out


def lm_splits() -> dict[str, tuple[tuple[torch.Tensor], torch.Tensor]]:
    """Token ids as one positional argument; labels: the next token (n, T)."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for name in ("calibration", "validation", "test"):
        ids = torch.randint(0, VOCAB, (40, SEQ), generator=g)
        out[name] = ((ids,), torch.roll(ids, -1, dims=1))
    return out


def image_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return {name: (torch.randn(64, 1, 6, 6, generator=g), torch.randint(0, 5, (64,), generator=g))
            for name in ("calibration", "validation", "test")}


def mismatched() -> dict[str, object]:
    s = token_splits()
    ids = s["validation"][0]
    ids["attention_mask"] = ids["attention_mask"][:-3]
    return s


def one_minus_cos(teacher_out: torch.Tensor, student_out: torch.Tensor) -> torch.Tensor:
    return 1 - torch.nn.functional.cosine_similarity(teacher_out, student_out, dim=-1)


def scalar_divergence(teacher_out: torch.Tensor, student_out: torch.Tensor) -> torch.Tensor:
    return (teacher_out - student_out).pow(2).mean()  # wrong: one number, not (n,)


def neighbour_agreement(teacher_out: torch.Tensor, student_out: torch.Tensor,
                        labels: torch.Tensor | None) -> float:
    """% of samples whose nearest other sample (cosine) is the same under both."""

    def nearest(e: torch.Tensor) -> torch.Tensor:
        e = torch.nn.functional.normalize(e.float(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(-1)

    return 100.0 * float((nearest(teacher_out) == nearest(student_out)).double().mean())
