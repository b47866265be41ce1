"""Study files (``studies/*.toml``) as frozen dataclasses, validated where they are built.

A study tunes the hyper-parameters of one problem's search (the fields of
:class:`moecomp.config.SearchConfig`). Every trial is a whole search at a fixed evaluation
budget, run once per trial seed; its value is the mean final hypervolume (maximised).
Layout of a study file::

    name = "tune-digits-mlp"
    problem = "../problems/digits-mlp.toml"   # relative to this file
    n_trials = 12                             # COMPLETE + PRUNED trials to reach
    # storage = "postgresql://user@host/db"   # default: sqlite file <output>/<name>.db
    output = "out"                            # relative to this file

    [budget]      evaluations, report_steps, seed, seeds
    [holdout]     seeds (compare the best parameters with the defaults on them)
    [sampler]     kind = tpe | random | nsga2 | qmc | gp, seed, n_startup_trials,
                  population_size
    [pruner]      kind = median | hyperband | none, and their settings
    [heartbeat]   interval, grace_period, max_retry
    [space.<SearchConfig field>]   choices = [...]   or   low, high, step, log

Errors name the dotted field (``space.pop_size.low``) and what is allowed, as in
:mod:`moecomp.config`, whose :func:`~moecomp.config.build` does the checking.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from moecomp.config import ProblemConfig, SearchConfig, build, load_problem, read_toml
from moecomp.errors import ConfigError

# Search fields a study may not tune: the budget is fixed by the study (so trials compare),
# the seed is fixed per study (budget.seed), chunk_size changes speed, not results, and
# problem changes the genome and objectives (hypervolumes would not compare).
FIXED_FIELDS = ("budget", "seed", "chunk_size", "problem")
DEFAULT_HOLDOUT_SEEDS = 3


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"range": (lo, hi, False, False)}


@dataclass(frozen=True)
class BudgetConfig:
    # Evaluations per trial, the same for every trial so their hypervolumes compare.
    evaluations: int = field(default=400, metadata=_range(1, 10_000_000))
    # Intermediate HV reports per seed, at evaluations budget*k/report_steps of each seed's
    # search (report_steps * seeds steps in a trial): the pruner's resource. A grid of
    # evaluations (not generations) so trials of different pop_size are compared at the
    # same cost.
    report_steps: int = field(default=10, metadata=_range(1, 1000))
    # First search seed of every trial; None: the problem's search.seed.
    seed: int | None = None
    # Searches per trial, with seeds seed, seed+1, ..., seed+seeds-1; the trial's value is
    # their mean final HV. One seed overfits: tuned parameters fitted seed 0 and lost to
    # the defaults on others (BENCHMARKS.md, "Optuna: tuned vs default").
    seeds: int = field(default=3, metadata=_range(1, 50))

    def trial_seeds(self, problem_seed: int) -> tuple[int, ...]:
        """The seeds every trial runs, in order (``problem_seed``: the problem's
        search.seed, used when ``seed`` is not set)."""
        first = problem_seed if self.seed is None else self.seed
        return tuple(range(first, first + self.seeds))


@dataclass(frozen=True)
class HoldoutConfig:
    # Seeds the best trial's parameters and the problem's defaults are both run on after
    # the study, at the study's budget: the verdict on seeds no trial saw. None: the three
    # seeds right after the trial seeds. None of them may be a trial seed.
    seeds: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.seeds is not None:
            if not self.seeds:
                raise ConfigError("holdout.seeds", "must not be empty (omit it for the default)")
            if len(set(self.seeds)) != len(self.seeds):
                raise ConfigError("holdout.seeds", f"has duplicates: {list(self.seeds)}")

    def resolve(self, trial_seeds: tuple[int, ...]) -> tuple[int, ...]:
        """The held-out seeds for a study whose trials run ``trial_seeds``; ConfigError
        (field ``holdout.seeds``) when one of them is a trial seed."""
        if self.seeds is None:
            after = max(trial_seeds) + 1
            return tuple(range(after, after + DEFAULT_HOLDOUT_SEEDS))
        shared = sorted(set(self.seeds) & set(trial_seeds))
        if shared:
            raise ConfigError(
                "holdout.seeds",
                f"{shared} are trial seeds ({list(trial_seeds)}, from budget.seed and "
                "budget.seeds): held-out seeds must be seeds no trial ran",
            )
        return self.seeds


@dataclass(frozen=True)
class SamplerConfig:
    # gp: Gaussian-process Bayesian optimisation, for few expensive trials (needs torch, which
    # moecomp has anyway); qmc: scrambled Sobol points, an even cover of the space.
    kind: Literal["tpe", "random", "nsga2", "qmc", "gp"] = "tpe"
    # None: unseeded. Each worker seeds with seed + 1000 * worker + trials already stored,
    # so parallel workers and resumed runs do not redraw the same points.
    seed: int | None = 0
    # tpe, gp: random trials before the model is used.
    n_startup_trials: int = field(default=10, metadata=_range(0, 100000))
    # nsga2: trials per generation.
    population_size: int = field(default=10, metadata=_range(2, 100000))


@dataclass(frozen=True)
class PrunerConfig:
    kind: Literal["median", "hyperband", "none"] = "median"
    # median: no pruning before this many finished trials / this many report steps.
    n_startup_trials: int = field(default=5, metadata=_range(0, 100000))
    n_warmup_steps: int = field(default=2, metadata=_range(0, 100000))
    interval_steps: int = field(default=1, metadata=_range(1, 100000))
    # hyperband: resources are report steps (max_resource = report_steps * seeds).
    min_resource: int = field(default=1, metadata=_range(1, 100000))
    reduction_factor: int = field(default=3, metadata=_range(2, 100))


@dataclass(frozen=True)
class HeartbeatConfig:
    # A running trial records a heartbeat every ``interval`` seconds; one silent for
    # ``grace_period`` seconds (default 2 * interval) is failed and queued again (a new
    # trial with the same parameters), at most ``max_retry`` times (None: no limit).
    interval: int = field(default=10, metadata=_range(1, 86400))
    grace_period: int | None = field(default=None, metadata=_range(1, 864000))
    max_retry: int | None = field(default=3, metadata=_range(0, 1000))

    def __post_init__(self) -> None:
        if self.grace_period is not None and self.grace_period <= self.interval:
            raise ConfigError(
                "heartbeat.grace_period",
                f"must be > heartbeat.interval ({self.interval}), got {self.grace_period}",
            )


@dataclass(frozen=True)
class ParamSpec:
    """The range of one SearchConfig field: ``choices`` (categorical), or ``low``/``high``
    with an optional ``step`` and ``log`` (int or float, after the field's type)."""

    name: str
    choices: tuple[str | int | float, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @property
    def kind(self) -> Literal["categorical", "int", "float"]:
        if self.choices is not None:
            return "categorical"
        return "int" if _field_type(self.name) is int else "float"


@dataclass(frozen=True)
class StudyConfig:
    name: str
    problem: str
    n_trials: int = field(default=20, metadata=_range(1, 1_000_000))
    storage: str | None = None
    output: str = "out"
    budget: BudgetConfig = BudgetConfig()
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    holdout: HoldoutConfig = HoldoutConfig()
    space: tuple[ParamSpec, ...] = ()
    # The folder relative paths are resolved against (the study file's folder).
    base_dir: str = "."

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\") or self.name.startswith("."):
            raise ConfigError("name", f"must be a plain folder name, got {self.name!r}")
        if self.budget.seed is not None:  # else known once the problem file is read
            self.holdout.resolve(self.budget.trial_seeds(self.budget.seed))

    # --- resolved paths ------------------------------------------------------------------
    @property
    def problem_path(self) -> Path:
        return (Path(self.base_dir) / self.problem).resolve()

    @property
    def out_dir(self) -> Path:
        """``<output>/<name>/``: trial run folders, artifacts, report."""
        return (Path(self.base_dir) / self.output).resolve() / self.name

    @property
    def storage_url(self) -> str:
        """The storage URL: ``storage`` or the default SQLite file ``<output>/<name>.db``."""
        if self.storage:
            return self.storage
        return f"sqlite:///{self.out_dir.with_suffix('.db')}"

    def load_problem(self) -> ProblemConfig:
        return load_problem(self.problem_path)

    def trial_seeds(self, problem: ProblemConfig) -> tuple[int, ...]:
        """The search seeds of every trial, in the order they run."""
        return self.budget.trial_seeds(problem.search.seed)

    def holdout_seeds(self, problem: ProblemConfig) -> tuple[int, ...]:
        """The held-out seeds (checked to be none of the trial seeds)."""
        return self.holdout.resolve(self.trial_seeds(problem))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_type(name: str) -> Any:
    return typing.get_type_hints(SearchConfig)[name]


def _search_fields() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(SearchConfig)}


def _check_value(name: str, value: Any, where: str) -> Any:
    """Validate one value of SearchConfig field ``name`` with the problem file's rules."""
    try:
        return getattr(build(SearchConfig, {name: value}, "search"), name)
    except ConfigError as e:
        raise ConfigError(where, e.problem) from None


def build_param(name: str, raw: Any) -> ParamSpec:
    """One ``[space.<name>]`` table, checked against SearchConfig field ``name``."""
    where = f"space.{name}"
    fields = _search_fields()
    tunable = [f for f in fields if f not in FIXED_FIELDS]
    if name in FIXED_FIELDS:
        raise ConfigError(
            where,
            "is fixed for a study (budget.evaluations, budget.seed, the "
            "problem file) and cannot be tuned; tunable: " + ", ".join(tunable),
        )
    if name not in fields:
        raise ConfigError(where, "unknown search field; tunable: " + ", ".join(tunable))
    if not isinstance(raw, dict):
        raise ConfigError(where, f"must be a table, got {raw!r}")
    spec = build(ParamSpec, {"name": name, **raw}, where)
    tp = _field_type(name)
    if spec.choices is not None:
        if any(v is not None for v in (spec.low, spec.high, spec.step)) or spec.log:
            raise ConfigError(where, "give either choices, or low/high (with step, log)")
        if not spec.choices:
            raise ConfigError(f"{where}.choices", "must not be empty")
        values = tuple(
            _check_value(name, v, f"{where}.choices[{i}]") for i, v in enumerate(spec.choices)
        )
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}.choices", f"has duplicates: {list(values)}")
        return dataclasses.replace(spec, choices=values)
    if get_origin(tp) is Literal:
        raise ConfigError(
            where, "needs choices = [...], a subset of " + ", ".join(repr(a) for a in get_args(tp))
        )
    if spec.low is None or spec.high is None:
        raise ConfigError(where, "needs low and high (or choices = [...])")
    # The raw TOML values, not the spec's floats: an int field must get integers.
    low = _check_value(name, raw["low"], f"{where}.low")
    high = _check_value(name, raw["high"], f"{where}.high")
    if low > high:
        raise ConfigError(f"{where}.low", f"must be <= high ({high}), got {low}")
    step = spec.step
    if step is not None:
        if not step > 0:
            raise ConfigError(f"{where}.step", f"must be > 0, got {step}")
        if tp is int and not isinstance(raw["step"], int):
            raise ConfigError(f"{where}.step", f"must be an integer for {name}, got {step}")
        if spec.log:
            raise ConfigError(f"{where}.log", "cannot be combined with step")
    if spec.log and not low > 0:
        raise ConfigError(f"{where}.low", f"must be > 0 with log = true, got {low}")
    return dataclasses.replace(
        spec,
        low=low,
        high=high,
        step=None if step is None else (int(step) if tp is int else float(step)),
    )


