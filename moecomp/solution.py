"""Solutions of a run as real models: the shared step of pick, refine and export.

A solution is named by a key: the search's evaluation ``id`` (``"12"``) or a refined
solution's key (``"r1"``, stored as ``RUN/refined/r1.mcz``). Loading one gives its plan, its
compressed layers and the full student state dict, ready to load into the teacher's class.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from moecomp.apply import QuantizedLayer, apply_plan, student_state_dict
from moecomp.codec import read_mcz
from moecomp.config import ProblemConfig
from moecomp.errors import RunError
from moecomp.plan import CompressionPlan
from moecomp.runs import RunFolder
from moecomp.target import Target, build_target, load_state


@dataclass(frozen=True)
class Solution:
    """key: "12" (searched) or "r1" (refined); state: the whole student state_dict."""

    key: str
    plan: CompressionPlan
    layers: dict[str, QuantizedLayer]
    state: dict[str, torch.Tensor]
    parent: str | None = None


class RunContext:
    """A run folder with its problem's target and ranks, built lazily once.

    target: the run's Target when the caller has it (a search run from Python objects,
    ``moecomp.target.make_target``); otherwise it is rebuilt from the factories problem.json
    names. Either way it is checked against the teacher the search recorded in target.json.
    """

    def __init__(self, run: RunFolder | str | os.PathLike[str], *,
                 target: Target | None = None, progress: bool = False) -> None:
        self.run = run if isinstance(run, RunFolder) else RunFolder(run)
        self.progress = progress
        if target is not None:
            self.__dict__["target"] = target
            check_teacher(self.run, target)

    @cached_property
    def problem(self) -> ProblemConfig:
        return self.run.problem()

    @cached_property
    def target(self) -> Target:
        self.run.require("problem.json")
        target = build_target(self.problem, progress=self.progress)
        check_teacher(self.run, target)
        return target

    @cached_property
    def ranks(self) -> dict[str, torch.Tensor]:
        from moecomp.relevance import compute_ranks

        return compute_ranks(self.target, self.problem.relevance, progress=self.progress)

    def solution(self, key: str | int) -> Solution:
        key = str(key).strip()
        if key.startswith("r"):
            return self._refined(key)
        try:
            sid = int(key)
        except ValueError:
            raise RunError(f"solution {key!r}: give a search id (e.g. 12) or a refined key "
                           "(e.g. r1)") from None
        plan = self.run.plan(sid)
        return self.from_plan(str(sid), plan)

    def from_plan(self, key: str, plan: CompressionPlan) -> Solution:
        layers = apply_plan(plan, self.target.weights(), self.ranks)
        return Solution(key, plan, layers, student_state_dict(self.target.student_base(), layers))

    def _refined(self, key: str) -> Solution:
        path = self.run.path / "refined" / f"{key}.mcz"
        if not path.is_file():
            raise RunError(f"{self.run.path} has no refined solution {key} ({path} missing)")
        decoded = read_mcz(path)
        if decoded.plan is None:
            raise RunError(f"{path} holds no plan")
        # dense tensors come back in their stored dtype; students run in the teacher's
        dtypes = {k: v.dtype for k, v in self.target.state_dict().items()}
        state = {k: v.to(dtypes.get(k, v.dtype)) for k, v in decoded.state_dict.items()}
        return Solution(key, CompressionPlan.from_dict(decoded.plan), decoded.layers, state,
                        parent=decoded.meta.get("parent"))


def student_model(teacher: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the teacher with ``state`` loaded (eval mode, no grad)."""
    model = copy.deepcopy(teacher)
    load_state(model, state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def dense_tensors(state: dict[str, torch.Tensor], layers: dict[str, QuantizedLayer], *,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The state entries the codec stores as they are (everything not compressed), floating
    ones in ``dtype`` (the problem's ``layers.dense_dtype``; the state already holds values
    rounded to it, see ``Target.round_dense``, so storing them loses nothing)."""
    return {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
            for k, v in state.items() if k not in layers}


def check_teacher(run: RunFolder, target: Target) -> None:
    """A RunError when ``target``'s teacher is not the one the run's search recorded (its
    weights' fingerprint in target.json); runs that predate target.json are not checked."""
    want = run.target_info().get("teacher_sha256")
    if want is None:
        return
    got = teacher_fingerprint(target)
    if got != want:
        raise RunError(f"{run.path}: the teacher built now (sha256 {got[:12]}...) is not the "
                       f"one this run searched ({want[:12]}...): model.weights or the "
                       "factory changed since; restore them or search again")


def teacher_fingerprint(target: Target) -> str:
    """sha256 (hex) of the teacher's state: names, dtypes, shapes and bytes."""
    return state_fingerprint(target.state_dict())


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 (hex) of a state dict: every tensor's name, dtype, shape and bytes, by name."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def target_info(target: Target) -> dict[str, object]:
    """What a run records about its target in target.json."""
    from moecomp import inputs as inputs_mod
    from moecomp import outputs

    m = target.metric
    return {
        "teacher": type(target.teacher).__name__,
        "teacher_sha256": teacher_fingerprint(target),
        "n_params": target.n_params,
        "inputs": inputs_mod.describe(inputs_mod.head(target.calib.inputs, 1)),
        "calibration_samples": len(target.calib),
        "validation_samples": len(target.val) if target.val is not None else 0,
        "test_samples": len(target.test) if target.test is not None else 0,
        "labels": target.calib.labels is not None,
        "output": target.output,
        "output_parts": outputs.describe(outputs.take(target.teacher_out, slice(0, 1))),
        "divergence": target.divergence.name,
        "metric": None if m is None else {
            "name": m.name, "ref": m.ref, "direction": m.direction, "unit": m.unit,
            "teacher_calibration": target.teacher_metric("calibration"),
        },
        "layers": [{"name": r.name, "module": r.module, "kind": r.kind, "shape": list(r.shape)}
                   for r in target.layers],
        "tied": target.tied,
    }
