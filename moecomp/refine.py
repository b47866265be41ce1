"""Refine one chosen solution: reconstruction, distillation fine-tuning, bin merging.

Only picked solutions are refined (it costs far more per solution than the search's
evaluation). Three optional steps, in this order: layer-wise reconstruction (``reconstruct``:
least-squares re-fit of the survivors and GPTQ rounding on calibration samples, no gradient
training); fine-tuning, distillation from the teacher with the target's own divergence (plus
cross-entropy on labels for classifiers) that keeps the masks fixed and quantises in the loop
(straight-through estimator); bin merging (seed 2), which merges neighbouring levels while
the validation measure (the metric's drop, or the divergence) stays within a tolerance. All
of it reads the calibration split only; no labels are needed. The refined solution is written
to the run folder as ``refined/rN.mcz`` with a row in ``refined.csv`` that records its
lineage.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch

from moecomp.apply import SINGLE_QUANTIZERS, QuantizedLayer, student_state_dict
from moecomp.codec import write_mcz
from moecomp.data import Split
from moecomp.errors import ConfigError
from moecomp.finetune import finetune, requantize
from moecomp.merge import merge_bins
from moecomp.reconstruct import reconstruct as reconstruct_layers
from moecomp.runs import atomic_write_csv, read_table
from moecomp.solution import RunContext, Solution, dense_tensors, student_model
from moecomp.target import Fidelity, load_state

FIDELITY_KINDS = ("metric", "divergence")
"""What bin merging's tolerance is in: the metric's drop on validation (its units, points for
accuracy), or the mean divergence on validation."""


@dataclass(frozen=True)
class RefineResult:
    key: str
    parent: str
    levels_before: dict[str, int]
    levels_after: dict[str, int]
    fidelity_metric: str
    fidelity_before: float
    fidelity_after: float
    tolerance: float
    finetune_epochs: int
    reconstructed: bool
    val_metric: float
    test_metric: float
    val_divergence: float
    test_divergence: float
    metric_name: str
    metric_unit: str
    file_bytes: int
    ratio: float
    path: str


def _reconstructed(ctx: RunContext, sol: Solution, pool: Split, n_images: int, seed: int,
                   progress: bool) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor]]:
    """The solution after layer-wise reconstruction on ``n_images`` calibration-side
    samples of ``pool``; a layer of a shared codebook keeps that codebook, any other gets
    its plan's quantizer on the re-fitted survivors."""
    plan = sol.plan.layers

    def grid(name: str, values: torch.Tensor) -> torch.Tensor:
        if plan[name].quantizer == "shared":
            return sol.layers[name].codebook
        return SINGLE_QUANTIZERS[plan[name].quantizer](values, plan[name].bits)[1]

    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(pool), generator=gen)[:n_images]
    layers, state, _ = reconstruct_layers(ctx.target.teacher, sol.state, sol.layers, grid,
                                          pool.take(pick).inputs,
                                          batch_size=ctx.target.batch_size, progress=progress)
    return layers, state


# --- the refine step ---------------------------------------------------------------------

def _fidelity(ctx: RunContext, base_state: dict[str, torch.Tensor], metric: str
              ) -> Callable[[dict[str, QuantizedLayer]], float]:
    target = ctx.target
    model = student_model(target.teacher, base_state)
    split = "validation" if target.val is not None else "calibration"

    def measure(layers: dict[str, QuantizedLayer]) -> float:
        load_state(model, student_state_dict(base_state, layers))
        f = target.fidelity(model, split)
        return f.metric_drop if metric == "metric" else f.divergence

    return measure


def next_key(ctx: RunContext) -> str:
    folder = ctx.run.path / "refined"
    used = {int(p.stem[1:]) for p in folder.glob("r*.mcz") if p.stem[1:].isdigit()}
    return f"r{max(used, default=0) + 1}"


