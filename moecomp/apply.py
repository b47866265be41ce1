"""apply(plan): turn a CompressionPlan into pruned, quantised layers.

The stage *apply* of DESIGN.md: pure, vectorised functions. A mask is the plan's share of
least-relevant weights (a rank compare); the survivors are quantised to a small codebook.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moecomp.errors import ConfigError
from moecomp.plan import CompressionPlan
from moecomp.quantize import kmeans_quantize, shared_quantize, uniform_quantize


@dataclass(frozen=True)
class QuantizedLayer:
    """One compressed tensor: what the codec stores and what the student uses.

    shape: the tensor's shape.
    mask: bool tensor of ``shape``; True where a weight survives.
    indices: int64 ``(n_kept,)``; level index of each survivor, in row-major order of the
        kept positions.
    codebook: float32 ``(k,)``; the level values.
    """

    shape: tuple[int, ...]
    mask: torch.Tensor
    indices: torch.Tensor
    codebook: torch.Tensor

    @property
    def n_kept(self) -> int:
        return int(self.indices.numel())

    @property
    def n_levels(self) -> int:
        """Number of codebook levels ``k`` (used or not)."""
        return int(self.codebook.numel())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 tensor of ``shape``: ``codebook[indices]`` at the mask, exact 0 elsewhere."""
        out = torch.zeros(self.numel, dtype=torch.float32)
        out[self.mask.reshape(-1)] = self.codebook[self.indices]
        return out.reshape(self.shape)


# --- masks ----------------------------------------------------------------------------------
def n_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a share ``sparsity`` prunes: ``round(sparsity * numel)``.

    Python's ``round`` (ties to even), the one definition every stage uses.
    """
    return round(sparsity * numel)


def _check_sparsity(sparsity: float) -> float:
    s = sparsity
    if isinstance(s, bool) or not isinstance(s, int | float) or not 0.0 <= s <= 1.0:
        raise ConfigError("sparsity", f"must be a number in [0, 1], got {s!r}")
    return float(s)


def keep_mask(rank: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Which weights survive pruning a share ``sparsity`` of the least relevant ones.

    rank: int64 tensor of the weight's shape, a permutation of ``0..numel-1``; rank 0 is the
        least relevant weight (pruned first).
    sparsity: share of weights pruned, in [0, 1].
    Returns a bool tensor of ``rank``'s shape: ``rank >= round(sparsity * numel)``, so exactly
    ``numel - round(sparsity * numel)`` weights, the highest-ranked ones, are kept.
    """
    if rank.is_floating_point() or rank.is_complex() or rank.dtype == torch.bool:
        raise TypeError(f"rank: expected an integer tensor, got {rank.dtype}")
    return rank >= n_pruned(rank.numel(), _check_sparsity(sparsity))


