"""Run an Optuna study whose trials are whole searches; read its best parameters back.

Every trial runs :func:`moecomp.search.run_search` at the study's fixed evaluation budget
once per trial seed (``budget.seeds`` of them, the same seeds in the same order for every
trial), each in its own run folder ``<output>/<study>/trial-<number>/seed-<seed>/`` (with one
seed, ``trial-<number>/`` is the run folder, as before seeds existed), and returns the mean
final hypervolume (maximised; HV is comparable across trials because the problem fixes the
reference point). During the searches the HV is reported at a fixed grid of evaluations
that spans all seeds, so pruners compare trials at equal cost (see :class:`HVReporter`).
Storage is an RDB URL (SQLite file by default, PostgreSQL for many workers) with a
heartbeat: a worker that dies mid-trial leaves a trial that another worker marks FAIL after
the grace period and queues again as a new trial with the same parameters; the retry takes
over the seeds the killed trial finished and runs the others.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from sqlalchemy.engine import make_url

from moecomp.config import ProblemConfig, SearchConfig
from moecomp.errors import ConfigError, RunError
from moecomp.runs import RunFolder, atomic_write_csv, atomic_write_text
from moecomp.search import SearchProblem, build_problem, run_search
from moecomp.search.runner import Runner
from moecomp.tune.config import (
    HeartbeatConfig,
    ParamSpec,
    PrunerConfig,
    SamplerConfig,
    StudyConfig,
    load_study_config,
)

# States that count toward n_trials: a pruned trial is a finished, informative trial.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
BEST_PARAMS_FILE = "best_params.json"
STORAGE_ATTEMPTS = 5


# --- building Optuna's pieces ------------------------------------------------------------


def suggest_params(trial: optuna.Trial, space: tuple[ParamSpec, ...]) -> dict[str, Any]:
    """SearchConfig overrides for one trial; Optuna's parameter names are the field names."""
    params: dict[str, Any] = {}
    for p in space:
        if p.kind == "categorical":
            assert p.choices is not None
            params[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "int":
            assert p.low is not None and p.high is not None
            params[p.name] = trial.suggest_int(
                p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
            )
        else:
            assert p.low is not None and p.high is not None
            params[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
    return params


def make_sampler(cfg: SamplerConfig, *, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler; ``seed_offset`` separates workers and resumed runs."""
    seed = None if cfg.seed is None else cfg.seed + seed_offset
    if cfg.kind == "tpe":
        # constant_liar: parallel workers treat each other's running trials as bad results,
        # so they do not all sample the same promising point.
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=cfg.n_startup_trials, constant_liar=True
        )
    if cfg.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.kind == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=cfg.population_size, seed=seed)
    if cfg.kind == "qmc":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    if cfg.kind == "gp":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=cfg.n_startup_trials)
    raise ConfigError("sampler.kind", f"unknown sampler {cfg.kind!r}")


def make_pruner(cfg: PrunerConfig, *, report_steps: int) -> optuna.pruners.BasePruner:
    """The study's pruner; its steps are the report grid (1..report_steps, over all seeds)."""
    if cfg.kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.n_startup_trials,
            n_warmup_steps=cfg.n_warmup_steps,
            interval_steps=cfg.interval_steps,
        )
    if cfg.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.min_resource,
            max_resource=report_steps,
            reduction_factor=cfg.reduction_factor,
        )
    if cfg.kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError("pruner.kind", f"unknown pruner {cfg.kind!r}")


POSTGRES_DRIVER = "psycopg"
"""The PostgreSQL driver moecomp installs (psycopg 3), named in every ``postgresql://`` URL."""


def storage_url(url: str) -> str:
    """``url`` as SQLAlchemy should open it: a bare ``postgresql://`` gets the driver moecomp
    installs (``postgresql+psycopg://``), because SQLAlchemy's default for the bare scheme
    differs between versions (psycopg2 in 2.0, psycopg in 2.1); any other URL is kept.
    ConfigError (field ``storage``) when it is not a database URL or names a driver that is
    not installed, instead of an ImportError in every worker."""
    if url.startswith("postgresql://"):
        url = f"postgresql+{POSTGRES_DRIVER}://" + url.removeprefix("postgresql://")
    try:
        make_url(url).get_dialect().import_dbapi()
    except sqlalchemy.exc.ArgumentError as e:
        raise ConfigError("storage", f"{url!r} is not a database URL: {e}") from None
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as e:
        raise ConfigError(
            "storage",
            f"the driver of {url.split('://')[0]!r} is not installed ({e}); write "
            "postgresql://user@host/db (psycopg 3, installed with moecomp) or install it",
        ) from None
    return url


def open_storage(url: str, heartbeat: HeartbeatConfig) -> RDBStorage:
    """An RDB storage (any SQLAlchemy URL, see ``storage_url``) with a heartbeat and retry of
    stale trials."""
    url = storage_url(url)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Several local workers may share one file: wait for its lock instead of failing.
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
    elif url.startswith("sqlite"):
        engine_kwargs = {}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    # Workers started together on a new database race to create its tables; the losers see
    # "already exists" (or a half-made schema) once, and succeed when they try again.
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                # The heartbeat and its retry callback are marked experimental by Optuna.
                warnings.simplefilter("ignore", ExperimentalWarning)
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat.interval,
                    grace_period=heartbeat.grace_period,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                        max_retry=heartbeat.max_retry
                    ),
                )
        except (sqlalchemy.exc.DBAPIError, optuna.exceptions.StorageInternalError):
            if attempt == STORAGE_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def report_steps_crossed(n_evals: int, *, budget: int, steps: int, done: int) -> range:
    """Report steps (1-based) reached by ``n_evals`` evaluations and not reported yet.

    Step k sits at ``k * budget / steps`` evaluations; ``done`` steps were reported before.
    Integer arithmetic, so step ``steps`` is reached exactly at ``budget`` evaluations.
    """
    reached = min(steps, (n_evals * steps) // budget)
    return range(done + 1, reached + 1)


def reported_value(finished: Sequence[float], hv: float) -> float:
    """The value a trial reports while it runs seed ``len(finished)``: the mean of the
    earlier seeds' final HVs and the running seed's current HV ``hv``."""
    return (sum(finished) + hv) / (len(finished) + 1)


class HVReporter:
    """The ``on_generation`` callback of one search of a trial: reports at each report step
    crossed and asks the pruner (raising :class:`optuna.TrialPruned`) before the search's
    budget is spent. ``on_progress(n_evals, value)`` sees every generation (a progress bar),
    with the evaluations the trial has run over all its seeds.

    A trial runs its seeds one after the other; the search of seed ``index`` (0-based)
    reports steps ``index * steps + 1 .. (index + 1) * steps``, and what it reports is
    :func:`reported_value`: the mean of the ``finished`` seeds' final HVs and this seed's
    current HV. That mixes finished and running searches, so the value drops where a new
    seed starts; it is still a fair comparison, because every trial runs the same seeds in
    the same order on the same grid: at step k all trials have finished the same seeds and
    spent the same evaluations on the running one, and a pruner compares trials only at
    equal steps. The alternatives are worse: the running seed's HV alone forgets the
    finished seeds (pruning on one seed is what overfitted), and the finished seeds' mean
    alone says nothing until a whole search is spent. Running the seeds in lockstep would
    compare all of them at every step, but a search is one blocking call.
    """

    def __init__(
        self,
        trial: optuna.Trial,
        *,
        budget: int,
        steps: int,
        on_progress: Callable[[int, float], None] | None = None,
        index: int = 0,
        finished: Sequence[float] = (),
    ) -> None:
        self.trial = trial
        self.budget = budget
        self.steps = steps
        self.on_progress = on_progress
        self.index = index
        self.finished = tuple(finished)
        self.done = 0

    def __call__(self, gen: int, n_evals: int, hv: float) -> None:
        if not math.isfinite(hv):
            raise RunError(
                f"trial {self.trial.number}: hypervolume is {hv} at generation "
                f"{gen}; the search must report a finite HV"
            )
        crossed = report_steps_crossed(
            n_evals, budget=self.budget, steps=self.steps, done=self.done
        )
        value = reported_value(self.finished, hv)
        offset = self.index * self.steps
        for step in crossed:
            self.trial.report(value, offset + step)
        self.done = max(self.done, crossed.stop - 1)
        if self.on_progress is not None:
            self.on_progress(self.index * self.budget + min(n_evals, self.budget), value)
        # Never prune a search's last generation: it is finished, and with the last seed
        # the trial's value is final (an earlier seed's trial is judged at the next step).
        if len(crossed) and n_evals < self.budget and self.trial.should_prune():
            raise optuna.TrialPruned(
                f"HV {value:.5f} after {n_evals} evaluations of its seed number "
                f"{self.index + 1} (report step {offset + self.done})"
            )


# --- the objective -----------------------------------------------------------------------


class _Display:
    """Rich progress: trials finished of the target with the best value, and the running
    trial's evaluations with its current HV. A no-op when disabled."""

    def __init__(self, *, enabled: bool, target: int, done: int, budget: int) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            disable=not enabled,
        )
        self.budget = budget
        self.trials = self.progress.add_task("trials", total=target, completed=done, info="")
        self.current = self.progress.add_task("trial", total=budget, info="", visible=False)

    def start_trial(self, number: int) -> None:
        self.progress.reset(
            self.current, total=self.budget, description=f"trial {number}", info="", visible=True
        )

    def generation(self, n_evals: int, hv: float) -> None:
        self.progress.update(self.current, completed=min(n_evals, self.budget), info=f"HV {hv:.4f}")

    def end_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        best = _best_or_none(study)
        info = "" if best is None else f"best {best.value:.4f} (trial {best.number})"
        self.progress.update(self.trials, completed=done, info=info)

    @contextmanager
    def shown(self) -> Iterator[None]:
        with self.progress:
            yield