def refine(run: RunContext | str | os.PathLike[str], solution: str | int, *, merge: bool = True,
           tolerance: float = 0.5, metric: str | None = None,
           finetune_epochs: int = 0, lr: float = 2e-3, seed: int = 0,
           reconstruct: bool = False, calibration: int = 8192,
           progress: bool = True) -> RefineResult:
    """Refine one solution of a run and add it to the run as ``refined/rN.mcz``.

    reconstruct: re-fit survivors and biases layer by layer on ``calibration`` samples of
        the calibration split first (see ``moecomp.reconstruct``); no gradient training.

    tolerance: how much worse than the unmerged (fine-tuned) solution the merged one may be,
        in units of ``metric`` on the validation split: the metric's drop ("metric", points
        for accuracy) or the mean divergence ("divergence"); default: "metric" when the
        target has one. The result never exceeds it.
    """
    if metric == "accuracy":  # the name before metrics were generic
        metric = "metric"
    if metric is not None and metric not in FIDELITY_KINDS:
        raise ConfigError("metric", f"must be one of {', '.join(FIDELITY_KINDS)}, got "
                          f"{metric!r}")
    if not tolerance >= 0:
        raise ConfigError("tolerance", f"must be >= 0, got {tolerance!r}")
    if finetune_epochs < 0:
        raise ConfigError("finetune_epochs", f"must be >= 0, got {finetune_epochs!r}")
    if reconstruct and not calibration >= 1:
        raise ConfigError("calibration", f"must be >= 1 samples, got {calibration!r}")
    ctx = run if isinstance(run, RunContext) else RunContext(run, progress=progress)
    if metric is None:
        metric = "metric" if ctx.target.metric is not None else "divergence"
    if metric == "metric" and ctx.target.metric is None:
        raise ConfigError("metric", "this target has no metric (it works on divergence "
                          "alone): use metric 'divergence'")
    sol: Solution = ctx.solution(solution)
    if finetune_epochs > 0 and any(lp.quantizer == "shared" for lp in sol.plan.layers.values()):
        raise ConfigError("finetune_epochs", "fine-tuning keeps each layer's own codebook; a "
                          "plan with the shared quantizer can be reconstructed and merged, "
                          "not fine-tuned (use --finetune-epochs 0)")
    target = ctx.target
    bits = {n: lp.bits for n, lp in sol.plan.layers.items()}
    layers, state = sol.layers, sol.state
    t0 = time.perf_counter()
    pool = target.pool if target.pool is not None else target.calib
    if reconstruct:
        layers, state = _reconstructed(ctx, sol, pool, calibration, seed, progress)
    if finetune_epochs > 0:
        model = student_model(target.teacher, state)
        kinds = {n: lp.quantizer for n, lp in sol.plan.layers.items()}
        trained = finetune(model, target, layers, bits, pool,
                           epochs=finetune_epochs, lr=lr, seed=seed, quantizers=kinds,
                           progress=progress)
        layers = requantize(trained, layers, bits, kinds)
        state = student_state_dict({k: trained.get(k, v) for k, v in state.items()}, layers)
    # re-fitted and fine-tuned biases are rounded as they will be stored
    state = target.round_dense(state)
    fidelity = _fidelity(ctx, state, metric)
    before = {n: ql.n_levels for n, ql in layers.items()}
    f_before = fidelity(layers)
    f_after = f_before
    if merge:
        result = merge_bins(layers, fidelity, tolerance=tolerance, baseline=f_before)
        layers, f_after = result.layers, result.fidelity_after
    state = student_state_dict(state, layers)
    model = student_model(target.teacher, state)
    key = next_key(ctx)
    folder = ctx.run.path / "refined"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.mcz"
    meta = {"parent": sol.key, "problem": ctx.problem.name, "reconstruct": reconstruct,
            "finetune_epochs": finetune_epochs, "merge": merge, "tolerance": tolerance,
            "metric": metric, "tied": target.tied}
    size = write_mcz(path, layers, dense_tensors(state, layers,
                                                 dtype=target.dense_torch_dtype),
                     plan=sol.plan.to_dict(),
                     meta=meta, order=list(state))
    n_params = sum(int(v.numel()) for v in state.values() if v.is_floating_point())
    val, test = (target.fidelity(model, name) if target.split(name) is not None
                 else Fidelity(math.nan, math.nan, math.nan) for name in ("validation", "test"))
    res = RefineResult(
        key=key, parent=sol.key, levels_before=before,
        levels_after={n: ql.n_levels for n, ql in layers.items()}, fidelity_metric=metric,
        fidelity_before=f_before, fidelity_after=f_after, tolerance=tolerance,
        finetune_epochs=finetune_epochs, reconstructed=reconstruct,
        val_metric=val.metric, test_metric=test.metric, val_divergence=val.divergence,
        test_divergence=test.divergence, metric_name=target.metric_name,
        metric_unit=target.metric.unit if target.metric is not None else "",
        file_bytes=size, ratio=4 * n_params / size,
        path=str(path))
    _record(ctx, res, seconds=time.perf_counter() - t0)
    return res


def _record(ctx: RunContext, res: RefineResult, *, seconds: float) -> None:
    csv = ctx.run.path / "refined.csv"
    row = {
        "key": res.key, "parent": res.parent, "reconstructed": res.reconstructed,
        "finetune_epochs": res.finetune_epochs,
        "tolerance_in": res.fidelity_metric, "tolerance": res.tolerance,
        "fidelity_before": res.fidelity_before, "fidelity_after": res.fidelity_after,
        "levels_before": json.dumps(res.levels_before),
        "levels_after": json.dumps(res.levels_after),
        "val_metric": res.val_metric, "test_metric": res.test_metric,
        "val_divergence": res.val_divergence, "test_divergence": res.test_divergence,
        "file_bytes": res.file_bytes,
        "ratio": res.ratio, "seconds": round(seconds, 2), "path": res.path,
    }
    old = read_table(csv) if csv.is_file() else pd.DataFrame()
    atomic_write_csv(csv, pd.concat([old, pd.DataFrame([row])], ignore_index=True))
