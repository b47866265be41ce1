"""Small user models of the shapes users bring, for the bring-your-own-model tests: two
keyword inputs and a dict output, tied weights, a dataclass output, BatchNorm. Fast on a CPU.
Imported by the tests from this folder, the way moecomp imports a problem file's factories."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, SEQ = 50, 16, 8


class TinyEncoder(nn.Module):
    """``forward(input_ids, attention_mask) -> {"pooled": (n, DIM), "tokens": (n, T, DIM)}``:
    token + position embeddings, one self-attention block, mean pooling over the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(SEQ, DIM)
        self.q = nn.Linear(DIM, DIM)
        self.k = nn.Linear(DIM, DIM)
        self.v = nn.Linear(DIM, DIM)
        self.ff = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.tok(input_ids) + self.pos(pos)
        scores = self.q(h) @ self.k(h).transpose(-1, -2) / DIM**0.5
        scores = scores.masked_fill(attention_mask[:, None, :] == 0, -1e4)
        h = self.norm(h + torch.softmax(scores, -1) @ self.v(h))
        h = h + torch.tanh(self.ff(h))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return {"pooled": pooled, "tokens": h}


class SdpaEncoder(TinyEncoder):
    """TinyEncoder with torch's fused attention (``F.scaled_dot_product_attention``, boolean
    mask), as BERT-style encoders are written: under ``torch.vmap`` on the CPU it has no
    batching rule and runs one student at a time inside the batched call."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.tok(input_ids) + self.pos(pos)
        n, t, d = h.shape

        def heads(z: torch.Tensor) -> torch.Tensor:  # (n, t, d) -> (n, 2, t, d / 2)
            return z.view(n, t, 2, d // 2).transpose(1, 2)

        keep = (attention_mask != 0)[:, None, None, :]
        a = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)),
                                           attn_mask=keep)
        h = self.norm(h + a.transpose(1, 2).reshape(n, t, d))
        h = h + torch.tanh(self.ff(h))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return {"pooled": pooled, "tokens": h}


class TiedLM(nn.Module):
    """A tiny language model whose output layer shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(input_ids))))


@dataclass
class Scores:
    logits: torch.Tensor
    hidden: torch.Tensor


class BNNet(nn.Module):
    """Conv + BatchNorm + Linear classifier returning a dataclass (``logits``, ``hidden``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> Scores:
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return Scores(self.fc(h), h)


def _seeded(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def encoder() -> nn.Module:
    return _seeded(TinyEncoder(), 0)


def sdpa_encoder() -> nn.Module:
    return _seeded(SdpaEncoder(), 0)


def tied_lm() -> nn.Module:
    return _seeded(TiedLM(), 1)


def bn_net() -> nn.Module:
    m = _seeded(BNNet(), 2)
    with torch.no_grad():  # BatchNorm statistics as a trained net has them
        m.bn.running_mean.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(3))
        m.bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(4))
    return m


def not_a_model() -> object:
    return {"weights": 1}


def broken() -> nn.Module:
    raise RuntimeError("checkpoint folder is missing")
