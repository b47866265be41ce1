"""Distillation fine-tuning of a compressed student: the teacher's outputs as targets, the
target's own divergence as the loss (plus cross-entropy on labels for classifiers),
quantisation in the loop (straight-through estimator). Reads calibration-side samples only;
no labels needed.

Masks either stay fixed (the plan's survivors; ``MaskSchedule("fixed")``) or move during
training toward the same per-layer survivor counts (:class:`MaskSchedule`):

- ``gradual`` (Zhu & Gupta 2017, "To prune, or not to prune"): start from a denser mask (by
  default the teacher's dense weights) and prune by magnitude on a cubic schedule, so the
  network adapts while weights go; from ``prune_end`` of the steps on the mask is final.
- ``rigl`` (Evci et al. 2020, "Rigging the Lottery"): start from the plan's mask; every
  ``update_every`` steps drop the smallest-magnitude survivors and regrow as many pruned
  positions where the loss gradient of the (dense, quantised) weight is largest, a share
  that decays on a cosine to 0 at ``prune_end``.

The optimizer is Adam (default, lr 0.002) or SGD with Nesterov momentum 0.9 (lr 0.05), each
with the learning rate on a cosine to 0 over all steps (:data:`OPTIMIZERS`).

Either way each layer ends with exactly the plan's number of survivors and is quantised with
the plan's bits and quantizer, so the file's size follows the plan.

Training runs where the student model is (batches and the teacher's outputs are moved
there); quantisation in the loop computes its levels on the CPU (``moecomp.quantize``), and
what :func:`distil` returns is on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moecomp import inputs as inputs_mod
from moecomp import outputs
from moecomp.apply import SINGLE_QUANTIZERS, QuantizedLayer
from moecomp.data import Split
from moecomp.divergence import kl
from moecomp.errors import ConfigError
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
    q[mask] = values + (codebook[idx].to(values.device) - values).detach()
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


OPTIMIZERS = {"adam": 2e-3, "sgd": 0.05}
"""The fine-tuning optimizers and each one's default learning rate. ``sgd``: momentum 0.9,
Nesterov. Why both: on LeNet-300-100 at 76-107x SGD ended 0.12 validation point better than
Adam on average (8 of 12 plan and seed pairs), with files 3 % larger (BENCHMARKS.md,
"Fine-tuning with SGD"); on LeNet-5 with gradual masks it diverged at 0.05 and 0.01. Adam
stays the default."""


def resolve_optimizer(optimizer: str, lr: float | None) -> float:
    """The learning rate to use: ``lr``, or the optimizer's default when None. ConfigError
    naming the field for an unknown optimizer or a learning rate that is not > 0."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got "
                          f"{optimizer!r}")
    if lr is None:
        return OPTIMIZERS[optimizer]
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not (
            math.isfinite(lr) and lr > 0):
        raise ConfigError("lr", f"must be a finite number > 0, got {lr!r}")
    return float(lr)


def finetune_settings(finetune_epochs: int, *, masks: str = "fixed",
                      repair_masks: bool = False, optimizer: str = "adam",
                      lr: float | None = None) -> tuple[MaskSchedule, float]:
    """The mask schedule and learning rate a refine or compress fine-tunes with, checked
    before anything runs: ConfigError naming the parameter for a value refused, and for
    moving masks, the repair or another optimizer than Adam without fine-tuning (they would
    be ignored)."""
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or \
            finetune_epochs < 0:
        raise ConfigError("finetune_epochs", f"must be an integer >= 0, got "
                          f"{finetune_epochs!r}")
    schedule = MaskSchedule(masks, repair=repair_masks)
    rate = resolve_optimizer(optimizer, lr)
    if finetune_epochs == 0:
        if schedule.mode != "fixed":
            raise ConfigError("masks", f"{masks!r} moves the survivors while fine-tuning: "
                              "give finetune_epochs > 0")
        if schedule.repair:
            raise ConfigError("repair_masks", "the repair comes before fine-tuning: give "
                              "finetune_epochs > 0")
        if optimizer != "adam":
            raise ConfigError("optimizer", f"{optimizer!r} is the fine-tuning optimizer: give "
                              "finetune_epochs > 0")
    return schedule, rate