def _survivors(
    weight: torch.Tensor, rank: torch.Tensor, sparsity: float, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask bool (shape), survivors float32 (n_kept,))`` in row-major order, on the CPU."""
    if tuple(weight.shape) != tuple(rank.shape):
        raise ValueError(
            f"{name}: weight shape {tuple(weight.shape)} and rank shape {tuple(rank.shape)} differ"
        )
    if not weight.is_floating_point():
        raise TypeError(f"{name}: expected a floating weight tensor, got {weight.dtype}")
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    mask = keep_mask(rank.detach().cpu(), sparsity)
    return mask, torch.masked_select(w, mask)


# --- layers and plans -----------------------------------------------------------------------
def apply_layer(
    weight: torch.Tensor,
    rank: torch.Tensor,
    *,
    sparsity: float,
    bits: int,
    quantizer: str = "uniform",
) -> QuantizedLayer:
    """Prune and quantise one tensor.

    weight: float tensor of any shape; rank: int64 of the same shape (see ``keep_mask``).
    sparsity: share pruned, [0, 1]; bits: 1..8, ``2**bits`` levels.
    quantizer: ``uniform`` (equal-width bins, bin means) or ``kmeans`` (1-D Lloyd-Max); the
        ``shared`` quantizer pools several tensors and is only available through ``apply_plan``.
    Returns a CPU ``QuantizedLayer``; survivors are in row-major order of the kept positions.
    """
    if quantizer not in SINGLE_QUANTIZERS:
        raise ConfigError(
            "quantizer",
            f"must be one of {', '.join(SINGLE_QUANTIZERS)} for a single tensor ('shared' needs "
            f"apply_plan and the plan's shared_k); got {quantizer!r}",
        )
    mask, values = _survivors(weight, rank, sparsity, "weight")
    indices, codebook = SINGLE_QUANTIZERS[quantizer](values, bits)
    return QuantizedLayer(tuple(weight.shape), mask, indices, codebook)


def apply_plan(
    plan: CompressionPlan, weights: dict[str, torch.Tensor], ranks: dict[str, torch.Tensor]
) -> dict[str, QuantizedLayer]:
    """Turn a plan into compressed layers.

    plan: per tensor name its sparsity, bits and quantizer.
    weights, ranks: name -> weight tensor and its rank tensor (same shape); they may hold more
        names than the plan; every plan name must be in both.
    Layers with the ``shared`` quantizer are pooled: their survivors together are cut into
    ``plan.shared_k`` equal-width bins and they all get the same codebook tensor.
    Returns name -> ``QuantizedLayer`` in the plan's order.
    """
    for name in plan.layers:
        if name not in weights:
            raise ConfigError(f"plan.layers.{name}", "no tensor of that name in weights")
        if name not in ranks:
            raise ConfigError(f"plan.layers.{name}", "no tensor of that name in ranks")
    out: dict[str, QuantizedLayer] = {}
    shared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, lp in plan.layers.items():
        if lp.quantizer == "shared":
            shared[name] = _survivors(weights[name], ranks[name], lp.sparsity, name)
            continue
        mask, values = _survivors(weights[name], ranks[name], lp.sparsity, name)
        indices, codebook = SINGLE_QUANTIZERS[lp.quantizer](values, lp.bits)
        out[name] = QuantizedLayer(tuple(weights[name].shape), mask, indices, codebook)
    if shared:
        assert plan.shared_k is not None  # CompressionPlan validates this
        coded = shared_quantize({n: v for n, (_, v) in shared.items()}, plan.shared_k)
        for name, (mask, _) in shared.items():
            indices, codebook = coded[name]
            out[name] = QuantizedLayer(tuple(weights[name].shape), mask, indices, codebook)
    return {name: out[name] for name in plan.layers}


def student_state_dict(
    teacher_state: dict[str, torch.Tensor], layers: dict[str, QuantizedLayer]
) -> dict[str, torch.Tensor]:
    """The student's state_dict: the teacher's, with each compressed tensor dequantised.

    teacher_state: the teacher's ``state_dict()``; layers: name -> compressed tensor.
    Compressed tensors are replaced by ``dequantize()`` (cast to the teacher tensor's dtype and
    device only where those differ from float32 on the CPU); every other entry is the
    teacher's tensor itself (by reference, not copied).
    """
    out = dict(teacher_state)
    for name, layer in layers.items():
        if name not in teacher_state:
            raise KeyError(f"{name}: compressed tensor not in the teacher's state_dict")
        ref = teacher_state[name]
        if tuple(ref.shape) != tuple(layer.shape):
            raise ValueError(
                f"{name}: teacher shape {tuple(ref.shape)} != compressed shape {layer.shape}"
            )
        w = layer.dequantize()
        if w.dtype != ref.dtype or w.device != ref.device:
            w = w.to(device=ref.device, dtype=ref.dtype)
        out[name] = w
    return out


# quantizers that work on one tensor alone: name -> (values (m,), bits) -> (indices, codebook);
# refine uses them too (fine-tuning in the loop, re-quantising, reconstruction grids)
SINGLE_QUANTIZERS: dict[str, Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]] = {
    "uniform": uniform_quantize,
    "kmeans": kmeans_quantize,
}
