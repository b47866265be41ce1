"""Problem files (``problems/*.toml``) as frozen dataclasses, validated where they are built.

Each TOML table maps one to one onto a dataclass below. An unknown key, a value of the wrong
type or one out of range raises :class:`ConfigError` naming the dotted field and what is
allowed. The resolved config (``to_dict``) is saved next to every result.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from moecomp.errors import ConfigError

T = TypeVar("T")


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> dict[str, Any]:
    return {"range": (lo, hi, lo_open, hi_open)}


def _check_ref(field_name: str, ref: str) -> None:
    """A ``package.module:function`` reference: a dotted module path, a colon, a name."""
    mod, sep, attr = ref.partition(":")
    ok = sep == ":" and attr.isidentifier() and all(p.isidentifier() for p in mod.split("."))
    if not ok:
        raise ConfigError(field_name, f"must look like 'package.module:function', got {ref!r}")


@dataclass(frozen=True)
class ModelConfig:
    # A zoo name, or a user model: ``factory = "package.module:function"`` (code, imported and
    # called: see README "Security") returning an nn.Module, plus ``weights``.
    zoo: Literal["mlp-digits", "lenet300", "lenet5"] | None = None
    factory: str | None = None
    # safetensors, or a torch file loaded with weights_only=True; relative to the problem
    # file. With a factory it may be left out when the factory returns the trained model
    # (e.g. it loads its own checkpoint). For zoo models: optional, the trained teacher is
    # found (or trained) under ``artifacts/`` otherwise.
    weights: str | None = None

    def __post_init__(self) -> None:
        # Neither: a model given as a Python object (moecomp.target.make_target); a problem
        # file must name one (load_problem checks).
        if self.zoo is not None and self.factory is not None:
            raise ConfigError("model", "give exactly one of zoo (a zoo name) or factory "
                              "('package.module:function')")
        if self.factory is not None:
            _check_ref("model.factory", self.factory)


DATASETS = ("digits", "fashion-mnist")


@dataclass(frozen=True)
class DataConfig:
    # Where the data comes from: a built-in data set, a user factory (code: a
    # "package.module:function" returning {"calibration", "validation", "test"} -> (inputs,
    # labels)), or ``path`` to a file of tensors in that layout (.safetensors, or a torch file
    # read with weights_only=True). Nothing given: digits. For fashion-mnist, ``path`` is the
    # folder of its IDX files instead (default $MOECOMP_FASHION_MNIST or the Debian package's
    # /usr/share/datasets/fashion-mnist). Relative paths are relative to the problem file.
    dataset: Literal["digits", "fashion-mnist"] | None = None
    factory: str | None = None
    path: str | None = None
    # Samples the search measures divergence on: the first of a seeded permutation of the
    # calibration split (the built-ins' training images). Why a subset: divergence on a few
    # hundred samples ranks plans like the full set at a fraction of the cost.
    calibration: int = field(default=512, metadata=_range(1, 10_000_000))
    # Samples per forward pass everywhere (search, metrics, export checks); large splits
    # are consumed in batches of this size, never in one forward.
    batch_size: int = field(default=512, metadata=_range(1, 10_000_000))
    # Built-in data sets only: where validation comes from. "holdout": training images held
    # out of the teacher's training (``holdout`` of them; default 5,000 for FashionMNIST, 20 %
    # of digits), for a teacher moecomp trained; "test-half": a seeded half of the test split
    # (the other half stays the test split), for a teacher trained on all training images.
    validation: Literal["holdout", "test-half"] = "holdout"
    holdout: int | None = field(default=None, metadata=_range(1, 10_000_000))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.factory is not None:
            _check_ref("data.factory", self.factory)
            if self.dataset is not None or self.path is not None:
                raise ConfigError("data.factory", "give one of data.factory, data.dataset "
                                  "or data.path (a file of tensors), not several")

    @property
    def source(self) -> str:
        """``digits``, ``fashion-mnist``, ``factory`` or ``file``."""
        if self.factory is not None:
            return "factory"
        if self.dataset is not None:
            return self.dataset
        return "file" if self.path is not None else "digits"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=20, metadata=_range(1, 1000))
    lr: float = field(default=1e-3, metadata=_range(0, 10, lo_open=True))
    batch_size: int = field(default=128, metadata=_range(1, 65536))
    weight_decay: float = field(default=0.0, metadata=_range(0, 1))
    seed: int = 0


@dataclass(frozen=True)
class LayersConfig:
    # Entries are parameter names, module names or regular expressions (full match).
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    types: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")
    # How the tensors that are not compressed (biases, other layers, buffers) are stored:
    # their floating values are rounded to this dtype in every student and in the file.
    # float16 halves their bytes (5 % of a 60x LeNet-300-100 file) for no measurable loss.
    dense_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Fold each eval-mode BatchNorm into the Conv/Linear whose output it alone reads, before
    # anything else (moecomp.fold): the teacher becomes the folded model (outputs equal to
    # float tolerance, checked; a fold that is not exact is not made), BatchNorm tensors are
    # neither searched nor stored. Decoded files load into the folded model
    # (moecomp.fold.apply_folds with the file's meta.folded). false: keep BatchNorm as is.
    fold_batchnorm: bool = True


@dataclass(frozen=True)
class ObjectivesConfig:
    # "3obj": density, bits, divergence. "2obj": size (density * bits / 32) vs divergence.
    mode: Literal["3obj", "2obj"] = "3obj"
    # A built-in ("kl", "nmse", "cosine": see moecomp/divergence.py for what each reads) or a
    # user's "package.module:function" (code): fn(teacher_out, student_out) -> (n,) tensor.
    divergence: str = "kl"
    # The part of the model's output fidelity is measured on: a key, attribute or index,
    # dotted for nested outputs ("pooler_output", "0", "hidden.1"). None: the whole output
    # (the built-ins then read a tensor output, a "logits" entry, or the first tensor).
    output: str | None = None
    # The task measure: "auto" (accuracy where the calibration split has integer labels and
    # the outputs are class scores, else none), "accuracy", "none" (divergence alone), or a
    # user's "package.module:function" (code): fn(teacher_out, student_out, labels) -> float
    # over a whole split. metric_name labels it in tables and plots (default: the function's
    # name); metric_unit "%" makes drops "points".
    metric: str = "auto"
    metric_name: str | None = None
    metric_direction: Literal["maximize", "minimize"] = "maximize"
    metric_unit: str = ""
    # Constraints (None: off). The metric's drop from the teacher, in its units (points for
    # accuracy), measured on the calibration samples during the search.
    max_metric_drop: float | None = field(default=None, metadata=_range(0, None))
    max_divergence: float | None = field(default=None, metadata=_range(0, None, lo_open=True))
    # Fixed hypervolume reference point in raw objective units, so hypervolumes compare
    # across runs, algorithms and trials. 3obj: (density, bits, divergence); 2obj: (size,
    # divergence). Objectives are divided by it, so HV lies in [0, 1].
    ref_point: tuple[float, ...] = (1.0, 8.0, 1.0)

    def __post_init__(self) -> None:
        want = 3 if self.mode == "3obj" else 2
        if len(self.ref_point) != want:
            raise ConfigError("objectives.ref_point", f"needs {want} numbers for mode "
                              f"{self.mode!r}, got {len(self.ref_point)}")
        if any(not v > 0 for v in self.ref_point):
            raise ConfigError("objectives.ref_point", "every entry must be > 0")
        if ":" in self.divergence:
            _check_ref("objectives.divergence", self.divergence)
        elif self.divergence not in ("kl", "nmse", "cosine"):
            raise ConfigError("objectives.divergence", "must be one of 'kl', 'nmse', 'cosine' "
                              f"or 'package.module:function', got {self.divergence!r}")
        if ":" in self.metric:
            _check_ref("objectives.metric", self.metric)
        elif self.metric not in ("auto", "accuracy", "none"):
            raise ConfigError("objectives.metric", "must be one of 'auto', 'accuracy', 'none' "
                              f"or 'package.module:function', got {self.metric!r}")
        if self.output is not None and not all(self.output.split(".")):
            raise ConfigError("objectives.output", "must be dotted names or indices like "
                              f"'pooler_output' or 'hidden.1', got {self.output!r}")


@dataclass(frozen=True)
class GenesConfig:
    sparsity_step: float = field(default=0.01, metadata=_range(0.001, 0.5))
    sparsity_max: float = field(default=0.99, metadata=_range(0, 1, hi_open=True))
    bits_min: int = field(default=1, metadata=_range(1, 8))
    bits_max: int = field(default=8, metadata=_range(1, 8))
    quantizer: Literal["uniform", "kmeans"] = "uniform"
    # Per-layer sparsity bound from the gradient-rank redundancy analysis (seed 3).
    redundancy_bound: bool = False
    # Weight-sharing genome (search.problem = "shared", seed 2): one global K, the number of
    # bins of the codebook pooled over all layers, searched in [shared_k_min, shared_k_max];
    # every layer is pruned at the fixed shared_sparsity first. shared_fidelity is the
    # objective traded against size: teacher-student divergence or the metric's drop.
    shared_k_min: int = field(default=2, metadata=_range(2, 256))
    shared_k_max: int = field(default=256, metadata=_range(2, 256))
    shared_sparsity: float = field(default=0.0, metadata=_range(0, 1, hi_open=True))
    shared_fidelity: Literal["divergence", "metric_drop"] = "divergence"

    def __post_init__(self) -> None:
        if self.bits_min > self.bits_max:
            raise ConfigError("genes.bits_min", f"must be <= genes.bits_max ({self.bits_max})")
        if self.shared_k_min > self.shared_k_max:
            raise ConfigError("genes.shared_k_min",
                              f"must be <= genes.shared_k_max ({self.shared_k_max})")


@dataclass(frozen=True)
class RelevanceConfig:
    scorer: Literal["magnitude", "taylor", "directed"] = "magnitude"
    # Directed Evolution settings (per layer): candidate sets tentatively zeroed.
    generations: int = field(default=8, metadata=_range(1, 1000))
    population: int = field(default=16, metadata=_range(2, 4096))
    set_fraction: float = field(default=0.05, metadata=_range(0, 1, lo_open=True))
    calibration: int = field(default=256, metadata=_range(1, 60000))
    # Directed Evolution: > 0 ends a round's evolution after this many generations in a row
    # without a better set (0: always all ``generations``).
    patience: int = field(default=0, metadata=_range(0, 1000))
    # Directed Evolution: > 0 evolves the candidate sets on the first ``screen`` of the
    # ``calibration`` inputs and picks each round's set zeroed by measuring its last
    # population on all of them (about calibration / screen times fewer image-forwards;
    # 0: evolve on all).
    screen: int = field(default=0, metadata=_range(0, 60000))
    # Directed Evolution: what the candidate sets evolve on: "network", the divergence of the
    # network's output (every candidate a forward of the whole model); "output", the change of
    # the layer's own output (no network forward), with each round's best 4 sets measured by
    # the network divergence on the ``calibration`` inputs to pick the set zeroed (for large
    # models; see moecomp.relevance.directed).
    de_fitness: Literal["network", "output"] = "network"
    seed: int = 0
    # Taylor scorer's loss: "task" (cross-entropy on calibration labels), or the divergence
    # of a perturbed student, "noise" (teacher + Gaussian noise) or "prune" (teacher
    # magnitude-pruned at 50 %): the teacher's own divergence has zero gradient.
    taylor_loss: Literal["task", "noise", "prune"] = "task"
    # Which weights DE's candidate sets are drawn from first: small |w| ("magnitude") or
    # small |w| * ||x_j|| ("activation", the weight's typical contribution; better on
    # FashionMNIST in bench/bench_relevance.py).
    de_prior: Literal["magnitude", "activation"] = "magnitude"
    # Unit structuring (moecomp.relevance.units): 0 keeps the scorer's ranks; larger values
    # prune the weights of weak hidden units first, so units go whole and masks code smaller.
    units: float = field(default=0.0, metadata=_range(0, 16))


@dataclass(frozen=True)
class SearchConfig:
    # "layerwise": per-layer (sparsity, bits) genes; "shared": one global codebook size K
    # (the weight-sharing problem of seed 2, see genes.shared_*).
    problem: Literal["layerwise", "shared"] = "layerwise"
    algorithm: Literal["nsga2", "nsga3", "spea2", "moead", "age"] = "nsga2"
    operators: Literal["de", "default"] = "de"
    sampling: Literal["sensitivity", "random"] = "sensitivity"
    # Sensitivity-seeded sampling: the share of the first population drawn uniformly at
    # random and the share of extreme / uniform-level individuals; the rest is seeded from
    # the per-layer sensitivity, measured once by pruning one layer at probe_sparsity (and
    # quantising one layer at probe_bits) with every other layer left intact.
    random_share: float = field(default=0.2, metadata=_range(0, 1))
    extreme_share: float = field(default=0.1, metadata=_range(0, 1))
    probe_sparsity: float = field(default=0.8, metadata=_range(0, 1, lo_open=True, hi_open=True))
    probe_bits: int = field(default=2, metadata=_range(1, 8))
    pop_size: int = field(default=40, metadata=_range(4, 10000))
    budget: int = field(default=2000, metadata=_range(1, 10_000_000))
    crossover_prob: float = field(default=0.9, metadata=_range(0, 1))
    mutation_prob: float = field(default=0.3, metadata=_range(0, 1))
    # Largest move of a mutated gene, in steps of the widest gene (sparsity steps; a bits gene
    # moves proportionally less, at least 1): 25 beat 3 and 10 on digits (bench_search.py).
    # directed_strength in [0, 1]: the chance per child of a directed move that shifts
    # compression from a layer of large marginal divergence to one of small.
    mutation_strength: int = field(default=25, metadata=_range(1, 100))
    directed_strength: float = field(default=0.7, metadata=_range(0, 1))
    # What ranks the genes for a directed move: "ranks", one per-layer sensitivity for every
    # child (probes, refreshed from the evaluated points); "tables", each child's own marginal
    # divergence per bit saved at its genes, from the surrogate's cost tables (needs
    # surrogate = true; without it "ranks" is used).
    directed_by: Literal["ranks", "tables"] = "ranks"
    chunk_size: int = field(default=64, metadata=_range(1, 100000))
    seed: int = 0
    # The surrogate of the divergence (moecomp.search.surrogate; layer-wise problem only): per-
    # layer cost tables from single-layer ladder probes, summed through a link fitted on every
    # evaluated point. It builds allocation_share of the first population (the plans of least
    # predicted divergence for a grid of size prices) and screens offspring: screen_factor
    # times pop_size candidates are mated, and only those that could enter the front by the
    # model (then by a low-fidelity evaluation) get a full one. false: the plain search.
    surrogate: bool = True
    allocation_share: float = field(default=0.5, metadata=_range(0, 1))
    # 1: no screening (every offspring is evaluated), the tables still seed the population.
    screen_factor: int = field(default=4, metadata=_range(1, 64))
    # Plans allocated again each generation on the tables as the evaluated points corrected
    # them, among those the model says beat a front point in every objective at once, the
    # ones of largest predicted hypervolume gain (``reallocation.dominating_plans``), offered to
    # screening beside the mated candidates; at most this many per generation (0: none).
    # Needs the surrogate and screening.
    reallocate: int = field(default=0, metadata=_range(0, 10000))
    # Full evaluations per generation, at most, spent around front points
    # (``operators.local``): an anchor's single moves (each layer one sparsity step and one
    # bit either way) measured for real, then the plans those measured slopes say beat the
    # anchor in every objective. Not screened (they are measurements, not guesses); layer-wise
    # problems, algorithms with a population. 0: none.
    local: int = field(default=0, metadata=_range(0, 10000))
    # Share of the calibration samples a low-fidelity evaluation (ladder probes, screening)
    # runs on; the budget charges it that share of an evaluation. 0: no low fidelity (the
    # ladder is evaluated in full and listed in evaluated.csv; screening by the model alone).
    screen_fidelity: float = field(default=0.125, metadata=_range(0, 1, hi_open=True))

    def __post_init__(self) -> None:
        if self.random_share + self.extreme_share > 1.0:
            raise ConfigError("search.random_share", "random_share + extreme_share must be "
                              f"<= 1, got {self.random_share} + {self.extreme_share}")


@dataclass(frozen=True)
class ProblemConfig:
    name: str
    model: ModelConfig
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    layers: LayersConfig = LayersConfig()
    objectives: ObjectivesConfig = ObjectivesConfig()
    genes: GenesConfig = GenesConfig()
    relevance: RelevanceConfig = RelevanceConfig()
    search: SearchConfig = SearchConfig()
    # The problem file's folder (absolute; set by load_problem and kept in a run's
    # problem.json): factory modules are imported from it and relative paths resolve against
    # it. None: the current directory.
    folder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, section: str, **changes: Any) -> ProblemConfig:
        """A copy with fields of one section changed (validated again)."""
        sub = getattr(self, section)
        raw = dataclasses.asdict(sub) | changes
        return dataclasses.replace(self, **{section: build(type(sub), raw, section)})


# --- building and validating ------------------------------------------------------------

def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(get_args(tp)[0])}"
    if tp is type(None):
        return "absent"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        errors = []
        for alt in get_args(tp):
            if alt is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(alt, value, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(where, f"must be {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(where, f"must be {_describe(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(where, f"must be {_describe(tp)}, got {value!r}")
        return tuple(_coerce(get_args(tp)[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(where, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(where, f"must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(typing.cast(type, tp), value, where)
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def build(cls: type[T], raw: Any, where: str) -> T:
    """Build dataclass ``cls`` from a TOML table, refusing unknown keys and bad values."""
    if not isinstance(raw, dict):
        raise ConfigError(where or cls.__name__, f"must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        pre = f"{where}." if where else ""
        raise ConfigError(f"{pre}{unknown[0]}", "unknown key; allowed: " + ", ".join(fields))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(path, f"missing; must be {_describe(hints[name])}")
            continue
        value = _coerce(hints[name], raw[name], path)
        rng = f.metadata.get("range")
        if rng is not None and value is not None:
            lo, hi, lo_open, hi_open = rng
            bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
                hi is not None and (value >= hi if hi_open else value > hi))
            if bad:
                lo_s = "-inf" if lo is None else f"{lo}"
                hi_s = "inf" if hi is None else f"{hi}"
                interval = f"{'(' if lo_open else '['}{lo_s}, {hi_s}{')' if hi_open else ']'}"
                raise ConfigError(path, f"must be in {interval}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def problem_from_dict(raw: dict[str, Any]) -> ProblemConfig:
    return build(ProblemConfig, raw, "")


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing or invalid file is a ConfigError on field ``what``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(what, f"no such file: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(what, f"{p} is not valid TOML: {e}") from None


def load_problem(path: str | Path) -> ProblemConfig:
    """Read and validate a problem TOML file; ``folder`` is set to the file's folder (a
    ``folder`` key in the file, relative to the file, overrides it)."""
    raw = read_toml(path, "problem")
    here = Path(path).resolve().parent
    given = raw.get("folder")
    raw["folder"] = str((here / given).resolve()) if isinstance(given, str) else \
        given if "folder" in raw else str(here)
    problem = problem_from_dict(raw)
    if problem.model.zoo is None and problem.model.factory is None:
        raise ConfigError("model", "give exactly one of zoo (a zoo name) or factory "
                          "('package.module:function')")
    return problem


def resolve_path(problem: ProblemConfig, path: str) -> Path:
    """``path`` from a problem file: absolute, or relative to the problem file's folder."""
    p = Path(path).expanduser()
    if p.is_absolute() or problem.folder is None:
        return p
    return Path(problem.folder) / p
