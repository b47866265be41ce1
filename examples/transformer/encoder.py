"""A BERT-style sentence encoder: token ids + attention mask in, one pooled embedding out.

``forward(input_ids, attention_mask) -> (n, d_model)``: token and position embeddings,
pre-LayerNorm transformer blocks (self-attention with separate q/k/v/o ``nn.Linear``
projections, so every projection is a compressible Linear module; a GELU feed-forward), a final
LayerNorm, mean pooling over the real tokens and a Linear pooler. No classes, no labels.

Factories for problem files: ``encoder:small`` (5.3 M parameters) and ``encoder:base``
(23.4 M). Both use the vocabulary and sequence length of :mod:`corpus`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from corpus import MAX_LEN, PAD, VOCAB_SIZE


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = VOCAB_SIZE
    max_len: int = MAX_LEN          # rows of the position table, [CLS] included
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4                # head width d_model / n_heads = 64, as in BERT
    d_ff: int = 1024                # 4 x d_model, as in BERT
    dropout: float = 0.1            # also the noise of the two SimCSE views in train.py

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads "
                             f"({self.n_heads})")


SMALL = EncoderConfig()
# Wider and deeper, same vocabulary: the corpus has too few distinct words for a 16 k table.
BASE = EncoderConfig(d_model=512, n_layers=6, n_heads=8, d_ff=2048)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the real tokens of each sequence."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``x``: (n, T, d); ``keep``: bool (n, T), True on tokens a query may attend to."""
        n, t, d = x.shape

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.view(n, t, self.n_heads, d // self.n_heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=keep[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.ff2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), keep))
        return x + self.drop(self.ff2(F.gelu(self.ff1(self.ln2(x)))))


class Encoder(nn.Module):
    """Sentence encoder; see the module docstring. ``encode`` gives the per-token states the
    masked-language-model head of ``train.py`` reads; ``forward`` the pooled embedding."""

    def __init__(self, cfg: EncoderConfig = SMALL) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=PAD)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
        self._init_weights()

    def _init_weights(self) -> None:
        # BERT's initialisation; the default (Kaiming uniform, N(0, 1) embeddings) trains
        # slower in short runs. Deterministic under the caller's torch seed.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        with torch.no_grad():
            self.tok.weight[PAD].zero_()

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token states (n, T, d) of ``input_ids`` int (n, T) under ``attention_mask``
        (n, T), nonzero / True on real tokens."""
        n, t = input_ids.shape
        if t > self.cfg.max_len:
            raise ValueError(f"sequence length {t} exceeds the position table "
                             f"({self.cfg.max_len})")
        keep = attention_mask.bool()
        positions = torch.arange(t, device=input_ids.device)
        x = self.drop(self.tok(input_ids) + self.pos(positions))
        for block in self.blocks:
            x = block(x, keep)
        return self.ln(x)

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (n, d) of token states ``h`` (n, T, d): the pooler applied to
        their mean over the real tokens."""
        w = attention_mask.to(h.dtype).unsqueeze(-1)
        return self.pooler((h * w).sum(1) / w.sum(1).clamp_min(1.0))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (n, d_model) of ``input_ids`` (n, T) under ``attention_mask``."""
        return self.pool(self.encode(input_ids, attention_mask), attention_mask)


def small() -> Encoder:
    """Factory ``encoder:small``: d 256, 4 layers, 4 heads, vocabulary 8,192 (5.3 M params)."""
    return Encoder(SMALL)


def base() -> Encoder:
    """Factory ``encoder:base``: d 512, 6 layers, 8 heads, vocabulary 8,192 (23.4 M params)."""
    return Encoder(BASE)


FACTORIES = {"small": small, "base": base}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
