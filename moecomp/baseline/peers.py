"""Peers: what a user could run instead of moecomp's search, on the same genes and Evaluator.

Each peer gets a :class:`~moecomp.search.problem.SearchProblem` (the run's genes, objectives,
constraints and Evaluator), an evaluation budget and a seed, and returns every point it
evaluated as rows of ``evaluated.csv`` (:func:`moecomp.runs.solutions_frame`):

- ``tpe``: Optuna's multi-objective ``TPESampler`` (``constant_liar``), asked and told in
  batches of :data:`TPE_BATCH` (one trial at a time costs the Evaluator's per-call overhead
  ten times for the same evaluations); constraints through ``trial.set_constraint``;
- ``optuna-nsga2``: Optuna's ``NSGAIISampler`` (population = the problem's ``pop_size``), one
  generation per batch;
- ``random``: uniform integer genes, a population at a time;
- ``nsga2-default``: moecomp's search loop with what pymoo documents for integer problems
  (random sampling, SBX + PM with rounding; ``operators = "default"``) and without the
  surrogate (no probes, no allocation, no screening): pymoo's NSGA-II as a user would set it up;
- ``moead``: pymoo's MOEA/D (``ParallelMOEAD``) with moecomp's DE operators and surrogate.

Work is kept in ``folder`` (one per peer and seed): the search-loop peers are run folders
resumed from their checkpoints; the others append each batch to ``evaluated.csv`` with its
integer genes, and a resumed call reads them back: ``random`` draws the same genes again and
skips those done (the same points as an uninterrupted call); the Optuna peers tell the
finished trials to a new study first (the same evaluations are kept, the next ones may differ
from an uninterrupted call's: the sampler's random state is not saved).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moecomp.errors import ConfigError, RunError
from moecomp.runs import METRICS, RunFolder, atomic_write_text, solutions_frame
from moecomp.search.front import feasible, nondominated
from moecomp.search.problem import EvalRecord, SearchProblem

PEERS = ("tpe", "optuna-nsga2", "random", "nsga2-default", "moead")
# how tables and figures name them
PEER_LABELS = {
    "tpe": "Optuna TPE",
    "optuna-nsga2": "Optuna NSGA-II",
    "random": "random genes",
    "nsga2-default": "pymoo NSGA-II defaults",
    "moead": "MOEA/D",
}
TPE_BATCH = 10
PEER_FILE = "peer.json"
GENE_PREFIX = "gene_"

OnEvals = Callable[[int], None]


@dataclass(frozen=True)
class PeerResult:
    """A peer's evaluations: ``evaluated`` (rows of evaluated.csv, in evaluation order),
    ``n_evals`` (full evaluations spent), ``folder`` (where its work is kept)."""

    name: str
    seed: int
    budget: int
    n_evals: int
    evaluated: pd.DataFrame
    folder: Path

    def front(self, F: np.ndarray) -> np.ndarray:
        """Indices of the feasible non-dominated rows of ``evaluated``, whose objectives are
        ``F (n, n_obj)`` (as :meth:`ObjectiveSpace.matrix` reads them)."""
        ok = np.flatnonzero(self.feasible())
        return ok[nondominated(F[ok])]

    def feasible(self) -> np.ndarray:
        if "feasible" in self.evaluated.columns:
            return self.evaluated["feasible"].to_numpy(bool)
        return np.ones(len(self.evaluated), dtype=bool)


def check_peer(name: str, *, field: str = "baseline") -> str:
    if name not in PEERS:
        raise ConfigError(field, f"must be one of {', '.join(PEERS)}; got {name!r}")
    return name


def run_peer(
    problem: SearchProblem,
    name: str,
    *,
    budget: int,
    seed: int,
    folder: str | os.PathLike[str],
    on_evals: OnEvals | None = None,
) -> PeerResult:
    """Run peer ``name`` for ``budget`` evaluations with ``seed``, keeping its work in
    ``folder`` (resumed when it holds an unfinished run of the same peer, seed and budget;
    reused when finished). ``on_evals(n)``: evaluations done so far, after each batch."""
    check_peer(name)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError("budget", f"must be a positive integer, got {budget!r}")
    out = Path(folder)
    if name in ("nsga2-default", "moead"):
        return _via_search(problem, name, budget=budget, seed=seed, out=out, on_evals=on_evals)
    return _Batches(problem, name, budget=budget, seed=seed, out=out).run(on_evals)


# --- peers that are moecomp's own search loop with other settings ---------------------------


def _via_search(
    problem: SearchProblem, name: str, *, budget: int, seed: int, out: Path,
    on_evals: OnEvals | None,
) -> PeerResult:
    from moecomp.search.run import run_search

    params: dict[str, Any] = {"seed": seed}
    if name == "nsga2-default":
        params |= {"algorithm": "nsga2", "operators": "default", "surrogate": False}
    else:
        params |= {"algorithm": "moead", "operators": "de"}

    def generation(gen: int, n_evals: int, hv: float) -> None:
        if on_evals is not None:
            on_evals(n_evals)

    result = run_search(
        problem, out, budget=budget, params=params, progress=False, plots=False,
        resume=True, on_generation=generation,
    )
    evaluated = RunFolder(out).evaluated()
    return PeerResult(name, seed, budget, int(result.n_evals), evaluated, out)


# --- peers that ask for genes in batches ---------------------------------------------------


class _Batches:
    """tpe, optuna-nsga2 and random: ask a batch of genes, evaluate, append, repeat."""

    def __init__(
        self, problem: SearchProblem, name: str, *, budget: int, seed: int, out: Path
    ) -> None:
        self.problem = problem
        self.name = name
        self.budget = budget
        self.seed = seed
        self.out = out
        self.path = out / "evaluated.csv"
        self.batch = TPE_BATCH if name == "tpe" else problem.config.search.pop_size

    def run(self, on_evals: OnEvals | None) -> PeerResult:
        done = self._resume()
        ask, tell = self._sampler(done)
        n = len(done)
        if on_evals is not None:
            on_evals(n)
        while n < self.budget:
            k = min(self.batch, self.budget - n)
            X = ask(k)
            rec = self.problem.evaluate_genes(X)
            tell(rec)
            self._append(self._frame(rec, start=n))
            n += k
            if on_evals is not None:
                on_evals(n)
        self._write_status("done", n)
        # a folder that ran a larger budget before: this budget's run is its first rows
        evaluated = pd.read_csv(self.path).iloc[: self.budget] if self.path.is_file() else done
        return PeerResult(self.name, self.seed, self.budget, n, evaluated, self.out)

    # -- the folder ----------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        p = self.problem
        return {"peer": self.name, "seed": self.seed, "n_var": int(p.n_var),
                "xl": [int(v) for v in p.xl], "xu": [int(v) for v in p.xu]}

    def _resume(self) -> pd.DataFrame:
        """The rows a previous call of the same peer and seed evaluated (empty if none)."""
        meta_path = self.out / PEER_FILE
        if not meta_path.is_file():
            if self.out.is_dir() and any(self.out.iterdir()):
                raise RunError(f"{self.out} holds files that are not a peer's run; remove it")
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_status("running", 0)
            return pd.DataFrame()
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"{meta_path}: not a peer record ({e}); remove the folder") from None
        want = self._meta()
        if not isinstance(meta, dict) or {k: meta.get(k) for k in want} != want:
            raise RunError(
                f"{self.out} holds another peer run (peer, seed or genes differ); remove it "
                "or compare into another folder"
            )
        if not self.path.is_file():
            return pd.DataFrame()
        done = pd.read_csv(self.path)
        if len(done) > self.budget:
            # a finished run of a larger budget: its first `budget` rows are this budget's run
            done = done.iloc[: self.budget]
        return done

    def _write_status(self, status: str, n_evals: int) -> None:
        atomic_write_text(
            self.out / PEER_FILE,
            json.dumps(self._meta() | {"status": status, "n_evals": n_evals,
                                       "budget": self.budget}, indent=2),
        )

    def _frame(self, rec: EvalRecord, *, start: int) -> pd.DataFrame:
        p = self.problem
        sparsity, bits = p.gene_matrices(rec.X)
        extra = dict(p.extra_columns(rec.X))
        if p.n_ieq_constr:
            extra["feasible"] = feasible(rec.G)
        for j in range(p.n_var):
            extra[f"{GENE_PREFIX}{j}"] = rec.X[:, j]
        ids = np.arange(start, start + len(rec))
        return solutions_frame(ids, 0, p.layer_names, sparsity, bits, rec.metrics, extra=extra)

    def _append(self, df: pd.DataFrame) -> None:
        new = not self.path.is_file()
        df.to_csv(self.path, mode="w" if new else "a", header=new, index=False)
        self._write_status("running", int(df["id"].iloc[-1]) + 1)

    # -- the samplers --------------------------------------------------------------------
    def _genes(self, done: pd.DataFrame) -> np.ndarray:
        cols = [f"{GENE_PREFIX}{j}" for j in range(self.problem.n_var)]
        if len(done) == 0:
            return np.zeros((0, self.problem.n_var), dtype=np.int64)
        if any(c not in done.columns for c in cols):
            raise RunError(f"{self.path} lacks the gene columns {GENE_PREFIX}*; remove the folder")
        return done[cols].to_numpy(np.int64)

    def _sampler(
        self, done: pd.DataFrame
    ) -> tuple[Callable[[int], np.ndarray], Callable[[EvalRecord], None]]:
        p = self.problem
        if self.name == "random":
            rng = np.random.default_rng(self.seed)
            # the draws of the batches already evaluated, drawn again: the same points follow
            for k in _batch_sizes(len(done), self.batch):
                rng.integers(p.xl, p.xu + 1, size=(k, p.n_var))

            def ask_random(k: int) -> np.ndarray:
                return rng.integers(p.xl, p.xu + 1, size=(k, p.n_var))

            return ask_random, lambda rec: None
        return _optuna_sampler(p, self.name, self.seed, self._genes(done), done)


def _batch_sizes(n: int, batch: int) -> list[int]:
    return [batch] * (n // batch) + ([n % batch] if n % batch else [])


def _optuna_sampler(
    p: SearchProblem, name: str, seed: int, X_done: np.ndarray, done: pd.DataFrame
) -> tuple[Callable[[int], np.ndarray], Callable[[EvalRecord], None]]:
    import optuna
    from optuna.distributions import BaseDistribution, IntDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler: optuna.samplers.BaseSampler
    if name == "optuna-nsga2":
        sampler = optuna.samplers.NSGAIISampler(population_size=p.config.search.pop_size, seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    study = optuna.create_study(directions=["minimize"] * p.n_obj, sampler=sampler)
    dists: dict[str, BaseDistribution] = {
        f"g{j}": IntDistribution(int(p.xl[j]), int(p.xu[j])) for j in range(p.n_var)
    }
    if len(X_done):
        F_done, G_done = _objectives_of(p, done)
        study.add_trials(
            optuna.trial.create_trial(
                params={f"g{j}": int(x[j]) for j in range(p.n_var)},
                distributions=dists,
                values=[float(v) for v in f],
                constraints={f"c{i}": float(v) for i, v in enumerate(g)} or None,
            )
            for x, f, g in zip(X_done, F_done, G_done, strict=True)
        )
    pending: list[optuna.Trial] = []

    def ask(k: int) -> np.ndarray:
        pending[:] = [study.ask(dists) for _ in range(k)]
        return np.array([[t.params[f"g{j}"] for j in range(p.n_var)] for t in pending])

    def tell(rec: EvalRecord) -> None:
        for t, f, g in zip(pending, rec.F, rec.G.reshape(len(rec), -1), strict=True):
            for i, v in enumerate(g):
                t.set_constraint(f"c{i}", float(v))
            study.tell(t, [float(v) for v in f])

    return ask, tell


def _objectives_of(p: SearchProblem, done: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(F, G)`` of rows evaluated before, from their metrics (what ``evaluate_genes`` gave)."""
    from moecomp.search.objectives import objective_space
    from moecomp.search.problem import constraint_values

    metrics = {m: done[m].to_numpy(float) for m in METRICS}
    return objective_space(p.config).matrix(done), constraint_values(p.config, metrics)