def trial_run_dirs(trial_dir: Path, seeds: Sequence[int]) -> list[Path]:
    """The run folder of each seed of a trial: ``trial_dir`` itself for one seed (so a study
    of one seed reads as before seeds existed), else ``trial_dir/seed-<seed>/``."""
    if len(seeds) == 1:
        return [trial_dir]
    return [trial_dir / f"seed-{s}" for s in seeds]


class _Objective:
    """One trial: a whole search of the study's budget per trial seed, in
    ``trial-<number>/seed-<seed>/`` (``trial-<number>/`` with one seed). Its value is the
    mean final HV; user attributes ``seeds``, ``hv_per_seed`` (grown as seeds finish),
    ``n_evals`` (all seeds), ``run_dir`` (the trial folder) and ``front_artifacts``.

    A retry of a killed worker's trial copies the searches that trial finished with the
    same settings (:func:`finished_search`) and reports their HV histories as if it had run
    them; the search that was running when the worker died starts over.

    The SearchProblem (target, ranks, Evaluator) is built once per worker and shared by its
    trials: the tuned fields only change the algorithm, and the evaluator is deterministic,
    so sharing changes no result and saves the set-up and the teacher outputs every trial.
    """

    def __init__(
        self,
        cfg: StudyConfig,
        problem: SearchProblem,
        *,
        fixed: dict[str, Any],
        seeds: Sequence[int],
        display: _Display,
    ) -> None:
        self.cfg = cfg
        self.problem = problem
        self.seeds = tuple(seeds)
        # Every search field not tuned (the problem file's, with the study's seed), passed
        # with each trial's: a shared SearchProblem keeps the previous run's settings, so
        # each trial names them all.
        self.fixed = fixed
        self.display = display
        store_dir = artifacts_dir(cfg)
        store_dir.mkdir(parents=True, exist_ok=True)
        self.store = FileSystemArtifactStore(str(store_dir))

    def __call__(self, trial: optuna.Trial) -> float:
        params = suggest_params(trial, self.cfg.space)
        trial_dir = self.cfg.out_dir / f"trial-{trial.number}"
        if trial_dir.exists():
            # Trial numbers restart when a study is deleted and created again under the
            # same name; the old folder belongs to no trial of this study.
            shutil.rmtree(trial_dir)
        run_dirs = trial_run_dirs(trial_dir, self.seeds)
        earlier = self._earlier_run_dirs(trial, trial_dir)
        trial.set_user_attr("run_dir", str(trial_dir))
        trial.set_user_attr("seeds", list(self.seeds))
        trial.set_user_attr("hv_per_seed", [])
        # host:pid of the process running the trial (to find a stuck or killed worker)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        self.display.start_trial(trial.number)
        budget = self.cfg.budget.evaluations
        hvs: list[float] = []
        n_evals = 0
        t0 = time.perf_counter()
        try:
            for index, (seed, run_dir) in enumerate(zip(self.seeds, run_dirs, strict=True)):
                reporter = HVReporter(
                    trial,
                    budget=budget,
                    steps=self.cfg.budget.report_steps,
                    on_progress=self.display.generation,
                    index=index,
                    finished=hvs,
                )
                fields = {**self.fixed, **params, "seed": seed}
                # a retry takes over the searches its killed trial finished
                source = None if earlier is None else earlier[index]
                if source is not None and finished_search(source, fields, budget=budget):
                    hv, n = reuse_search(source, run_dir, reporter)
                else:
                    result = run_search(
                        self.problem,
                        run_dir,
                        budget=budget,
                        params=fields,
                        progress=False,
                        on_generation=reporter,
                        plots=False,
                    )
                    front = run_dir / "front.csv"
                    if not front.is_file():
                        atomic_write_csv(front, result.front)
                    hv, n = float(result.hv), int(result.n_evals)
                hvs.append(hv)
                n_evals += n
                trial.set_user_attr("hv_per_seed", hvs)
        except optuna.TrialPruned:
            self._finish(trial, run_dirs, time.perf_counter() - t0)
            raise
        trial.set_user_attr("n_evals", n_evals)
        self._finish(trial, run_dirs, time.perf_counter() - t0)
        return sum(hvs) / len(hvs)

    def _earlier_run_dirs(self, trial: optuna.Trial, trial_dir: Path) -> list[Path] | None:
        """The seed folders of the trial this one retries, or None. A retry (of a killed
        worker's trial) starts with that trial's user attributes, so ``run_dir`` and
        ``seeds`` are already set, naming where its finished searches are."""
        before = trial.user_attrs.get("run_dir")
        if before is None or Path(before) == trial_dir:
            return None
        if trial.user_attrs.get("seeds") != list(self.seeds):
            return None
        return trial_run_dirs(Path(before), self.seeds)

    def _finish(self, trial: optuna.Trial, run_dirs: list[Path], seconds: float) -> None:
        """Seconds, and every front written so far (a pruned trial's too) as an artifact."""
        trial.set_user_attr("seconds", round(seconds, 2))
        artifacts: dict[str, str] = {}
        for seed, run_dir in zip(self.seeds, run_dirs, strict=True):
            front = run_dir / "front.csv"
            if front.is_file():
                artifacts[str(seed)] = upload_artifact(
                    artifact_store=self.store,
                    file_path=str(front),
                    study_or_trial=trial,
                    mimetype="text/csv",
                )
        if artifacts:
            trial.set_user_attr("front_artifacts", artifacts)
        if len(self.seeds) == 1 and artifacts:  # the attribute of studies before seeds
            trial.set_user_attr("front_artifact_id", artifacts[str(self.seeds[0])])