def _make_optimizer(optimizer: str, params: list[torch.Tensor], lr: float
                    ) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.Adam(params, lr=lr)


class Diverged(RuntimeError):
    """Fine-tuning stopped because a weight stopped being finite (the loss overflowed or the
    learning rate is too high for the model): ``step`` of ``steps``."""

    def __init__(self, step: int, steps: int) -> None:
        super().__init__(f"training diverged at step {step} of {steps} (a weight stopped "
                         "being finite)")
        self.step, self.steps = step, steps


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """One check (one device sync) over every tensor."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


MASK_MODES = ("fixed", "gradual", "rigl")
SCORES = ("magnitude", "activation")


@dataclass(frozen=True)
class MaskSchedule:
    """How the masks move while fine-tuning (see the module doc); validated here.

    mode: ``fixed`` (the plan's masks), ``gradual`` or ``rigl``.
    start: gradual only: the starting sparsity as a share of the plan's (0: dense, every
        weight the teacher's; 0.5: half the plan's sparsity, the plan's survivors plus the
        largest of the teacher's other weights).
    prune_end: share of the steps after which the masks are final (gradual: the plan's
        counts are reached there; rigl: swapping stops). Why 0.75: the last quarter trains
        the final masks (both papers stop mask changes well before the end).
    update_every: steps between mask updates; 0: 32 updates up to ``prune_end``.
    regrow: rigl only: the share of a layer's survivors swapped at the first update, decayed
        on a cosine to 0 at ``prune_end`` (RigL's default 0.3).
    score: what a weight is kept by: ``magnitude`` ``|w|``, or ``activation`` ``|w|`` times
        the root mean square of the input it multiplies (its typical contribution, measured
        once on the teacher; as Wanda, Sun et al. 2023, and the DE prior of the same name).
    repair: before training, survivors spent on units that cannot matter (a hidden unit
        whose row keeps no survivor, or whose output no survivor of the next layer reads)
        move to the best free positions of units that do, by ``score`` on the teacher's
        weights, each tensor keeping its count (``moecomp.structured.repair_masks``); the
        moved survivors start from the teacher's values.
    """

    mode: str = "fixed"
    start: float = 0.0
    prune_end: float = 0.75
    update_every: int = 0
    regrow: float = 0.3
    score: str = "magnitude"
    repair: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MASK_MODES:
            raise ConfigError("masks", f"must be one of {', '.join(MASK_MODES)}, got "
                              f"{self.mode!r}")
        if not 0.0 <= self.start <= 1.0:
            raise ConfigError("masks.start", f"must be in [0, 1], got {self.start!r}")
        if not 0.0 < self.prune_end <= 1.0:
            raise ConfigError("masks.prune_end", f"must be in (0, 1], got {self.prune_end!r}")
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or \
                self.update_every < 0:
            raise ConfigError("masks.update_every", f"must be an integer >= 0, got "
                              f"{self.update_every!r}")
        if not 0.0 <= self.regrow <= 1.0:
            raise ConfigError("masks.regrow", f"must be in [0, 1], got {self.regrow!r}")
        if self.score not in SCORES:
            raise ConfigError("masks.score", f"must be one of {', '.join(SCORES)}, got "
                              f"{self.score!r}")
        if not isinstance(self.repair, bool):
            raise ConfigError("masks.repair", f"must be true or false, got {self.repair!r}")


@dataclass(frozen=True)
class Distilled:
    """What fine-tuning gives: ``weights`` every parameter of the model (float; a compressed
    tensor exactly 0 off its mask), ``masks`` the final survivors of every compressed tensor
    (as many per tensor as the plan keeps), ``repaired`` how many survivors the mask repair
    moved before training (``MaskSchedule.repair``)."""

    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    repaired: int = 0

    def quantized(self, bits: dict[str, int], quantizers: dict[str, str]
                  ) -> dict[str, QuantizedLayer]:
        """The compressed tensors: survivors at ``masks`` quantised with the plan's bits and
        quantizers."""
        return {name: _quantized(self.weights[name], mask, bits[name], quantizers[name])
                for name, mask in self.masks.items()}


# --- masks ---------------------------------------------------------------------------------

def top_mask(score: torch.Tensor, count: int) -> torch.Tensor:
    """Bool tensor of ``score``'s shape: True at the ``count`` largest scores (ties: lower
    flat index first, as ``torch.topk`` on the CPU gives them)."""
    flat = score.reshape(-1)
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if count > 0:
        out[torch.topk(flat, count, sorted=False).indices] = True
    return out.reshape(score.shape)


def cubic_count(start: int, final: int, step: int, end: int) -> int:
    """Survivors at ``step`` of a gradual prune from ``start`` to ``final`` reached at step
    ``end``: ``final + (start - final) * (1 - step / end) ** 3`` (Zhu & Gupta), rounded."""
    if end <= 0 or step >= end:
        return final
    return final + round((start - final) * (1.0 - step / end) ** 3)


def input_scales(target: Target, names: list[str], train: Split, *, samples: int = 1024
                 ) -> dict[str, torch.Tensor]:
    """Per compressed tensor, the root mean square of the teacher's input to each of its
    weights, broadcastable to the weight's shape (Linear: per input feature; Conv: per input
    channel), on the first ``samples`` of ``train``. Tensors of other modules (Embedding,
    grouped Conv) get none."""
    refs = {r.name: r for r in target.layers if r.name in names}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str, module: nn.Module) -> Any:
        def run(_: nn.Module, args: Any) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is None:
                return
            x = x.detach().double()
            if isinstance(module, nn.Linear):
                sq, n = x.reshape(-1, x.shape[-1]).pow(2).sum(0), x.numel() // x.shape[-1]
            else:
                sq, n = x.transpose(0, 1).reshape(x.shape[1], -1).pow(2).sum(1), \
                    x.numel() // x.shape[1]
            sums[name] = sums.get(name, 0) + sq
            counts[name] = counts.get(name, 0) + n
        return run

    for name, ref in refs.items():
        module = target.teacher.get_submodule(ref.module)
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv1d | nn.Conv2d |
                                                                nn.Conv3d) and
                                              module.groups == 1):
            handles.append(module.register_forward_pre_hook(hook(name, module)))
    try:
        target.run(target.teacher, inputs_mod.head(train.inputs, samples))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, sq in sums.items():
        rms = (sq / counts[name]).sqrt().float()
        shape = refs[name].shape
        out[name] = rms.reshape(1, -1, *([1] * (len(shape) - 2)))
    return out


def _start_masks(params: dict[str, torch.Tensor], plan_masks: dict[str, torch.Tensor],
                 teacher: dict[str, torch.Tensor], start: float,
                 scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradual pruning's first masks: the plan's survivors keep the student's values, the
    other positions get the teacher's; each tensor keeps the plan's survivors plus the
    largest others up to sparsity ``start`` x the plan's. Sets ``params`` to match."""
    out = {}
    with torch.no_grad():
        for name, plan in plan_masks.items():
            w = params[name]
            w.copy_(torch.where(plan, w, teacher[name].to(w.dtype)))
            numel, kept = plan.numel(), int(plan.sum())
            count = numel - round(start * (numel - kept))
            score = w.detach().abs().float() * scales.get(name, 1.0)
            score = score + plan.float() * (score.max() + 1)
            out[name] = top_mask(score, count)
            w.mul_(out[name])
    return out


