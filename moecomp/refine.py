"""Refine one chosen solution: reconstruction, distillation fine-tuning, bin merging.

Only picked solutions are refined (it costs far more per solution than the search's
evaluation). Three optional steps, in this order: layer-wise reconstruction (``reconstruct``:
least-squares re-fit of the survivors and GPTQ rounding on training images, no gradient
training); fine-tuning, which keeps the masks fixed and quantises in the loop
(straight-through estimator); bin merging (seed 2), which merges neighbouring levels while
the validation accuracy drop stays within a tolerance. The refined solution is written to
the run folder as ``refined/rN.mcz`` with a row in ``refined.csv`` that records its lineage.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from moecomp.apply import SINGLE_QUANTIZERS, QuantizedLayer, student_state_dict
from moecomp.codec import write_mcz
from moecomp.data import Split, Splits, load_dataset
from moecomp.divergence import kl
from moecomp.errors import ConfigError
from moecomp.merge import merge_bins
from moecomp.reconstruct import reconstruct as reconstruct_layers
from moecomp.runs import atomic_write_csv
from moecomp.solution import RunContext, Solution, dense_tensors, student_model
from moecomp.train import accuracy

FidelityKind = str  # "accuracy" (val accuracy drop, points) | "divergence" (calib KL, nats)


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
    val_acc: float
    test_acc: float
    file_bytes: int
    ratio: float
    path: str


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


def finetune(model: nn.Module, teacher: nn.Module, layers: dict[str, QuantizedLayer],
             bits: dict[str, int], train: Split, *, epochs: int, lr: float = 2e-3,
             quantizers: dict[str, str] | None = None,
             batch_size: int = 128, temperature: float = 2.0, seed: int = 0,
             progress: bool = True) -> dict[str, torch.Tensor]:
    """Distil the teacher into the masked, quantised student; returns float parameters.

    Loss: T^2 * KL(teacher_T || student_T) + cross-entropy on the labels. Masks stay fixed;
    pruned weights stay exactly zero.
    """
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
            idx = perm[i:i + batch_size]
            x, y = train.x[idx], train.y[idx]
            with torch.no_grad():
                t_out = teacher(x)
            live = {k: (_fake_quant(v, masks[k], bits[k], kinds.get(k, "uniform"))
                        if k in masks else v)
                    for k, v in params.items()}
            s_out = functional_call(model, live, (x,))
            loss = temperature**2 * kl(t_out / temperature, s_out / temperature)
            loss = loss + nn.functional.cross_entropy(s_out, y)
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


def _reconstructed(ctx: RunContext, sol: Solution, data: Splits, n_images: int, seed: int,
                   progress: bool) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor]]:
    """The solution after layer-wise reconstruction on ``n_images`` training images; a
    layer of a shared codebook keeps that codebook, any other gets its plan's quantizer
    on the re-fitted survivors."""
    plan = sol.plan.layers

    def grid(name: str, values: torch.Tensor) -> torch.Tensor:
        if plan[name].quantizer == "shared":
            return sol.layers[name].codebook
        return SINGLE_QUANTIZERS[plan[name].quantizer](values, plan[name].bits)[1]

    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(data.train), generator=gen)[:n_images]
    layers, state, _ = reconstruct_layers(ctx.target.teacher, sol.state, sol.layers, grid,
                                          data.train.x[pick], progress=progress)
    return layers, state


# --- the refine step ---------------------------------------------------------------------

def _fidelity(ctx: RunContext, base_state: dict[str, torch.Tensor], metric: str
              ) -> Callable[[dict[str, QuantizedLayer]], float]:
    target = ctx.target
    model = student_model(target.teacher, base_state)
    if metric == "accuracy":
        if target.val is None:
            raise ConfigError("metric", "accuracy needs a validation split")
        val = target.val
        teacher_acc = accuracy(target.teacher, val)

        def acc_drop(layers: dict[str, QuantizedLayer]) -> float:
            model.load_state_dict(student_state_dict(base_state, layers))
            return teacher_acc - accuracy(model, val)

        return acc_drop

    def divergence(layers: dict[str, QuantizedLayer]) -> float:
        model.load_state_dict(student_state_dict(base_state, layers))
        with torch.no_grad():
            return float(kl(target.teacher_out, model(target.calib_x)))

    return divergence


def next_key(ctx: RunContext) -> str:
    folder = ctx.run.path / "refined"
    used = {int(p.stem[1:]) for p in folder.glob("r*.mcz") if p.stem[1:].isdigit()}
    return f"r{max(used, default=0) + 1}"


def refine(run: RunContext | str | os.PathLike[str], solution: str | int, *, merge: bool = True,
           tolerance: float = 0.5, metric: FidelityKind = "accuracy",
           finetune_epochs: int = 0, lr: float = 2e-3, seed: int = 0,
           reconstruct: bool = False, calibration: int = 8192,
           progress: bool = True) -> RefineResult:
    """Refine one solution of a run and add it to the run as ``refined/rN.mcz``.

    reconstruct: re-fit survivors and biases layer by layer on ``calibration`` training
        images first (see ``moecomp.reconstruct``); no gradient training.

    tolerance: how much worse than the unmerged (fine-tuned) solution the merged one may be,
        in units of ``metric``: validation accuracy points ("accuracy") or calibration KL in
        nats ("divergence"). The result never exceeds it.
    """
    if metric not in ("accuracy", "divergence"):
        raise ConfigError("metric", f"must be accuracy or divergence, got {metric!r}")
    if not tolerance >= 0:
        raise ConfigError("tolerance", f"must be >= 0, got {tolerance!r}")
    if finetune_epochs < 0:
        raise ConfigError("finetune_epochs", f"must be >= 0, got {finetune_epochs!r}")
    if reconstruct and not calibration >= 1:
        raise ConfigError("calibration", f"must be >= 1 training images, got {calibration!r}")
    ctx = run if isinstance(run, RunContext) else RunContext(run, progress=progress)
    sol: Solution = ctx.solution(solution)
    if finetune_epochs > 0 and any(lp.quantizer == "shared" for lp in sol.plan.layers.values()):
        raise ConfigError("finetune_epochs", "fine-tuning keeps each layer's own codebook; a "
                          "plan with the shared quantizer can be reconstructed and merged, "
                          "not fine-tuned (use --finetune-epochs 0)")
    target = ctx.target
    bits = {n: lp.bits for n, lp in sol.plan.layers.items()}
    layers, state = sol.layers, sol.state
    t0 = time.perf_counter()
    if reconstruct or finetune_epochs > 0:
        data = load_dataset(ctx.problem.data.dataset, path=ctx.problem.data.path,
                            seed=ctx.problem.data.seed)
    if reconstruct:
        layers, state = _reconstructed(ctx, sol, data, calibration, seed, progress)
    if finetune_epochs > 0:
        model = student_model(target.teacher, state)
        kinds = {n: lp.quantizer for n, lp in sol.plan.layers.items()}
        trained = finetune(model, target.teacher, layers, bits, data.train,
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
            "metric": metric}
    size = write_mcz(path, layers, dense_tensors(state, layers,
                                                 dtype=target.dense_torch_dtype),
                     plan=sol.plan.to_dict(),
                     meta=meta, order=list(state))
    n_params = sum(int(v.numel()) for v in state.values() if v.is_floating_point())
    res = RefineResult(
        key=key, parent=sol.key, levels_before=before,
        levels_after={n: ql.n_levels for n, ql in layers.items()}, fidelity_metric=metric,
        fidelity_before=f_before, fidelity_after=f_after, tolerance=tolerance,
        finetune_epochs=finetune_epochs, reconstructed=reconstruct,
        val_acc=accuracy(model, target.val) if target.val is not None else float("nan"),
        test_acc=accuracy(model, target.test) if target.test is not None else float("nan"),
        file_bytes=size, ratio=4 * n_params / size, path=str(path))
    _record(ctx, res, seconds=time.perf_counter() - t0)
    return res


def _record(ctx: RunContext, res: RefineResult, *, seconds: float) -> None:
    csv = ctx.run.path / "refined.csv"
    row = {
        "key": res.key, "parent": res.parent, "reconstructed": res.reconstructed,
        "finetune_epochs": res.finetune_epochs,
        "metric": res.fidelity_metric, "tolerance": res.tolerance,
        "fidelity_before": res.fidelity_before, "fidelity_after": res.fidelity_after,
        "levels_before": json.dumps(res.levels_before),
        "levels_after": json.dumps(res.levels_after),
        "val_acc": res.val_acc, "test_acc": res.test_acc, "file_bytes": res.file_bytes,
        "ratio": res.ratio, "seconds": round(seconds, 2), "path": res.path,
    }
    old = pd.read_csv(csv) if csv.is_file() else pd.DataFrame()
    atomic_write_csv(csv, pd.concat([old, pd.DataFrame([row])], ignore_index=True))