def finished_search(run_dir: Path, fields: dict[str, Any], *, budget: int) -> dict[str, Any] | None:
    """search.json of a finished search in ``run_dir`` run with exactly these search fields
    (all but the budget) and ``budget``, else None (missing, unfinished or other settings)."""
    folder = RunFolder(run_dir)
    status = folder.status()
    if status.get("status") not in ("done", "stopped"):
        return None
    if not (folder.file("problem.json").is_file() and folder.file("hv.csv").is_file()):
        return None
    ran = asdict(folder.problem().search)

    def same(x: Any) -> Any:  # as JSON: tuples and lists alike
        return json.loads(json.dumps(x, sort_keys=True))

    return status if same(ran) == same({**fields, "budget": budget}) else None


def reuse_search(source: Path, run_dir: Path, reporter: HVReporter) -> tuple[float, int]:
    """Copy the finished search ``source`` (of the trial a retry replaces) to ``run_dir`` and
    report its HV history through ``reporter`` as if it ran now (the pruner may stop the
    trial). Returns its final HV and evaluations."""
    shutil.copytree(source, run_dir)
    history = RunFolder(run_dir).hv_history()
    for row in history.itertuples():
        reporter(int(row.gen), int(row.n_evals), float(row.hv))
    status = RunFolder(run_dir).status()
    return float(status["hv"]), int(status["n_evals"])


