"""Export a chosen solution: plan.json (the configuration), the .mcz file, and optionally a
dense safetensors and an ONNX model of the decoded weights. The export decodes its own file
and checks that the decoded model reproduces the in-memory solution exactly."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

from moecomp import inputs as inputs_mod
from moecomp import outputs
from moecomp.codec import read_mcz, write_mcz
from moecomp.errors import ConfigError, MoecompError
from moecomp.fold import close, folds_of
from moecomp.inputs import Inputs
from moecomp.solution import RunContext, dense_tensors, student_model
from moecomp.structured import shrink
from moecomp.target import Fidelity, Target
from moecomp.train import teacher_paths


class ExportMismatch(MoecompError):
    """The decoded file does not reproduce the in-memory solution."""


@dataclass(frozen=True)
class ExportResult:
    key: str
    mcz: Path
    plan_json: Path
    safetensors: Path | None
    onnx: Path | None
    file_bytes: int
    fp32_bytes: int  # 4 bytes x every floating-point parameter and buffer of the model
    teacher_file_bytes: int | None  # the teacher's safetensors file, where moecomp trained it
    ratio: float  # fp32_bytes / file_bytes
    metric_name: str  # "none" without a metric
    metric_unit: str
    val_metric: float
    test_metric: float
    teacher_test_metric: float
    val_divergence: float
    test_divergence: float
    # --structured: the shrunk dense model (units nobody reads removed, moecomp.structured)
    structured_safetensors: Path | None = None
    structured_json: Path | None = None
    structured_onnx: Path | None = None
    structured_params: int | None = None  # parameters of the shrunk model (all of them)


def export_solution(run: RunContext | str | os.PathLike[str], solution: str | int, *,
                    out: Path | None = None,
                    safetensors: bool = False, onnx: bool = False, structured: bool = False,
                    progress: bool = False) -> ExportResult:
    """Write and verify the files of one solution. ``out``: the .mcz path (default
    ``RUN/exports/<key>/<key>.mcz``); plan.json and the optional files go beside it.

    The decoded file must give the in-memory solution's outputs exactly on the calibration
    and test inputs (an :class:`ExportMismatch` otherwise). The dense safetensors holds each
    tied tensor once (``safetensors.torch.save_model``; ``load_model`` ties it back); the ONNX
    graph has the model's inputs by name (the keyword names, or ``input_0``, ...).

    structured: also write the decoded model with its removable units and filters removed
    physically (:func:`moecomp.structured.shrink`): ``<stem>.structured.safetensors``, the
    record of kept units and new parameter shapes ``<stem>.structured.json`` (load with
    :func:`moecomp.structured.resize` on a fresh model of the original class), and with
    ``onnx`` ``<stem>.structured.onnx``. Its outputs must equal the decoded model's to float
    tolerance on the calibration and test inputs (an :class:`ExportMismatch` otherwise).
    """
    ctx = run if isinstance(run, RunContext) else RunContext(run, progress=progress)
    sol = ctx.solution(solution)
    target = ctx.target
    mcz = Path(out) if out is not None else ctx.run.path / "exports" / sol.key / f"{sol.key}.mcz"
    if mcz.is_dir():
        raise ConfigError("out", f"{mcz} is a folder; give the path of the .mcz file")
    mcz.parent.mkdir(parents=True, exist_ok=True)
    plan_json = mcz.with_name(mcz.stem + ".plan.json")
    plan_json.write_text(sol.plan.to_json())
    meta = {"problem": ctx.problem.name, "solution": sol.key, "parent": sol.parent,
            "tied": target.tied, "folded": folds_of(target.teacher)}
    size = write_mcz(mcz, sol.layers, dense_tensors(sol.state, sol.layers,
                                                      dtype=target.dense_torch_dtype),
                     plan=sol.plan.to_dict(), meta=meta, order=list(sol.state))

    # Verify: the decoded file's model must give the in-memory solution's outputs exactly.
    decoded = read_mcz(mcz)
    memory = student_model(target.teacher, sol.state)
    model = student_model(target.teacher, decoded.state_dict)
    checks = [("calibration", target.calib.inputs)]
    if target.test is not None:
        checks.append(("test", target.test.inputs))
    for what, x in checks:
        a = outputs.tensors(target.run(memory, x))
        b = outputs.tensors(target.run(model, x))
        if len(a) != len(b) or not all(torch.equal(u, v) for u, v in zip(a, b, strict=True)):
            raise ExportMismatch(f"decoded {mcz} differs from solution {sol.key} on the "
                                 f"{what} inputs")
    nan = Fidelity(math.nan, math.nan, math.nan)
    val = target.fidelity(model, "validation") if target.val is not None else nan
    test = target.fidelity(model, "test") if target.test is not None else nan

    st_path = None
    if safetensors:
        st_path = mcz.with_suffix(".safetensors")
        # the decoded model's own state, dense tensors back in the teacher's dtypes
        save_model(model, str(st_path))
    onnx_path = None
    if onnx:
        onnx_path = mcz.with_suffix(".onnx")
        export_onnx(model, inputs_mod.head(target.calib.inputs, 1), onnx_path,
                    output=target.output)

    shrunk = _structured(target, model, mcz, onnx=onnx) if structured else {}

    fp32 = 4 * sum(int(v.numel()) for v in sol.state.values() if v.is_floating_point())
    teacher_file = None
    if ctx.problem.model.zoo is not None and ctx.problem.model.weights is None:
        w, _ = teacher_paths(ctx.problem)
        teacher_file = w.stat().st_size if w.is_file() else None
    m = target.metric
    result = ExportResult(sol.key, mcz, plan_json, st_path, onnx_path, size, fp32, teacher_file,
                          fp32 / size, target.metric_name, m.unit if m is not None else "",
                          val.metric, test.metric,
                          target.teacher_metric("test") if target.test is not None else math.nan,
                          val.divergence, test.divergence, **shrunk)
    mcz.with_name(mcz.stem + ".export.json").write_text(json.dumps(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()},
        indent=2))
    return result


def _structured(target: Target, model: torch.nn.Module, mcz: Path, *, onnx: bool
                ) -> dict[str, Any]:
    """Write the shrunk dense model of ``--structured``; its ExportResult fields."""
    shrunk, record = shrink(model, target.calib.inputs)
    checks = [("calibration", target.calib.inputs)]
    if target.test is not None:
        checks.append(("test", target.test.inputs))
    for what, x in checks:
        if not close(target.run(model, x), target.run(shrunk, x)):
            raise ExportMismatch(f"the structured model of {mcz} differs from the decoded "
                                 f"one on the {what} inputs")
    stem = mcz.with_suffix("")
    st = stem.with_name(stem.name + ".structured.safetensors")
    save_model(shrunk, str(st))
    js = stem.with_name(stem.name + ".structured.json")
    js.write_text(json.dumps({
        "about": "moecomp structured export: the decoded model with units and filters nobody "
                 "reads removed. Load: model = <original class>(); moecomp.fold.apply_folds("
                 "model, folded); moecomp.structured.resize(model, shapes); "
                 "safetensors.torch.load_model(model, <this stem>.structured.safetensors)",
        "folded": folds_of(target.teacher), **record.to_dict()}, indent=2))
    path = None
    if onnx:
        path = stem.with_name(stem.name + ".structured.onnx")
        export_onnx(shrunk, inputs_mod.head(target.calib.inputs, 1), path, output=target.output)
    return {"structured_safetensors": st, "structured_json": js, "structured_onnx": path,
            "structured_params": record.params_after}


class _Graph(torch.nn.Module):
    """The model as ONNX sees it: inputs by position (keyword inputs in their order), the
    measured output part flattened to a tuple of tensors."""

    def __init__(self, model: torch.nn.Module, keys: list[str] | None, output: str | None
                 ) -> None:
        super().__init__()
        self.model, self.keys, self.output = model, keys, output

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.keys, args, strict=True))) if self.keys is not None \
            else self.model(*args)
        part = outputs.select(out, self.output)
        return tuple(t for _, t in outputs.named_tensors(part, self.output or ""))


def export_onnx(model: torch.nn.Module, example: Inputs, path: Path, *,
                output: str | None = None) -> None:
    """ONNX of the decoded dense model: its inputs by name (the keyword names, or
    ``input_0``, ...), its outputs (the part ``output`` names, or all) by their paths in the
    output (``output`` for a single tensor, ``pooled``, ``hidden.0``, ...), batch dimension
    dynamic; checked by onnx.checker."""
    import onnx

    in_names = inputs_mod.names(example)
    args, kwargs = inputs_mod.args_kwargs(example)
    flat = args if not kwargs else tuple(kwargs.values())
    graph = _Graph(model, list(kwargs) if kwargs else None, output).eval()
    with torch.no_grad():
        out_names = [n for n, _ in outputs.named_tensors(
            outputs.select(inputs_mod.call(model, example), output), output or "")]
    axes = {n: {0: "batch"} for n in in_names + out_names}
    torch.onnx.export(graph, flat, str(path), input_names=in_names, output_names=out_names,
                      dynamo=False, dynamic_axes=axes)
    onnx.checker.check_model(onnx.load(str(path)))