def _rigl_update(score: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, share: float
                 ) -> torch.Tensor:
    """One RigL step on a tensor: drop the ``share`` x survivors of smallest ``|score|``, regrow
    as many of the other positions with the largest ``|grad|`` (grown weights start at 0).
    The number of survivors is unchanged."""
    kept = int(mask.sum())
    n = min(round(share * kept), mask.numel() - kept)
    if n <= 0:
        return mask
    drop_score = torch.where(mask, score.detach().abs(), torch.full_like(score, math.inf))
    dropped = top_mask(-drop_score, n)
    after = mask & ~dropped
    grow_score = torch.where(after, torch.full_like(grad, -math.inf), grad.abs())
    return after | top_mask(grow_score, n)


# --- training --------------------------------------------------------------------------------

TEACHER_CACHE_BYTES = 256 * 2**20
"""The teacher's outputs on the whole training split are computed once when they fit in this
many bytes (a classifier's logits: ~2 MB for 55,000 samples), else per batch."""


def _teacher_outputs(target: Target, train: Split, batch_size: int) -> Any:
    """The teacher's outputs on every sample of ``train`` (narrowed to ``target.output``),
    or None when they would exceed :data:`TEACHER_CACHE_BYTES`."""
    n = len(train)
    if n == 0:
        return None
    one = target.run(target.teacher, inputs_mod.head(train.inputs, 1))
    per_sample = sum(t.numel() * t.element_size() for t in outputs.tensors(one))
    if per_sample * n > TEACHER_CACHE_BYTES:
        return None
    return target.run(target.teacher, train.inputs, batch_size=max(batch_size, 512))