def study_from_dict(raw: dict[str, Any], *, base_dir: str | Path = ".") -> StudyConfig:
    """Build a StudyConfig from a parsed TOML table; paths resolve against ``base_dir``."""
    if not isinstance(raw, dict):
        raise ConfigError("study", f"must be a table, got {raw!r}")
    raw = dict(raw)
    space_raw = raw.pop("space", {})
    if "base_dir" in raw:
        raise ConfigError("base_dir", "is set from the study file's folder, not in the file")
    if not isinstance(space_raw, dict):
        raise ConfigError("space", f"must be a table of [space.<field>] tables, got {space_raw!r}")
    if not space_raw:
        raise ConfigError(
            "space",
            "is empty: add at least one [space.<field>] table; "
            "tunable: " + ", ".join(f for f in _search_fields() if f not in FIXED_FIELDS),
        )
    space = tuple(build_param(k, v) for k, v in space_raw.items())
    cfg = build(StudyConfig, raw, "")
    return dataclasses.replace(cfg, space=space, base_dir=str(Path(base_dir).resolve()))


def load_study_config(path: str | Path) -> StudyConfig:
    """Read and validate a study TOML file (the problem file it names must exist)."""
    p = Path(path)
    cfg = study_from_dict(read_toml(p, "study"), base_dir=p.parent)
    if not cfg.problem_path.is_file():
        raise ConfigError(
            "problem",
            f"no such problem file: {cfg.problem_path} (paths are "
            f"relative to the study file's folder {p.parent})",
        )
    return cfg
