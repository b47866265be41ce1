"""The Target: a teacher model, its compressible tensors, and the data fidelity is measured on.

Layer selection works on any ``nn.Module``: weights of Linear/Conv modules by default,
narrowed by ``include``/``exclude`` entries that are parameter names, module names or
regular expressions (full match against either).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from moecomp.config import LayersConfig, ProblemConfig
from moecomp.data import Split, Splits, calibration_indices, load_dataset
from moecomp.errors import ConfigError
from moecomp.zoo import resolve_factory


@dataclass(frozen=True)
class LayerRef:
    """A compressible tensor: ``name`` is its parameter name (``fc1.weight``)."""

    name: str
    module: str
    kind: str  # module type name, e.g. "Linear"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _matches(entry: str, names: Iterable[str]) -> bool:
    for n in names:
        if entry == n:
            return True
        try:
            if re.fullmatch(entry, n):
                return True
        except re.error:
            continue
    return False


def select_layers(model: nn.Module, *, include: Iterable[str] = (),
                  exclude: Iterable[str] = (),
                  types: Iterable[str | type[nn.Module]] = ("Linear", "Conv1d", "Conv2d",
                                                             "Conv3d")) -> list[LayerRef]:
    """The compressible weight tensors of ``model``, in parameter order.

    types: module classes or their names; a module is a candidate when its ``weight`` is a
        Parameter and its type (or a base class) is listed.
    include: if given, only candidates matching an entry (by parameter name, module name or
        regex) are kept; exclude drops matches. An entry that matches nothing is an error.
    """
    type_names = {t if isinstance(t, str) else t.__name__ for t in types}
    include, exclude = list(include), list(exclude)
    refs: list[LayerRef] = []
    all_names: list[str] = []
    for mod_name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter):
            continue
        pname = f"{mod_name}.weight" if mod_name else "weight"
        all_names += [pname, mod_name]
        if not any(c.__name__ in type_names for c in type(mod).__mro__):
            continue
        keys = (pname, mod_name)
        if include and not any(_matches(e, keys) for e in include):
            continue
        if any(_matches(e, keys) for e in exclude):
            continue
        refs.append(LayerRef(pname, mod_name, type(mod).__name__, tuple(w.shape)))
    for what, entries in (("include", include), ("exclude", exclude)):
        for e in entries:
            if not _matches(e, all_names):
                known = ", ".join(n for n in all_names if n.endswith("weight"))
                raise ConfigError(f"layers.{what}",
                                  f"{e!r} matches no weight of the model; weights: {known}")
    if not refs:
        raise ConfigError("layers", "no compressible tensor selected")
    return refs


DENSE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""The ``layers.dense_dtype`` choices."""


@dataclass
class Target:
    """What is compressed and what fidelity is measured against.

    calib_x: (n_calib, *in) inputs the search measures divergence on; calib_y their labels
    (or None). teacher_out: (n_calib, n_out) teacher outputs, computed once.
    """

    teacher: nn.Module
    layers: list[LayerRef]
    calib_x: torch.Tensor
    calib_y: torch.Tensor | None
    val: Split | None = None
    test: Split | None = None
    divergence: str = "kl"
    task: str = "classification"
    dense_dtype: str = "float32"
    teacher_out: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            self.teacher_out = self.teacher(self.calib_x)

    @property
    def layer_names(self) -> list[str]:
        return [ref.name for ref in self.layers]

    def weights(self) -> dict[str, torch.Tensor]:
        """The teacher's compressible tensors (detached views; do not modify)."""
        params = dict(self.teacher.named_parameters())
        return {ref.name: params[ref.name].detach() for ref in self.layers}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.teacher.state_dict().items()}

    @property
    def dense_torch_dtype(self) -> torch.dtype:
        """The dtype the uncompressed floating tensors are stored in."""
        return DENSE_DTYPES[self.dense_dtype]

    def round_dense(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with every floating tensor that is not compressed rounded to the dense
        dtype (kept in its own dtype), as a student has it after storage."""
        dt, skip = self.dense_torch_dtype, set(self.layer_names)
        return {k: v.to(dt).to(v.dtype) if k not in skip and v.is_floating_point() else v
                for k, v in state.items()}

    def student_base(self) -> dict[str, torch.Tensor]:
        """The teacher's state with the uncompressed tensors as a student stores them: what
        every student is built from."""
        return self.round_dense(self.state_dict())

    @property
    def n_params(self) -> int:
        return sum(int(v.numel()) for v in self.state_dict().values()
                   if v.is_floating_point())


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (``weights_only=True``: never unpickles
    arbitrary objects)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("model.weights", f"no such file: {p}")
    if p.suffix == ".safetensors":
        return load_file(str(p))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a non-torch or unsafe file
        raise ConfigError("model.weights", f"cannot read {p} as a weights-only torch file: "
                          f"{e}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError("model.weights", f"{p} does not hold a state dict of tensors")
    return obj


def load_teacher(problem: ProblemConfig, *, data: Splits | None = None,
                 progress: bool = True) -> nn.Module:
    """The problem's teacher: a zoo model (trained and cached on first use) or a user model."""
    m = problem.model
    if m.factory is not None:
        model = resolve_factory(m.factory)()
        assert m.weights is not None  # validated by ModelConfig
        try:
            model.load_state_dict(load_weights(m.weights))
        except RuntimeError as e:
            raise ConfigError("model.weights", f"does not fit the model: {e}") from None
        return model.eval()
    if m.weights is not None:
        from moecomp.train import init_model

        model = init_model(problem)
        model.load_state_dict(load_weights(m.weights))
        return model.eval()
    from moecomp.train import train_teacher

    model, _ = train_teacher(problem, data=data, progress=progress)
    return model


def select_from_config(model: nn.Module, cfg: LayersConfig) -> list[LayerRef]:
    return select_layers(model, include=cfg.include, exclude=cfg.exclude, types=cfg.types)


def build_target(problem: ProblemConfig, *, data: Splits | None = None,
                 progress: bool = True) -> Target:
    """Load data and teacher, select layers, and cache teacher outputs on calibration data."""
    if data is None:
        data = load_dataset(problem.data.dataset, path=problem.data.path, seed=problem.data.seed)
    teacher = load_teacher(problem, data=data, progress=progress)
    idx = calibration_indices(len(data.train), problem.data.calibration, seed=problem.data.seed)
    return Target(
        teacher=teacher,
        layers=select_from_config(teacher, problem.layers),
        calib_x=data.train.x[idx].contiguous(),
        calib_y=data.train.y[idx].contiguous(),
        val=data.val,
        test=data.test,
        divergence=problem.objectives.divergence,
        dense_dtype=problem.layers.dense_dtype,
    )