def distil(model: nn.Module, target: Target, layers: dict[str, QuantizedLayer],
           bits: dict[str, int], train: Split, *, epochs: int,
           masks: MaskSchedule | None = None, lr: float | None = None,
           optimizer: str = "adam", quantizers: dict[str, str] | None = None,
           batch_size: int = 128, temperature: float = 2.0, seed: int = 0,
           progress: bool = True) -> Distilled:
    """Distil the teacher into the compressed student ``model`` (its state is not changed).

    model: on the device training runs on, as ``target.teacher`` is (``Target.on_device``);
        ``layers`` and the returned tensors are on the CPU.
    layers: the compressed tensors (their masks: the survivors to keep, or to start RigL
        from; their counts are the plan's). bits, quantizers: per compressed tensor, the
        plan's bit-width and quantizer, applied in every forward pass (straight-through).
    train: calibration-side samples (``target.pool``), in batches of ``batch_size``,
        reshuffled every epoch with ``seed``. masks: fixed (default), gradual or rigl.
    Loss: :func:`distillation_loss`. ``optimizer`` (:data:`OPTIMIZERS`) at ``lr`` (None: the
    optimizer's default), cosine decay over all steps. Raises :class:`Diverged` as soon as a
    weight stops being finite.
    """
    sched_cfg = masks or MaskSchedule()
    lr = resolve_optimizer(optimizer, lr)
    if epochs < 0:
        raise ConfigError("epochs", f"must be >= 0, got {epochs!r}")
    teacher = target.teacher
    params = {k: v.detach().clone().requires_grad_(True)
              for k, v in model.named_parameters()}
    device = next(iter(params.values())).device if params else torch.device("cpu")
    missing = [n for n in layers if n not in params]
    if missing:
        raise ConfigError("layers", f"{', '.join(missing)}: not parameters of the model")
    plan_masks = {n: layers[n].mask.reshape(params[n].shape).to(params[n].device, copy=True)
                  for n in layers}
    final = {n: int(m.sum()) for n, m in plan_masks.items()}
    kinds = quantizers or {}
    gen = torch.Generator().manual_seed(seed)
    n = len(train)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    end = math.floor(sched_cfg.prune_end * steps)
    every = sched_cfg.update_every or max(1, end // 32)
    mode = sched_cfg.mode
    scales = input_scales(target, list(layers), train) \
        if (mode != "fixed" or sched_cfg.repair) and sched_cfg.score == "activation" else {}

    def score(k: str) -> torch.Tensor:
        w = params[k].detach().abs()
        return w * scales[k] if k in scales else w

    repaired, pairs = 0, list[tuple[str, str]]()
    if sched_cfg.repair:
        plan_masks, repaired, pairs = _repaired(target, params, plan_masks, scales, train)

    if mode == "gradual":
        current = _start_masks(params, plan_masks, target.weights(), sched_cfg.start, scales)
    else:
        current = dict(plan_masks)
        with torch.no_grad():
            for k, m in current.items():
                params[k].mul_(m)
    start = {k: int(m.sum()) for k, m in current.items()}
    opt = _make_optimizer(optimizer, list(params.values()), lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    bar = tqdm(total=steps, desc=f"fine-tune ({mode} masks)", disable=not progress)
    teacher.eval()
    cached = _teacher_outputs(target, train, batch_size)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            update = mode != "fixed" and step <= end and (step % every == 0 or step == end)
            if mode == "gradual" and update:
                with torch.no_grad():
                    for k in current:
                        count = cubic_count(start[k], final[k], step, end)
                        if count != int(current[k].sum()):
                            current[k] = top_mask(score(k), count)
                            params[k].mul_(current[k])
            rigl = mode == "rigl" and update and 0 < step < end
            batch = _on(train.take(perm[i:i + batch_size]), device)
            if cached is not None:
                t_out = outputs.map_tensors(outputs.take(cached, perm[i:i + batch_size]),
                                            lambda t: t.to(device))
            else:
                with torch.no_grad():
                    t_out = outputs.select(inputs_mod.call(teacher, batch.inputs),
                                           target.output)
            live = {k: (_fake_quant(v, current[k], bits[k], kinds.get(k, "uniform"))
                        if k in current else v)
                    for k, v in params.items()}
            if rigl:
                for k in current:
                    live[k].retain_grad()
            s_out = outputs.select(inputs_mod.functional(model, live, batch.inputs),
                                   target.output)
            loss = distillation_loss(target, t_out, s_out, batch.labels,
                                     temperature=temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                if rigl:
                    share = sched_cfg.regrow / 2 * (1 + math.cos(math.pi * step / end))
                    for k in current:
                        grad = live[k].grad
                        if grad is not None:
                            current[k] = _rigl_update(score(k), current[k], grad, share)
                for k, m in current.items():
                    params[k].mul_(m)
            step += 1
            if not _all_finite(params.values()):
                bar.close()
                raise Diverged(step, steps)
            bar.update(1)
    bar.close()
    with torch.no_grad():  # a schedule cut short (few steps) ends at the plan's counts anyway
        for k in current:
            if int(current[k].sum()) != final[k]:
                current[k] = top_mask(score(k), final[k])
                params[k].mul_(current[k])
        _zero_unread_biases(params, current, pairs)
    return Distilled({k: v.detach().cpu() for k, v in params.items()},
                     {k: m.cpu().clone() for k, m in current.items()}, repaired)


def _repaired(target: Target, params: dict[str, torch.Tensor],
              plan_masks: dict[str, torch.Tensor], scales: dict[str, torch.Tensor],
              train: Split) -> tuple[dict[str, torch.Tensor], int, list[tuple[str, str]]]:
    """``plan_masks`` repaired (``MaskSchedule.repair``), scored on the teacher's weights;
    the positions that gain a survivor take the teacher's value in ``params``. Also returns
    how many survivors moved and the coupled pairs."""
    from moecomp.structured import coupled_tensors, repair_masks

    device = next(iter(plan_masks.values())).device
    few = inputs_mod.to(inputs_mod.head(train.inputs, 2), device)
    pairs = coupled_tensors(target.teacher, few, list(plan_masks))
    teacher = target.weights()
    scores = {k: teacher[k].detach().abs().float() * scales[k] if k in scales
              else teacher[k].detach().abs().float() for k in plan_masks}
    masks, moved = repair_masks(plan_masks, pairs, scores)
    with torch.no_grad():
        for k, m in masks.items():
            gained = m & ~plan_masks[k]
            params[k].copy_(torch.where(gained, teacher[k].to(params[k].dtype), params[k]))
    return masks, moved, pairs


def _zero_unread_biases(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                        pairs: list[tuple[str, str]]) -> None:
    """Set to 0 the bias of every unit no survivor of the next layer reads: its output goes
    nowhere, so the model's outputs do not change, and the stored biases compress."""
    from moecomp.structured import read_units

    for a, b in pairs:
        bias = a.removesuffix("weight") + "bias"
        if a.endswith("weight") and bias in params:
            read = read_units(masks[b].reshape(params[b].shape), params[a].shape[0])
            params[bias][~read.to(params[bias].device)] = 0.0


def _on(split: Split, device: torch.device) -> Split:
    """``split`` with its inputs and labels on ``device`` (itself where they are)."""
    return Split(inputs_mod.to(split.inputs, device),
                 None if split.labels is None else split.labels.to(device))


def _quantized(weight: torch.Tensor, mask: torch.Tensor, bits: int, quantizer: str
               ) -> QuantizedLayer:
    flat = mask.reshape(-1)
    values = weight.reshape(-1)[flat]
    idx, cb = SINGLE_QUANTIZERS[quantizer](values.float(), bits)
    return QuantizedLayer(tuple(weight.shape), mask.reshape(weight.shape), idx, cb)
