"""Refine one chosen solution: reconstruction, distillation fine-tuning, bin merging.

Only picked solutions are refined (it costs far more per solution than the search's
evaluation). Three optional steps, each asked for explicitly, in this order:

- **reconstruction** (``reconstruct``): least-squares re-fit of the survivors and GPTQ rounding
  on calibration samples, layer by layer (a layer keeps its old weights when its re-fit is not
  better in calibration MSE); no gradient training;
- **fine-tuning** (``finetune_epochs > 0``): distillation from the teacher with the target's
  own divergence (plus cross-entropy on labels for classifiers), ``moecomp.finetune``;
- **bin merging** (``merge``, seed 2): neighbouring levels merged along one merge path as far
  as the validation measure stays within ``tolerance`` of its value before merging
  (``moecomp.merge``).

**A step is kept only if the end-to-end validation measure does not get worse** (the metric's
drop, or the mean divergence for a target without a metric; on the calibration split when
the target has no validation split): reconstruction and fine-tuning must not raise it at
all, merging must stay within its tolerance (default 0). A dropped step leaves the solution
as it was before it, and the result says which steps were kept, which were dropped and why.
Training reads the calibration side only; no step sees the test split.

The refined solution is written to the run folder as ``refined/rN.mcz`` with a row in
``refined.csv`` that records its lineage (parent, the searched solution it comes from, each
step with its outcome).
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

from moecomp import outputs
from moecomp.apply import SINGLE_QUANTIZERS, QuantizedLayer, student_state_dict
from moecomp.codec import write_mcz
from moecomp.data import Split
from moecomp.errors import ConfigError
from moecomp.evaluate.options import resolve_device
from moecomp.finetune import Diverged, distil, finetune_settings
from moecomp.merge import merge_bins
from moecomp.metric import drop_unit as metric_drop_unit
from moecomp.reconstruct import reconstruct as reconstruct_layers
from moecomp.runs import atomic_write_csv, read_table
from moecomp.solution import RunContext, Solution, dense_tensors, student_model
from moecomp.target import Fidelity, Target, load_state

FIDELITY_KINDS = ("metric", "divergence")
"""What the validation measure is: the metric's drop (its units, points for accuracy), or the
mean divergence."""

GUIDE_SAMPLES = 512
"""Calibration samples whose divergence orders the merges (the merge path's guide)."""


@dataclass(frozen=True)
class StepOutcome:
    """One refine step: ``step`` ("reconstruct", "finetune", "merge"), whether it was
    ``kept``, the validation measure ``before`` and ``after`` it (``after``: what the step
    gave, kept or not), and ``note``: what it did and why it was kept or dropped."""

    step: str
    kept: bool
    before: float
    after: float
    note: str

    def line(self) -> str:
        return f"{self.step}: {'kept' if self.kept else 'dropped'} ({self.note})"


@dataclass(frozen=True)
class RefineResult:
    """A refined solution.

    key: its key (``rN``); parent: the solution it was refined from; root: the searched
    solution at the start of its lineage. steps: the outcome of each asked step.
    fidelity_metric / fidelity_split: what the validation measure is and where it was measured;
    start_measure: the parent's; fidelity_before / fidelity_after: before and after merging
    (equal without merging). levels_before / levels_after: per layer, before and after
    merging. file_bytes: the size of ``path`` on disk; ratio: fp32 bytes of all parameters /
    file_bytes.
    """

    key: str
    parent: str
    root: str
    steps: tuple[StepOutcome, ...]
    levels_before: dict[str, int]
    levels_after: dict[str, int]
    fidelity_metric: str
    fidelity_split: str
    start_measure: float
    fidelity_before: float
    fidelity_after: float
    tolerance: float
    finetune_epochs: int
    reconstructed: bool
    finetuned: bool
    merged: bool
    val_metric: float
    test_metric: float
    val_divergence: float
    test_divergence: float
    val_drop: float
    test_drop: float
    metric_name: str
    metric_unit: str
    file_bytes: int
    ratio: float
    path: str
    val_drop_se: float = math.nan
    test_drop_se: float = math.nan
    val_divergence_se: float = math.nan
    test_divergence_se: float = math.nan

    @property
    def val_measure(self) -> float:
        """The refined solution's validation measure (the one steps were kept by)."""
        return self.fidelity_after

    @property
    def val_measure_se(self) -> float:
        """The standard error of the validation measure (NaN where the metric has no
        per-sample values; ``moecomp.target.standard_error``)."""
        return self.val_drop_se if self.fidelity_metric == "metric" else self.val_divergence_se


def _reconstructed(target: Target, sol: Solution, layers: dict[str, QuantizedLayer],
                   state: dict[str, torch.Tensor], pool: Split, n_images: int, seed: int,
                   progress: bool) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor]]:
    """The solution after layer-wise reconstruction on ``n_images`` calibration-side
    samples of ``pool``; a layer of a shared codebook keeps that codebook, any other gets
    its plan's quantizer on the re-fitted survivors."""
    plan = sol.plan.layers

    def grid(name: str, values: torch.Tensor) -> torch.Tensor:
        if plan[name].quantizer == "shared":
            return layers[name].codebook
        return SINGLE_QUANTIZERS[plan[name].quantizer](values, plan[name].bits)[1]

    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(pool), generator=gen)[:n_images]
    new_layers, new_state, _ = reconstruct_layers(target.teacher, state, layers, grid,
                                                  pool.take(pick).inputs,
                                                  batch_size=target.batch_size,
                                                  progress=progress)
    return new_layers, new_state


