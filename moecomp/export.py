"""Export a chosen solution: plan.json (the configuration), the .mcz file, and optionally a
dense safetensors and an ONNX model of the decoded weights. The export decodes its own file
and checks that the decoded model reproduces the in-memory solution exactly."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model

from moecomp import inputs as inputs_mod
from moecomp import outputs
from moecomp.codec import read_mcz, write_mcz
from moecomp.errors import ConfigError, MoecompError
from moecomp.inputs import Inputs
from moecomp.solution import RunContext, dense_tensors, student_model
from moecomp.target import Fidelity
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


def export_solution(run: RunContext | str | os.PathLike[str], solution: str | int, *,
                    out: Path | None = None,
                    safetensors: bool = False, onnx: bool = False,
                    progress: bool = False) -> ExportResult:
    """Write and verify the files of one solution. ``out``: the .mcz path (default
    ``RUN/exports/<key>/<key>.mcz``); plan.json and the optional files go beside it.

    The decoded file must give the in-memory solution's outputs exactly on the calibration
    and test inputs (an :class:`ExportMismatch` otherwise). The dense safetensors holds each
    tied tensor once (``safetensors.torch.save_model``; ``load_model`` ties it back); the ONNX
    graph has the model's inputs by name (the keyword names, or ``input_0``, ...).
    """
    ctx = run if isinstance(run, RunContext) else RunContext(run, progress=progress)
    sol = ctx.solution(solution)
    target = ctx.target
    mcz = Path(out) if out is not None else ctx.run.path / "exports" / sol.key / f"{sol.key}.mcz"
    if not mcz.parent.is_dir() and out is not None:
        raise ConfigError("out", f"the folder {mcz.parent} does not exist")
    mcz.parent.mkdir(parents=True, exist_ok=True)
    plan_json = mcz.with_name(mcz.stem + ".plan.json")
    plan_json.write_text(sol.plan.to_json())
    meta = {"problem": ctx.problem.name, "solution": sol.key, "parent": sol.parent,
            "tied": target.tied}
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
        export_onnx(model, inputs_mod.head(target.calib.inputs, 1), onnx_path)

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
                          val.divergence, test.divergence)
    mcz.with_name(mcz.stem + ".export.json").write_text(json.dumps(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()},
        indent=2))
    return result


def export_onnx(model: torch.nn.Module, example: Inputs, path: Path) -> None:
    """ONNX of the decoded dense model with its inputs by name, batch dimension dynamic;
    checked by onnx.checker."""
    import onnx

    names = inputs_mod.names(example)
    args, kwargs = inputs_mod.args_kwargs(example)
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in names}
    torch.onnx.export(model, args + ((kwargs,) if kwargs else ()), str(path),
                      input_names=names, dynamo=False,
                      dynamic_axes=axes)
    onnx.checker.check_model(onnx.load(str(path)))
