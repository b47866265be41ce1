"""The Target: a teacher model, its compressible tensors, the data and the fidelity measures.

Everything downstream of the Target reads the teacher through it, so nothing assumes one
input tensor, logits, labels or a data set name:

- inputs are a tensor, a tuple or a dict of tensors (``moecomp.inputs``), run in batches of
  ``batch_size`` samples (:meth:`Target.run`);
- outputs are whatever the model returns, narrowed to ``output`` (``moecomp.outputs``);
- fidelity is a :class:`~moecomp.divergence.Divergence` (per sample, averaged) and an
  optional task :class:`~moecomp.metric.Metric` with a direction.

Layer selection works on any ``nn.Module``: weights of Linear/Conv (and, when listed,
Embedding) modules by default, narrowed by ``include``/``exclude`` entries that are parameter
names, module names or regular expressions (full match against either). A parameter shared
by several modules (tied weights) is one compressible tensor, under its first name; state
dicts here hold it once, and :func:`load_state` ties it back when loading.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from moecomp import inputs as inputs_mod
from moecomp import outputs
from moecomp.config import LayersConfig, ObjectivesConfig, ProblemConfig, resolve_path
from moecomp.data import Split, Splits, calibration_indices, load_splits
from moecomp.divergence import Divergence, PerSample
from moecomp.errors import ConfigError, TargetError
from moecomp.fold import fold_batchnorm
from moecomp.inputs import Inputs
from moecomp.metric import Metric, MetricFn, builtin_accuracy, classifies


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


DEFAULT_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")


def select_layers(model: nn.Module, *, include: Iterable[str] = (),
                  exclude: Iterable[str] = (),
                  types: Iterable[str | type[nn.Module]] = DEFAULT_TYPES) -> list[LayerRef]:
    """The compressible weight tensors of ``model``, in parameter order.

    types: module classes or their names (``Embedding`` included when listed); a module is
        a candidate when its ``weight`` is a Parameter and its type (or a base class) is
        listed.
    include: if given, only candidates matching an entry (by parameter name, module name or
        regex) are kept; exclude drops matches. An entry that matches nothing is an error.
    A weight shared by several modules is selected once, under its canonical name (the one
    ``named_parameters`` gives), whichever of its modules matched.
    """
    type_names = {t if isinstance(t, str) else t.__name__ for t in types}
    include, exclude = list(include), list(exclude)
    canonical = {id(p): n for n, p in model.named_parameters()}
    refs: list[LayerRef] = []
    chosen: set[str] = set()
    all_names: list[str] = []
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter):
            continue
        pname = f"{mod_name}.weight" if mod_name else "weight"
        all_names += [pname, mod_name]
        if not any(c.__name__ in type_names for c in type(mod).__mro__):
            continue
        keys = (pname, mod_name, canonical.get(id(w), pname))
        if include and not any(_matches(e, keys) for e in include):
            continue
        if any(_matches(e, keys) for e in exclude):
            continue
        name = canonical.get(id(w), pname)
        if name in chosen:
            continue
        chosen.add(name)
        refs.append(LayerRef(name, mod_name, type(mod).__name__, tuple(w.shape)))
    for what, entries in (("include", include), ("exclude", exclude)):
        for e in entries:
            if not _matches(e, all_names):
                known = ", ".join(n for n in all_names if n.endswith("weight"))
                raise ConfigError(f"layers.{what}",
                                  f"{e!r} matches no weight of the model; weights: {known}")
    if not refs:
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if isinstance(getattr(m, "weight", None), nn.Parameter)})
        raise ConfigError("layers", f"no compressible tensor selected (types "
                          f"{sorted(type_names)}; the model's modules with weights: "
                          f"{', '.join(kinds) or 'none'})")
    # parameter order: the order the state dict (and the codec) has them
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    return sorted(refs, key=lambda r: order.get(r.name, len(order)))


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Every state-dict name of a tensor that another name also holds (tied weights):
    ``alias -> canonical`` where canonical is the first name (``named_parameters`` /
    ``named_buffers`` order)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + \
        list(model.named_buffers(remove_duplicate=False))
    for n, t in named:
        if t is None:
            continue
        k = id(t)
        if k in first:
            if first[k] != n:
                out[n] = first[k]
        else:
            first[k] = n
    return out


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)`` for a state that holds tied tensors once: the aliases
    are filled from their canonical names first, so ties hold after loading."""
    full = dict(state)
    for alias, canon in tied_aliases(model).items():
        if alias not in full and canon in full:
            full[alias] = full[canon]
    model.load_state_dict(full)