# --- measures ------------------------------------------------------------------------------
def measure_split(target: Target) -> str:
    """Where refine (and compress) decide: validation, or calibration without it."""
    return "validation" if target.val is not None else "calibration"


def measure_of(f: Fidelity, metric: str) -> float:
    """The validation measure of a Fidelity: the metric's drop or the divergence."""
    return f.metric_drop if metric == "metric" else f.divergence


def _layers_fidelity(target: Target, base_state: dict[str, torch.Tensor], split: str,
                     metric: str) -> Callable[[dict[str, QuantizedLayer]], float]:
    """layers -> the measure on ``split`` of the student with these layers over ``base_state``."""
    model = student_model(target.teacher, base_state)

    def measure(layers: dict[str, QuantizedLayer]) -> float:
        load_state(model, student_state_dict(base_state, layers))
        return measure_of(target.fidelity(model, split), metric)

    return measure


def _guide(target: Target, base_state: dict[str, torch.Tensor], n: int
           ) -> Callable[[dict[str, QuantizedLayer]], float]:
    """layers -> mean divergence on the first ``n`` calibration samples: the cheap measure
    that orders merges across layers."""
    model = student_model(target.teacher, base_state)
    n = min(n, len(target.calib))
    x = target.calib.take(slice(0, n)).inputs
    t = outputs.take(target.teacher_out, slice(0, n))

    def guide(layers: dict[str, QuantizedLayer]) -> float:
        load_state(model, student_state_dict(base_state, layers))
        return float(target.divergence(t, target.run(model, x)).double().mean())

    return guide


def drop_unit(target: Target) -> str:
    """The unit of the target's metric drop: ``points`` for a percentage, else its own."""
    return "" if target.metric is None else metric_drop_unit(target.metric.unit)


def _fmt(value: float, metric: str, unit: str) -> str:
    if metric == "metric":
        return f"{value:.3f}{' ' + unit if unit else ''}"
    return f"{value:.4g}"


# --- the refine step ---------------------------------------------------------------------
def next_key(ctx: RunContext) -> str:
    folder = ctx.run.path / "refined"
    used = {int(p.stem[1:]) for p in folder.glob("r*.mcz") if p.stem[1:].isdigit()}
    return f"r{max(used, default=0) + 1}"


def root_of(ctx: RunContext, sol: Solution) -> str:
    """The searched solution at the start of ``sol``'s lineage (its own id if searched)."""
    if not sol.key.startswith("r"):
        return sol.key
    csv = ctx.run.path / "refined.csv"
    if csv.is_file():
        df = read_table(csv)
        row = df[df["key"].astype(str) == sol.key]
        if not row.empty:
            col = "root" if "root" in row.columns and pd.notna(row["root"].iloc[0]) else "parent"
            return str(row[col].iloc[0])
    return str(sol.parent) if sol.parent is not None else sol.key