# --- the study ---------------------------------------------------------------------------


def artifacts_dir(cfg: StudyConfig) -> Path:
    """Where trial fronts are stored as Optuna artifacts (``optuna-dashboard --artifact-dir``).
    With many machines, this folder must be shared (or use another artifact store)."""
    return cfg.out_dir / "artifacts"


def _best_or_none(study: optuna.Study) -> FrozenTrial | None:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


def _record_best(study: optuna.Study, _trial: FrozenTrial | None = None) -> None:
    best = _best_or_none(study)
    if best is None:
        return
    attrs = {
        "best_trial": best.number,
        "best_value": best.value,
        "best_run_dir": best.user_attrs.get("run_dir"),
    }
    have = study.user_attrs
    for k, v in attrs.items():
        if have.get(k) != v:  # each write is a transaction; most trials change nothing
            study.set_user_attr(k, v)


def _check_same_study(study: optuna.Study, cfg: StudyConfig, problem: ProblemConfig) -> None:
    """A study resumed under the same name must keep what makes its trials comparable.

    What does is stored as one attribute, ``identity``, so that workers starting together on one
    storage read it whole or not at all (one read, one write each). The first writer wins
    (Optuna ignores a second insert of the key); every worker then reads it back and compares.
    Studies stored before ``identity`` existed kept the three values under their own keys.
    """
    want = {"problem": problem.name, "budget": cfg.budget.evaluations, "seeds": cfg.budget.seeds}
    attrs = study.user_attrs  # one snapshot
    have = attrs.get("identity")
    if have is None and "problem" in attrs:  # stored before `identity`
        have = {k: attrs.get(k) for k in want}
        if have["seeds"] is None:  # stored before budget.seeds existed: one seed per trial
            have["seeds"] = 1
    if have is None:
        study.set_user_attr("identity", want)
        have = study.user_attrs.get("identity", want)
    fields = {"problem": "problem", "budget": "budget.evaluations", "seeds": "budget.seeds"}
    for k, v in want.items():
        if have.get(k) != v:
            raise ConfigError(
                fields[k],
                f"study {cfg.name!r} in storage was run with {k} "
                f"{have.get(k)!r}, this file says {v!r}; its trials would not "
                f"compare: give the study a new name",
            )
    missing = {k: v for k, v in want.items() if k not in attrs}
    if "space" not in attrs:
        missing["space"] = {p.name: _spec_dict(p) for p in cfg.space}
    for k, v in missing.items():  # read by the report and by people looking at the storage
        study.set_user_attr(k, v)


