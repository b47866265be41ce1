"""Export a chosen solution: plan.json (the configuration), the .mcz file, and optionally a
dense safetensors and an ONNX model of the decoded weights. The export decodes its own file
and checks that the decoded model reproduces the in-memory solution exactly."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from moecomp.codec import read_mcz, write_mcz
from moecomp.errors import MoecompError
from moecomp.solution import RunContext, dense_tensors, student_model
from moecomp.train import accuracy, teacher_paths


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
    val_acc: float
    test_acc: float
    teacher_test_acc: float


def export_solution(run: RunContext | str | os.PathLike[str], solution: str | int, *,
                    out: Path | None = None,
                    safetensors: bool = False, onnx: bool = False,
                    progress: bool = False) -> ExportResult:
    """Write and verify the files of one solution. ``out``: the .mcz path (default
    ``RUN/exports/<key>/<key>.mcz``); plan.json and the optional files go beside it."""
    ctx = run if isinstance(run, RunContext) else RunContext(run, progress=progress)
    sol = ctx.solution(solution)
    mcz = Path(out) if out is not None else ctx.run.path / "exports" / sol.key / f"{sol.key}.mcz"
    mcz.parent.mkdir(parents=True, exist_ok=True)
    plan_json = mcz.with_name(mcz.stem + ".plan.json")
    plan_json.write_text(sol.plan.to_json())
    meta = {"problem": ctx.problem.name, "solution": sol.key, "parent": sol.parent}
    size = write_mcz(mcz, sol.layers, dense_tensors(sol.state, sol.layers,
                                                      dtype=ctx.target.dense_torch_dtype),
                     plan=sol.plan.to_dict(), meta=meta, order=list(sol.state))

    # Verify: the decoded file's model must give the in-memory solution's outputs exactly.
    decoded = read_mcz(mcz)
    target = ctx.target
    memory = student_model(target.teacher, sol.state)
    model = student_model(target.teacher, decoded.state_dict)
    checks = [("calibration", target.calib_x)]
    if target.test is not None:
        checks.append(("test", target.test.x))
    with torch.no_grad():
        for what, x in checks:
            if not torch.equal(memory(x), model(x)):
                raise ExportMismatch(f"decoded {mcz} differs from solution {sol.key} on the "
                                     f"{what} inputs")
    val_acc = accuracy(model, target.val) if target.val is not None else float("nan")
    test_acc = accuracy(model, target.test) if target.test is not None else float("nan")

    st_path = None
    if safetensors:
        st_path = mcz.with_suffix(".safetensors")
        # the decoded model's own state: dense tensors back in the teacher's dtypes
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st_path))
    onnx_path = None
    if onnx:
        onnx_path = mcz.with_suffix(".onnx")
        export_onnx(model, target.calib_x[:1], onnx_path)

    fp32 = 4 * sum(int(v.numel()) for v in sol.state.values() if v.is_floating_point())
    teacher_file = None
    if ctx.problem.model.zoo is not None and ctx.problem.model.weights is None:
        w, _ = teacher_paths(ctx.problem)
        teacher_file = w.stat().st_size if w.is_file() else None
    teacher_test = accuracy(target.teacher, target.test) if target.test is not None \
        else float("nan")
    result = ExportResult(sol.key, mcz, plan_json, st_path, onnx_path, size, fp32, teacher_file,
                          fp32 / size, val_acc, test_acc, teacher_test)
    mcz.with_name(mcz.stem + ".export.json").write_text(json.dumps(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()},
        indent=2))
    return result


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """ONNX of the decoded dense model, batch dimension dynamic; checked by onnx.checker."""
    import onnx

    torch.onnx.export(model, (example,), str(path), input_names=["input"],
                      output_names=["output"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    onnx.checker.check_model(onnx.load(str(path)))
