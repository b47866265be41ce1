"""Distillation fine-tuning of a compressed student: the teacher's outputs as targets, the
target's own divergence as the loss (plus cross-entropy on labels for classifiers), masks
kept, quantisation in the loop (straight-through estimator). Reads calibration-side samples
only; no labels needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moecomp import inputs as inputs_mod
from moecomp import outputs
from moecomp.apply import SINGLE_QUANTIZERS, QuantizedLayer
from moecomp.data import Split
from moecomp.divergence import kl
from moecomp.target import Target

# --- quantisation in the loop ------------------------------------------------------------

def _fake_quant(w: torch.Tensor, mask: torch.Tensor, bits: int, quantizer: str = "uniform"
                ) -> torch.Tensor:
    """Masked weight whose survivors are replaced by their levels under the plan's quantizer
    in the forward pass; gradients pass straight through to the float survivors."""
    values = w[mask]
    if values.numel() == 0:
        return torch.zeros_like(w)
    idx, codebook = SINGLE_QUANTIZERS[quantizer](values.detach(), bits)
    q = torch.zeros_like(w)
    q[mask] = values + (codebook[idx] - values).detach()
    return q


def distillation_loss(target: Target, t_out: Any, s_out: Any, labels: torch.Tensor | None,
                      *, temperature: float = 2.0) -> torch.Tensor:
    """The fine-tuning loss of a batch: for the ``kl`` divergence T^2 * KL(teacher_T ||
    student_T) of the softened logits, otherwise the target's own per-sample divergence,
    averaged; plus cross-entropy on the labels when the target is a classifier that has
    them."""
    if target.divergence.name == "kl" and target.divergence.builtin:
        t = outputs.default_part(t_out)
        s = outputs.default_part(s_out)
        loss = temperature**2 * kl(t / temperature, s / temperature).mean()
    else:
        loss = target.divergence(t_out, s_out).mean()
    if labels is not None and target.task == "classification":
        s = outputs.default_part(s_out)
        loss = loss + nn.functional.cross_entropy(s.flatten(0, -2), labels.reshape(-1))
    return loss


def finetune(model: nn.Module, target: Target, layers: dict[str, QuantizedLayer],
             bits: dict[str, int], train: Split, *, epochs: int, lr: float = 2e-3,
             quantizers: dict[str, str] | None = None,
             batch_size: int = 128, temperature: float = 2.0, seed: int = 0,
             progress: bool = True) -> dict[str, torch.Tensor]:
    """Distil the teacher into the masked, quantised student; returns float parameters.

    Loss: :func:`distillation_loss` on batches of ``train`` (calibration-side samples).
    Masks stay fixed; pruned weights stay exactly zero.
    """
    teacher = target.teacher
    params = {k: v.detach().clone().requires_grad_(True)
              for k, v in model.named_parameters()}
    masks = {n: layers[n].mask for n in layers}
    kinds = quantizers or {}
    opt = torch.optim.Adam(params.values(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(train)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    bar = tqdm(total=steps, desc="fine-tune", disable=not progress)
    teacher.eval()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            batch = train.take(perm[i:i + batch_size])
            with torch.no_grad():
                t_out = outputs.select(inputs_mod.call(teacher, batch.inputs), target.output)
            live = {k: (_fake_quant(v, masks[k], bits[k], kinds.get(k, "uniform"))
                        if k in masks else v)
                    for k, v in params.items()}
            s_out = outputs.select(inputs_mod.functional(model, live, batch.inputs),
                                   target.output)
            loss = distillation_loss(target, t_out, s_out, batch.labels,
                                     temperature=temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for k, m in masks.items():
                    params[k].mul_(m)
            bar.update(1)
    bar.close()
    return {k: v.detach() for k, v in params.items()}


def requantize(weights: dict[str, torch.Tensor], layers: dict[str, QuantizedLayer],
               bits: dict[str, int], quantizers: dict[str, str]) -> dict[str, QuantizedLayer]:
    """Quantise fine-tuned survivors again with the plan's quantizers (same masks)."""
    out = {}
    for name, ql in layers.items():
        values = weights[name].reshape(-1)[ql.mask.reshape(-1)]
        idx, cb = SINGLE_QUANTIZERS[quantizers[name]](values.float(), bits[name])
        out[name] = QuantizedLayer(ql.shape, ql.mask, idx, cb)
    return out