def refine(run: RunContext | str | os.PathLike[str], solution: str | int, *,
           reconstruct: bool = False, finetune_epochs: int = 0, merge: bool = False,
           tolerance: float = 0.0, metric: str | None = None, lr: float | None = None,
           seed: int = 0, calibration: int = 8192, guide_samples: int = GUIDE_SAMPLES,
           progress: bool = True, device: str = "auto", masks: str = "fixed",
           repair_masks: bool = False, optimizer: str = "adam") -> RefineResult:
    """Refine one solution of a run and add it to the run as ``refined/rN.mcz``.

    reconstruct: re-fit survivors and biases layer by layer on ``calibration`` samples of
        the calibration side first (see ``moecomp.reconstruct``); no gradient training.
    finetune_epochs: distillation epochs (0: none), ``optimizer`` (adam or sgd), ``lr``
        (None: the optimizer's default, ``moecomp.finetune.OPTIMIZERS``) and ``seed`` for
        it; fine-tunes the reconstructed solution when reconstruction was kept.
    masks: how the survivors move while fine-tuning (``moecomp.finetune.MaskSchedule``):
        ``fixed`` (the plan's), ``gradual`` (pruned from denser masks toward the plan's
        counts) or ``rigl`` (drop and regrow); every mode ends at the plan's counts.
    repair_masks: before fine-tuning, survivors on hidden units that cannot matter (no
        survivor computes them, or none reads them) move to units that do
        (``MaskSchedule.repair``); the step's detail says how many moved.
    merge: merge bins; ``tolerance``: how much worse than before merging the validation
        measure may end, in units of ``metric`` (points for accuracy, or divergence).
    metric: the validation measure steps are kept by: "metric" (the metric's drop) or
        "divergence"; default "metric" when the target has one.
    device: where the models run (``auto``: CUDA when torch sees one; ``cpu``, ``cuda``,
        ``cuda:N``): measurements, reconstruction's forwards, fine-tuning, merging. The
        solution's tensors stay on the CPU, so the file is written as on the CPU.

    Every step is kept only if the validation measure does not get worse (merging: not more
    than ``tolerance``); ``result.steps`` says what was kept and why. Without any step the
    solution is stored as it is.
    """
    if metric == "accuracy":  # the name before metrics were generic
        metric = "metric"
    if metric is not None and metric not in FIDELITY_KINDS:
        raise ConfigError("metric", f"must be one of {', '.join(FIDELITY_KINDS)}, got "
                          f"{metric!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not (
            math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError("tolerance", f"must be a finite number >= 0, got {tolerance!r}")
    schedule, lr = finetune_settings(finetune_epochs, masks=masks, repair_masks=repair_masks,
                                     optimizer=optimizer, lr=lr)
    if reconstruct and not calibration >= 1:
        raise ConfigError("calibration", f"must be >= 1 samples, got {calibration!r}")
    if not guide_samples >= 1:
        raise ConfigError("guide_samples", f"must be >= 1 samples, got {guide_samples!r}")
    dev = resolve_device(device, field="device")
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
    target = ctx.target.on_device(dev)
    split = measure_split(target)
    unit = drop_unit(target) if metric == "metric" else ""
    what = (f"{target.metric_name} drop" if metric == "metric" else "divergence") + f" on {split}"
    bits = {n: lp.bits for n, lp in sol.plan.layers.items()}
    kinds = {n: lp.quantizer for n, lp in sol.plan.layers.items()}
    t0 = time.perf_counter()
    pool = target.pool if target.pool is not None else target.calib
    model = student_model(target.teacher, sol.state)

    def measure(state: dict[str, torch.Tensor]) -> float:
        load_state(model, state)
        return measure_of(target.fidelity(model, split), metric)

    layers, state = sol.layers, target.round_dense(sol.state)
    start = now = measure(state)
    outcomes: list[StepOutcome] = []

    def judge(step: str, after: float, detail: str) -> bool:
        kept = after <= now
        verdict = "not worse" if kept else "worse"
        note = f"{what} {_fmt(now, metric, unit)} -> {_fmt(after, metric, unit)}, {verdict}"
        outcomes.append(StepOutcome(step, kept, now, after,
                                    f"{detail}; {note}" if detail else note))
        return kept

    if reconstruct:
        new_layers, new_state = _reconstructed(target, sol, layers, state, pool, calibration,
                                               seed, progress)
        new_state = target.round_dense(new_state)
        after = measure(new_state)
        if judge("reconstruct", after, f"{min(calibration, len(pool))} calibration samples"):
            layers, state, now = new_layers, new_state, after
    if finetune_epochs > 0:
        detail = f"{finetune_epochs} epoch(s), {optimizer} lr {lr:g}, masks {schedule.mode}"
        # the survivors are the distillation's own (the plan's with fixed masks)
        try:
            distilled = distil(student_model(target.teacher, state), target, layers, bits,
                               pool, epochs=finetune_epochs, masks=schedule, lr=lr,
                               optimizer=optimizer, seed=seed, quantizers=kinds,
                               progress=progress)
        except Diverged as e:  # nothing to measure: dropped, and said why
            outcomes.append(StepOutcome("finetune", False, now, math.nan,
                                        f"{detail}; {e}; a lower learning rate may "
                                        "train"))
        else:
            trained, new_layers = distilled.weights, distilled.quantized(bits, kinds)
            if schedule.repair:
                detail += f", {distilled.repaired} survivor(s) repaired"
            # fine-tuned biases are rounded as they will be stored
            new_state = target.round_dense(
                student_state_dict({k: trained.get(k, v) for k, v in state.items()},
                                   new_layers))
            after = measure(new_state)
            if judge("finetune", after, detail):
                layers, state, now = new_layers, new_state, after
    before_merge = now
    levels_before = {n: ql.n_levels for n, ql in layers.items()}
    if merge:
        result = merge_bins(layers, _layers_fidelity(target, state, split, metric),
                            tolerance=float(tolerance), baseline=now,
                            guide=_guide(target, state, guide_samples), progress=progress)
        n0, n1 = sum(levels_before.values()), sum(result.levels_after.values())
        detail = (f"{n0} -> {n1} levels in {result.rounds} of {result.path_length} merges of "
                  f"the path, {result.evaluations} measurements; tolerance "
                  f"{_fmt(float(tolerance), metric, unit)}")
        kept = result.rounds > 0
        note = (f"{detail}; {what} {_fmt(now, metric, unit)} -> "
                f"{_fmt(result.fidelity_after, metric, unit)}"
                if kept else f"{detail}; no merge stays within the tolerance")
        outcomes.append(StepOutcome("merge", kept, now, result.fidelity_after, note))
        if kept:
            layers, now = result.layers, result.fidelity_after
            state = student_state_dict(state, layers)

    key = next_key(ctx)
    folder = ctx.run.path / "refined"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.mcz"
    root = root_of(ctx, sol)
    # the file says where it comes from; what each step did is in refined.csv (a few hundred
    # bytes of notes would be a tenth of a small model's file)
    meta = {"parent": sol.key, "root": root, "problem": ctx.problem.name,
            "steps": [o.step for o in outcomes if o.kept], "tied": target.tied}
    write_mcz(path, layers, dense_tensors(state, layers, dtype=target.dense_torch_dtype),
              plan=sol.plan.to_dict(), meta=meta, order=list(state))
    size = path.stat().st_size
    final = student_model(target.teacher, state)
    n_params = sum(int(v.numel()) for v in state.values() if v.is_floating_point())
    val, test = (target.fidelity(final, name) if target.split(name) is not None
                 else Fidelity(math.nan, math.nan, math.nan) for name in ("validation", "test"))
    kept_steps = {o.step for o in outcomes if o.kept}
    res = RefineResult(
        key=key, parent=sol.key, root=root, steps=tuple(outcomes),
        levels_before=levels_before,
        levels_after={n: ql.n_levels for n, ql in layers.items()}, fidelity_metric=metric,
        fidelity_split=split, start_measure=start, fidelity_before=before_merge,
        fidelity_after=now, tolerance=float(tolerance), finetune_epochs=finetune_epochs,
        reconstructed="reconstruct" in kept_steps, finetuned="finetune" in kept_steps,
        merged="merge" in kept_steps,
        val_metric=val.metric, test_metric=test.metric, val_divergence=val.divergence,
        test_divergence=test.divergence, val_drop=val.metric_drop, test_drop=test.metric_drop,
        metric_name=target.metric_name,
        metric_unit=target.metric.unit if target.metric is not None else "",
        file_bytes=size, ratio=4 * n_params / size, path=str(path),
        val_drop_se=val.metric_drop_se, test_drop_se=test.metric_drop_se,
        val_divergence_se=val.divergence_se, test_divergence_se=test.divergence_se)
    _record(ctx, res, seconds=time.perf_counter() - t0)
    return res


def _status(res: RefineResult, step: str) -> str:
    for o in res.steps:
        if o.step == step:
            return "kept" if o.kept else "dropped"
    return ""


def _record(ctx: RunContext, res: RefineResult, *, seconds: float) -> None:
    csv = ctx.run.path / "refined.csv"
    row = {
        "key": res.key, "parent": res.parent, "root": res.root,
        "reconstruct": _status(res, "reconstruct"), "finetune": _status(res, "finetune"),
        "finetune_epochs": res.finetune_epochs, "merge": _status(res, "merge"),
        "measure": res.fidelity_metric, "split": res.fidelity_split,
        "tolerance": res.tolerance, "start_measure": res.start_measure,
        "fidelity_before": res.fidelity_before, "fidelity_after": res.fidelity_after,
        "levels_before": json.dumps(res.levels_before),
        "levels_after": json.dumps(res.levels_after),
        "val_metric": res.val_metric, "test_metric": res.test_metric,
        "val_drop": res.val_drop, "test_drop": res.test_drop,
        "val_divergence": res.val_divergence, "test_divergence": res.test_divergence,
        "val_drop_se": res.val_drop_se, "test_drop_se": res.test_drop_se,
        "val_divergence_se": res.val_divergence_se,
        "test_divergence_se": res.test_divergence_se,
        "file_bytes": res.file_bytes,
        "ratio": res.ratio, "seconds": round(seconds, 2),
        "steps": " | ".join(o.line() for o in res.steps), "path": res.path,
    }
    old = read_table(csv) if csv.is_file() else pd.DataFrame()
    atomic_write_csv(csv, pd.concat([old, pd.DataFrame([row])], ignore_index=True))