DENSE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""The ``layers.dense_dtype`` choices."""

SPLIT_NAMES = {"calibration": "calib", "validation": "val", "test": "test"}


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.cpu()


@dataclass(frozen=True)
class Fidelity:
    """A model measured on one split against the teacher: mean per-sample divergence, the
    metric's value and drop (NaN without a metric), and the standard errors of the mean
    divergence and of the drop (NaN where the metric has no per-sample values: see
    :func:`standard_error`)."""

    divergence: float
    metric: float
    metric_drop: float
    divergence_se: float = math.nan
    metric_drop_se: float = math.nan


def standard_error(values: Any) -> float:
    """Standard error of the mean of per-sample values: ``std(values, ddof=1) / sqrt(n)``
    (NaN for fewer than two). For a drop, the values are the per-sample differences between
    teacher and student on the same samples (a paired difference): for accuracy each is
    +-100 or 0, so this is about ``100 * sqrt(b + c) / n`` for ``b`` samples only the teacher
    gets right and ``c`` only the student does (McNemar's)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size < 2:
        return math.nan
    return float(v.std(ddof=1) / math.sqrt(v.size))


@dataclass
class Target:
    """What is compressed and what fidelity is measured against.

    calib: the samples the search measures on (inputs and labels or None); val, test: the
    validation and test splits (None where absent); pool: everything calibration-side that
    reconstruction and distillation may read (default: ``calib``). teacher_out: the
    teacher's outputs on ``calib`` (narrowed to ``output``), computed once.
    batch_size: samples per forward pass.
    """

    teacher: nn.Module
    layers: list[LayerRef]
    calib: Split
    val: Split | None = None
    test: Split | None = None
    divergence: Divergence = field(default_factory=lambda: Divergence("kl"))
    metric: Metric | None = None
    output: str | None = None
    dense_dtype: str = "float32"
    batch_size: int = 512
    pool: Split | None = None
    teacher_out: Any = field(init=False)
    tied: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        if self.dense_dtype not in DENSE_DTYPES:
            raise ConfigError("layers.dense_dtype", f"must be one of {', '.join(DENSE_DTYPES)}"
                              f", got {self.dense_dtype!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or \
                self.batch_size < 1:
            raise ConfigError("data.batch_size", f"must be an integer >= 1, got "
                              f"{self.batch_size!r}")
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.tied = tied_aliases(self.teacher)
        self._teacher_outs: dict[str, Any] = {}
        self._teacher_metric: dict[str, tuple[float, np.ndarray | None]] = {}
        self.teacher_out = self.run(self.teacher, self.calib.inputs)
        self._teacher_outs["calibration"] = self.teacher_out
        self.divergence = self.divergence.fitted(self.teacher_out)
        if self.pool is None:
            self.pool = self.calib

    def on_device(self, device: torch.device | str) -> Target:
        """This target with the teacher, every split and the teacher's outputs on ``device``:
        itself when its teacher is there already, else a view with a copy of the teacher
        (made once per device and kept). Layers, divergence (its fitted constants), metric
        and the teacher's metric values are shared; ``fidelity`` still hands the metric CPU
        tensors."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if all(t.device == device for t in self.state_dict().values()):
            return self
        views: dict[torch.device, Target] = self.__dict__.setdefault("_views", {})
        if device not in views:
            def move(split: Split | None) -> Split | None:
                return None if split is None else Split(
                    inputs_mod.to(split.inputs, device),
                    None if split.labels is None else split.labels.to(device))

            view = copy.copy(self)
            view.teacher = copy.deepcopy(self.teacher).to(device)
            view.calib = move(self.calib)  # type: ignore[assignment]
            view.val, view.test = move(self.val), move(self.test)
            view.pool = view.calib if self.pool is self.calib else move(self.pool)
            view._teacher_outs = {k: outputs.map_tensors(v, lambda t: t.to(device))
                                  for k, v in self._teacher_outs.items()}
            view.teacher_out = view._teacher_outs["calibration"]
            views[device] = view
        return views[device]

    def __getstate__(self) -> dict[str, Any]:
        # views on other devices are made again where needed, never pickled (Dask workers)
        return {k: v for k, v in self.__dict__.items() if k != "_views"}

    # --- running models -------------------------------------------------------------------
    def run(self, model: nn.Module | Callable[..., Any], inputs: Inputs, *,
            batch_size: int | None = None) -> Any:
        """``model``'s outputs on ``inputs`` (narrowed to ``output``, detached), computed in
        batches of ``batch_size`` samples and joined."""
        bs = batch_size or self.batch_size
        parts = []
        with torch.no_grad():
            for _, batch in inputs_mod.batches(inputs, bs):
                parts.append(outputs.detach(outputs.select(inputs_mod.call(model, batch),
                                                           self.output)))
        return parts[0] if len(parts) == 1 else outputs.cat(parts)

    def split(self, name: str) -> Split | None:
        """A split by name: ``calibration``, ``validation`` or ``test``."""
        if name not in SPLIT_NAMES:
            raise ConfigError("split", f"must be one of {', '.join(SPLIT_NAMES)}, got {name!r}")
        return {"calibration": self.calib, "validation": self.val, "test": self.test}[name]

    def require(self, name: str) -> Split:
        split = self.split(name)
        if split is None:
            raise TargetError(f"this target has no {name} split")
        return split

    def teacher_outputs(self, name: str) -> Any:
        """The teacher's outputs on a split (computed once)."""
        if name not in self._teacher_outs:
            self._teacher_outs[name] = self.run(self.teacher, self.require(name).inputs)
        return self._teacher_outs[name]

    def teacher_metric(self, name: str) -> float:
        """The teacher's metric on a split (NaN without a metric)."""
        if self.metric is None:
            return math.nan
        return self._teacher_evaluation(name)[0]

    def has_per_sample_metric(self, name: str) -> bool:
        """Whether the metric gives per-sample values on a split (so its drop has a
        standard error)."""
        return self.metric is not None and self._teacher_evaluation(name)[1] is not None

    def _teacher_evaluation(self, name: str) -> tuple[float, np.ndarray | None]:
        """The teacher's metric on a split and its per-sample values (computed once)."""
        assert self.metric is not None
        if name not in self._teacher_metric:
            t = outputs.map_tensors(self.teacher_outputs(name), _cpu)
            labels = self.require(name).labels
            self._teacher_metric[name] = self.metric.evaluate(
                t, t, None if labels is None else labels.cpu())
        return self._teacher_metric[name]

    def fidelity(self, model: nn.Module, name: str) -> Fidelity:
        """``model`` measured against the teacher on split ``name``."""
        split = self.require(name)
        # measured on the CPU whatever device the model runs on (no-ops on the CPU): the
        # same numbers from any device's outputs, and a user's metric sees CPU tensors
        t = outputs.map_tensors(self.teacher_outputs(name), _cpu)
        s = outputs.map_tensors(self.run(model, split.inputs), _cpu)
        per_div = self.divergence(t, s).double()
        div, div_se = float(per_div.mean()), standard_error(per_div.cpu().numpy())
        if self.metric is None:
            return Fidelity(div, math.nan, math.nan, div_se)
        value, per = self.metric.evaluate(t, s, None if split.labels is None
                                          else split.labels.cpu())
        t_value, t_per = self._teacher_evaluation(name)
        drop_se = (standard_error(self.metric.drop(t_per, per))
                   if per is not None and t_per is not None and per.shape == t_per.shape
                   else math.nan)
        return Fidelity(div, value, float(self.metric.drop(t_value, value)), div_se, drop_se)

    @property
    def metric_name(self) -> str:
        return self.metric.name if self.metric is not None else "none"

    @property
    def task(self) -> str:
        """``classification`` when the metric is the built-in accuracy, else ``other``."""
        return "classification" if self.metric is not None and self.metric.builtin else "other"

    # --- tensors --------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return [ref.name for ref in self.layers]

    def weights(self) -> dict[str, torch.Tensor]:
        """The teacher's compressible tensors (detached views; do not modify)."""
        params = dict(self.teacher.named_parameters())
        return {ref.name: params[ref.name].detach() for ref in self.layers}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher's state, each tied tensor once (under its canonical name)."""
        return {k: v.detach() for k, v in self.teacher.state_dict().items()
                if k not in self.tied}

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


# --- loading the pieces ---------------------------------------------------------------------
def load_weights(path: str | Path, *, field_name: str = "model.weights"
                 ) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (``weights_only=True``: never unpickles
    arbitrary objects)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(field_name, f"no such file: {p}" + (" (it is a folder)"
                                                              if p.is_dir() else ""))
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(field_name, f"{p} is not a readable safetensors file: "
                              f"{e}") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a non-torch or unsafe file
        raise ConfigError(field_name, f"cannot read {p} as a weights-only torch file: "
                          f"{e}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(field_name, f"{p} does not hold a state dict of tensors")
    return obj


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        load_state(model, state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ConfigError("model.weights", f"{path} does not fit the model: "
                          + " ".join(line.strip() for line in first[:4])) from None


def user_model(problem: ProblemConfig) -> nn.Module:
    """The model ``model.factory`` returns, with ``model.weights`` loaded when given."""
    from moecomp.factories import call

    m = problem.model
    assert m.factory is not None
    model = call(m.factory, "model.factory", folder=problem.folder)
    if not isinstance(model, nn.Module):
        raise ConfigError("model.factory", f"{m.factory}() must return a torch.nn.Module; it "
                          f"returned {type(model).__name__}")
    if m.weights is not None:
        path = resolve_path(problem, m.weights)
        _load_into(model, load_weights(path), path)
    return model.eval()


def load_teacher(problem: ProblemConfig, *, data: Splits | None = None,
                 progress: bool = True) -> nn.Module:
    """The problem's teacher: a zoo model (trained and cached on first use) or a user model."""
    m = problem.model
    if m.factory is not None:
        return user_model(problem)
    if m.zoo is None:
        raise ConfigError("model", "this problem's model was given as a Python object (no "
                          "model.zoo or model.factory): build its Target in Python and pass it "
                          "on (e.g. RunContext(run, target=target))")
    if m.weights is not None:
        from moecomp.train import init_model

        model = init_model(problem)
        path = resolve_path(problem, m.weights)
        _load_into(model, load_weights(path), path)
        return model.eval()
    from moecomp.train import train_teacher

    model, _ = train_teacher(problem, data=data, progress=progress)
    return model


def select_from_config(model: nn.Module, cfg: LayersConfig) -> list[LayerRef]:
    return select_layers(model, include=cfg.include, exclude=cfg.exclude, types=cfg.types)


# --- fidelity measures from a problem file --------------------------------------------------
def divergence_from_config(cfg: ObjectivesConfig, *, folder: str | None = None) -> Divergence:
    if ":" not in cfg.divergence:
        return Divergence(cfg.divergence)
    from moecomp.factories import resolve

    return Divergence(cfg.divergence, fn=resolve(cfg.divergence, "objectives.divergence",
                                                 folder=folder))


def metric_name_unit(cfg: ObjectivesConfig) -> tuple[str, str]:
    """The name and unit a problem's metric is shown with (``auto`` as accuracy)."""
    if cfg.metric in ("auto", "accuracy"):
        return cfg.metric_name or "accuracy", "%"
    if cfg.metric == "none":
        return "none", ""
    return cfg.metric_name or cfg.metric.partition(":")[2].replace("_", " "), cfg.metric_unit


def metric_from_config(cfg: ObjectivesConfig, *, folder: str | None = None) -> Metric | str:
    """The configured metric, or ``"auto"`` / ``"none"`` (decided once outputs are known)."""
    if cfg.metric in ("auto", "none"):
        return cfg.metric
    name, unit = metric_name_unit(cfg)
    if cfg.metric == "accuracy":
        m = builtin_accuracy()
        return Metric(name, m.ref, m.fn, m.direction, m.unit)
    from moecomp.factories import resolve

    fn = resolve(cfg.metric, "objectives.metric", folder=folder)
    return Metric(name, cfg.metric, fn, cfg.metric_direction, unit)


# --- building a target -----------------------------------------------------------------------
def _preflight(teacher: nn.Module, splits: dict[str, Split], output: str | None,
               divergence: Divergence, metric: Metric | str | None) -> Metric | None:
    """Run the teacher once on a few samples of every split, before anything costly, and
    check the measures on what it returns. Decides ``auto`` metrics. Errors name the split,
    the shapes and the model's own message."""
    teacher.eval()
    outs = {}
    for name, split in splits.items():
        few = split.take(slice(0, 4))
        try:
            with torch.no_grad():
                out = inputs_mod.call(teacher, few.inputs)
        except Exception as e:  # the user's model may raise anything on inputs it rejects
            raise TargetError(f"the teacher does not run on the {name} inputs "
                              f"({inputs_mod.describe(few.inputs)}): {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                              ) from None
        outs[name] = (few, outputs.select(out, output))
    few, out = outs["calibration"]
    try:
        d = divergence.fitted(out)(out, out)
    except (TargetError, ConfigError):
        raise
    except Exception as e:  # the user's divergence may raise anything
        raise TargetError(f"objectives.divergence {divergence.name} fails on the teacher's "
                          f"outputs ({outputs.describe(out)}): {type(e).__name__}: {e}"
                          ) from None
    if not bool(torch.isfinite(d).all()):
        raise TargetError(f"objectives.divergence {divergence.name} of the teacher with itself "
                          f"is not finite ({d.tolist()})")
    if metric == "none" or metric is None:
        return None
    if metric == "auto":
        return builtin_accuracy() if classifies(out, few.labels) else None
    assert isinstance(metric, Metric)
    if metric.builtin and not classifies(out, few.labels):
        what = "has no labels" if few.labels is None else \
            f"has labels {tuple(few.labels.shape)} {few.labels.dtype}"
        raise ConfigError("objectives.metric", f"accuracy needs integer labels and class "
                          f"scores; the calibration split {what} and the outputs are "
                          f"{outputs.describe(out)}. Use metric = 'none' or your own")
    for name, (few, out) in outs.items():
        try:
            metric(out, out, few.labels)
        except (TargetError, ConfigError):
            raise
        except Exception as e:  # the user's metric may raise anything
            raise TargetError(f"objectives.metric {metric.ref} fails on the teacher's {name} "
                              f"outputs ({outputs.describe(out)}): {type(e).__name__}: {e}"
                              ) from None
    return metric


def make_target(
    teacher: nn.Module,
    splits: Splits | dict[str, Any],
    *,
    divergence: str | PerSample = "kl",
    metric: str | MetricFn | Metric | None = "auto",
    metric_name: str | None = None,
    metric_direction: str = "maximize",
    metric_unit: str = "",
    output: str | None = None,
    layers: LayersConfig | None = None,
    calibration: int = 512,
    batch_size: int = 512,
    seed: int = 0,
) -> Target:
    """A Target from Python objects, without a problem file.

    teacher: the trained model. splits: :class:`~moecomp.data.Splits` or the data factory's
    dict ``{"calibration": (inputs, labels), "validation": ..., "test": ...}``.
    divergence: a built-in name or ``fn(teacher_out, student_out) -> (n,)``. metric:
    ``"auto"``, ``"accuracy"``, ``None`` / ``"none"``, a :class:`~moecomp.metric.Metric` or
    ``fn(teacher_out, student_out, labels) -> float`` (named ``metric_name``, with
    ``metric_direction`` and ``metric_unit``). output: the part of the outputs compared.
    layers: which tensors are compressed (default Linear and Conv weights). calibration:
    samples the search measures on (a seeded subset of the calibration split).
    """
    if not isinstance(teacher, nn.Module):
        raise ConfigError("teacher", f"must be a torch.nn.Module, got {type(teacher).__name__}")
    from moecomp.data import splits_from_dict

    data = splits if isinstance(splits, Splits) else splits_from_dict(splits, "splits")
    if isinstance(divergence, str):
        div = Divergence(divergence)
    else:
        div = Divergence(getattr(divergence, "__name__", "divergence"), fn=divergence)
    met: Metric | str | None
    if metric is None or isinstance(metric, Metric):
        met = metric
    elif isinstance(metric, str):
        if metric not in ("auto", "accuracy", "none"):
            raise ConfigError("metric", f"must be 'auto', 'accuracy', 'none', a Metric or a "
                              f"function; got {metric!r}")
        met = builtin_accuracy() if metric == "accuracy" else metric
    else:
        if metric_direction not in ("maximize", "minimize"):
            raise ConfigError("metric_direction", f"must be 'maximize' or 'minimize', got "
                              f"{metric_direction!r}")
        name = metric_name or getattr(metric, "__name__", "metric").replace("_", " ")
        met = Metric(name, f"python:{getattr(metric, '__name__', 'metric')}", metric,
                     metric_direction, metric_unit)  # type: ignore[arg-type]
    return _assemble(teacher, data, div, met, output=output, layers=layers or LayersConfig(),
                     calibration=calibration, batch_size=batch_size, seed=seed)


def _assemble(teacher: nn.Module, data: Splits, div: Divergence, met: Metric | str | None, *,
              output: str | None, layers: LayersConfig, calibration: int, batch_size: int,
              seed: int) -> Target:
    named = {"calibration": data.calibration, "validation": data.validation,
             "test": data.test}
    metric = _preflight(teacher, named, output, div, met)
    if layers.fold_batchnorm:  # the teacher compressed is the folded one (moecomp.fold)
        teacher, _ = fold_batchnorm(teacher, data.calibration.inputs)
    idx = calibration_indices(len(data.calibration), calibration, seed=seed)
    try:
        return Target(
            teacher=teacher,
            layers=select_from_config(teacher, layers),
            calib=data.calibration.take(idx),
            val=data.validation,
            test=data.test,
            divergence=div,
            metric=metric,
            output=output,
            dense_dtype=layers.dense_dtype,
            batch_size=batch_size,
            pool=data.calibration,
        )
    except (TargetError, ConfigError):
        raise
    except RuntimeError as e:  # e.g. out of memory on a batch: say where
        raise TargetError(f"running the teacher on the calibration split in batches of "
                          f"{batch_size} failed: {e}") from None


def build_target(problem: ProblemConfig, *, data: Splits | None = None,
                 progress: bool = True) -> Target:
    """Load data and teacher, check they fit, select layers, and cache the teacher's outputs
    on the calibration samples."""
    if data is None:
        data = load_splits(problem.data, folder=problem.folder)
    teacher = load_teacher(problem, data=data, progress=progress)
    o = problem.objectives
    return _assemble(teacher, data, divergence_from_config(o, folder=problem.folder),
                     metric_from_config(o, folder=problem.folder), output=o.output,
                     layers=problem.layers, calibration=problem.data.calibration,
                     batch_size=problem.data.batch_size, seed=problem.data.seed)