def _spec_dict(p: ParamSpec) -> dict[str, Any]:
    return {
        k: v
        for k, v in {
            "choices": None if p.choices is None else list(p.choices),
            "low": p.low,
            "high": p.high,
            "step": p.step,
            "log": p.log,
        }.items()
        if v is not None
    }


def n_finished(study: optuna.Study) -> int:
    """Trials that count toward the target: COMPLETE and PRUNED."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_study(
    cfg: StudyConfig,
    *,
    storage: str | BaseStorage | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: bool = True,
    worker: int = 0,
    runner: Runner | None = None,
    device: str = "auto",
) -> optuna.Study:
    """Run (or continue) the study until ``n_trials`` trials are COMPLETE or PRUNED.

    storage: a URL (default: the study's, an SQLite file) or an Optuna storage object.
    n_trials: the target count of finished trials (default: the study's); a study that
    already has them runs nothing. Several workers may run this at once on one storage;
    each stops when the target is reached, so the total may exceed it by at most one
    running trial per other worker. A worker that ran trials then waits (at most
    ``heartbeat.grace_period + heartbeat.interval`` s) for the other RUNNING trials to finish
    or go stale, fails the stale ones (a killed worker's) and runs their retries, so none is
    left RUNNING or WAITING; a retry may take the study past the target.
    timeout: seconds for this call. worker: this worker's
    index among parallel ones, so seeded samplers draw different points. runner: where each
    search evaluates its chunks (default in-process, e.g. a
    :class:`~moecomp.search.dask_runner.DaskRunner`). device: where relevance and the
    Evaluator run (``auto``, ``cpu``, ``cuda``, ``cuda:N``; not part of the study).
    """
    target = cfg.n_trials if n_trials is None else n_trials
    if target < 0:
        raise ConfigError("n_trials", f"must be >= 0, got {target}")
    problem = cfg.load_problem()
    seeds = cfg.trial_seeds(problem)
    cfg.holdout_seeds(problem)  # refused now, not after the study, if it names a trial seed
    if isinstance(storage, BaseStorage):
        store = storage
    else:
        store = open_storage(storage or cfg.storage_url, cfg.heartbeat)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.out_dir / "study.json", json.dumps(cfg.to_dict(), indent=2))

    # A first look, only to count the trials already stored (for the sampler's seed).
    study = optuna.create_study(
        study_name=cfg.name, storage=store, direction="maximize", load_if_exists=True
    )
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(
            "name", f"study {cfg.name!r} in storage is not maximising; give the study a new name"
        )
    _check_same_study(study, cfg, problem)
    sampler = make_sampler(cfg.sampler, seed_offset=1000 * worker + len(study.trials))
    study = optuna.load_study(
        study_name=cfg.name,
        storage=store,
        sampler=sampler,
        pruner=make_pruner(cfg.pruner, report_steps=cfg.budget.report_steps * len(seeds)),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        # Trials of killed workers whose grace period is over: FAIL now (and queued again),
        # before counting what is missing.
        optuna.storages.fail_stale_trials(study)
    missing = target - n_finished(study)
    if missing > 0:
        display = _Display(
            enabled=progress,
            target=target,
            done=n_finished(study),
            budget=cfg.budget.evaluations * len(seeds),
        )
        search_cfg = problem.replace("search", seed=seeds[0])
        built = build_problem(search_cfg, runner=runner, device=device)
        fixed = search_fields(search_cfg)
        objective = _Objective(cfg, built, fixed=fixed, seeds=seeds, display=display)
        stop = optuna.study.MaxTrialsCallback(target, states=FINISHED)
        with display.shown(), _quiet_optuna(progress):
            # A ConfigError is a combination the search refuses (e.g. random_share +
            # extreme_share > 1, moead with constraints): that trial FAILs with the message
            # logged, and the study goes on. Any other error stops the study.
            study.optimize(
                objective,
                n_trials=missing,
                timeout=timeout,
                catch=(ConfigError,),
                callbacks=[stop, _record_best, display.end_trial],
            )
            retries = settle_stale_trials(study, store, cfg.heartbeat)
            if retries:
                # the parameters of trials lost with a dead worker are run again, even past
                # the target: the sampler chose them and the study should know their value
                study.optimize(
                    objective,
                    n_trials=retries,
                    catch=(ConfigError,),
                    callbacks=[_record_best, display.end_trial],
                )
    _record_best(study)
    best = _best_or_none(study)
    if best is not None:
        atomic_write_text(
            cfg.out_dir / BEST_PARAMS_FILE,
            json.dumps(
                {
                    "study": cfg.name,
                    "trial": best.number,
                    "value": best.value,
                    "seeds": best.user_attrs.get("seeds"),
                    "hv_per_seed": best.user_attrs.get("hv_per_seed"),
                    "run_dir": best.user_attrs.get("run_dir"),
                    "params": best.params,
                },
                indent=2,
            ),
        )
    return study


def search_fields(problem: ProblemConfig) -> dict[str, Any]:
    """Every search field of ``problem`` but the budget: what a search on a shared
    SearchProblem is given besides a trial's parameters (it keeps the previous run's
    settings otherwise)."""
    return {k: v for k, v in asdict(problem.search).items() if k != "budget"}


def settle_stale_trials(
    study: optuna.Study, storage: BaseStorage, heartbeat: HeartbeatConfig
) -> int:
    """Before a worker leaves: wait until every RUNNING trial has finished or gone stale
    (at most ``grace_period + interval`` seconds, the time a trial of a worker that died
    before now needs to go stale), failing stale ones, which queues their retries. Returns
    the number of WAITING trials (retries) left to run. Without a heartbeat (a storage other
    than an RDBStorage with one), returns 0.

    Optuna fails a stale trial only when some worker starts a trial after the grace period;
    when the other workers reach the target sooner, a dead worker's trial would otherwise
    stay RUNNING until the study is run again.
    """
    if not (isinstance(storage, RDBStorage) and storage.get_heartbeat_interval()):
        return 0
    grace = heartbeat.grace_period or 2 * heartbeat.interval
    deadline = time.monotonic() + grace + heartbeat.interval
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        while study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            left = deadline - time.monotonic()
            if left <= 0:
                break  # still running with a fresh heartbeat: a live worker's trial
            time.sleep(min(heartbeat.interval, left))
            optuna.storages.fail_stale_trials(study)
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


@contextmanager
def _quiet_optuna(quiet: bool) -> Iterator[None]:
    """Optuna logs a line per trial; with the progress bar shown that is noise."""
    if not quiet:
        yield
        return
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


# --- reading results back ----------------------------------------------------------------


def load_study(cfg: StudyConfig, *, storage: str | BaseStorage | None = None) -> optuna.Study:
    """The stored study of a study file (raises RunError when it was never run)."""
    store = storage if storage is not None else cfg.storage_url
    if isinstance(store, str):
        store = storage_url(store)
    if (
        isinstance(store, str)
        and store.startswith("sqlite:///")
        and store != "sqlite:///:memory:"
        and not Path(store.removeprefix("sqlite:///")).is_file()
    ):
        raise RunError(f"no study {cfg.name!r}: {store} does not exist; run `moecomp study` first")
    try:
        return optuna.load_study(study_name=cfg.name, storage=store)
    except KeyError:
        raise RunError(f"no study {cfg.name!r} in {store}: run `moecomp study` first") from None


def best_params(
    study_or_path: optuna.Study | str | os.PathLike[str], *, study_name: str | None = None
) -> dict[str, Any]:
    """The best trial's SearchConfig overrides, for ``moecomp search --params-from``.

    Accepts a Study; a study file (``.toml``); the ``best_params.json`` a study writes; an
    SQLite file (``.db``) or a storage URL, holding one study or the one named
    ``study_name``.
    """
    if isinstance(study_or_path, optuna.Study):
        study = study_or_path
    else:
        text = str(study_or_path)
        path = Path(text)
        if path.suffix == ".toml":
            study = load_study(load_study_config(path))
        elif path.suffix == ".json":
            if not path.is_file():
                raise RunError(f"no such file: {path}")
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict):
                raise RunError(f"{path} has no 'params' table (not a {BEST_PARAMS_FILE})")
            return _check_params(raw["params"], str(path))
        else:
            if "://" in text:
                url = storage_url(text)
            else:
                if not path.is_file():
                    raise RunError(f"no such file: {path}")
                url = f"sqlite:///{path.resolve()}"
            names = optuna.get_all_study_names(url)
            if study_name is None:
                if len(names) != 1:
                    raise RunError(
                        f"{text} holds {len(names)} studies ({', '.join(names)}); name one"
                    )
                study_name = names[0]
            if study_name not in names:
                raise RunError(
                    f"{text} has no study {study_name!r}; it has {', '.join(names) or 'none'}"
                )
            study = optuna.load_study(study_name=study_name, storage=url)
    best = _best_or_none(study)
    if best is None:
        raise RunError(f"study {study.study_name!r} has no COMPLETE trial yet")
    return _check_params(best.params, study.study_name)


def _check_params(params: dict[str, Any], source: str) -> dict[str, Any]:
    allowed = set(SearchConfig.__dataclass_fields__)
    for k in params:
        if k not in allowed:
            raise ConfigError(
                f"params.{k}",
                f"from {source} is not a search field; allowed: " + ", ".join(sorted(allowed)),
            )
    return dict(params)
