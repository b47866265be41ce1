"""The search driver: an ask-and-tell loop around a pymoo algorithm that owns the evaluation.

Per generation: ``ask`` the algorithm for offspring, evaluate them (chunked through the
runner), ``tell`` it the results, then write the run folder (``moecomp/runs.py``):
evaluated.csv (appended), front.csv, hv.csv, search.json, the checkpoint, and the plots.

Budget: the run stops after exactly ``budget`` evaluations; the last generation is truncated
to the evaluations left (the algorithm is told the smaller offspring set, which NSGA-II,
NSGA-III, SPEA2 and MOEA/D accept; AGE-MOEA is untested here, it needs numba). The
sensitivity probes of the DE operators (``2L + 1`` evaluations, generation 0) count toward
the budget and are listed like any other evaluation.

Hypervolume (hv.csv, search.json, the result): of the front of *all* points evaluated so far,
objectives divided by the problem's reference point (``moecomp.search.front``).

Resume: every random draw comes from the algorithm's ``random_state``, which is in the
checkpoint together with the algorithm, the archive of evaluated points and the current
sensitivity; the evaluator is deterministic. So a run killed at any moment and resumed gives
the same evaluations, the same front and the same HV history as an uninterrupted run with the
same seed (only times differ).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pymoo.core.algorithm import Algorithm
from pymoo.core.population import Population
from pymoo.core.termination import NoTermination

from moecomp.config import ProblemConfig, load_problem
from moecomp.errors import ConfigError, RunError
from moecomp.evaluate.options import resolve_device
from moecomp.runs import (
    METRICS,
    RunFolder,
    atomic_write_csv,
    bits_col,
    solutions_frame,
    sparsity_col,
)
from moecomp.search import screening
from moecomp.search import surrogate as sg
from moecomp.search.algorithms import make_algorithm
from moecomp.search.checkpoint import Checkpoint, fingerprint, load_checkpoint, save_checkpoint
from moecomp.search.front import feasible, hypervolume, nondominated
from moecomp.search.operators.allocation import AllocationSampling
from moecomp.search.operators.local import local_offers
from moecomp.search.operators.mutation import DirectedMutation, local_marginals
from moecomp.search.operators.reallocation import dominating_plans
from moecomp.search.plots import draw_front, draw_hv, front_info
from moecomp.search.problem import CompressionProblem, EvalRecord, SearchProblem, build_problem
from moecomp.search.progress import SearchProgress
from moecomp.search.pymoo_state import capture_algorithm, restore_algorithm
from moecomp.search.runner import Runner
from moecomp.search.sensitivity import probe_genes, refresh_sensitivity, sensitivity_from_probes
from moecomp.solution import target_info
from moecomp.target import Target, build_target

CHECKPOINT = "checkpoint.safetensors"
# Low-fidelity evaluations (the surrogate's ladder probes, screened candidates): their
# divergence on a subset of the calibration samples, never mixed into evaluated.csv.
SCREENED = "screened.csv"
# What moecomp < 0.2 wrote: a pickle, which can run code when loaded; never read any more.
LEGACY_CHECKPOINT = "checkpoint.pkl"
# Plots are redrawn after a generation only when this many seconds passed since the last
# drawing (and always after the first generation and at the end): a figure costs 0.5-1 s,
# which would dominate small, fast generations. Every other file is written every generation.
PLOT_INTERVAL_S = 30.0

OnGeneration = Callable[[int, int, float], None]


class Terminated(BaseException):
    """SIGTERM arrived while :func:`sigterm_raises` was active. A BaseException, like the
    KeyboardInterrupt of SIGINT, so that no ``except Exception`` on the way swallows it and
    the search marks its run folder "interrupted" before it ends."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread instead of
    ending the process on the spot (Python's default), so a search stopped by ``kill`` or a
    job scheduler leaves a truthful search.json; the previous handler comes back after.
    Does nothing outside the main thread (signals are only delivered there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except BaseException as e:
        t = terminated_in(e)
        if t is None or t is e:
            raise
        raise t from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def terminated_in(e: BaseException) -> Terminated | None:
    """The :class:`Terminated` that ``e`` is or comes from. A SIGTERM can land anywhere in
    the main thread, also while a module initialises (matplotlib's C extensions, imported
    for the first plot), which turns it into ``ImportError: initialization failed`` raised
    from it; the stop is still the signal's."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, Terminated):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


@dataclass
class Archive:
    """Every evaluated point, in evaluation order (row ``i`` is solution id ``i``).

    X ``(n, n_var)`` int genes, F ``(n, n_obj)``, G ``(n, n_ieq)``, gen ``(n,)``, metrics
    name -> ``(n,)``; front: indices of the feasible non-dominated rows (one per distinct
    genes), ascending.
    """

    X: np.ndarray
    F: np.ndarray
    G: np.ndarray
    gen: np.ndarray
    metrics: dict[str, np.ndarray]
    front: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def empty(cls, n_var: int, n_obj: int, n_ieq: int) -> Archive:
        return cls(
            X=np.zeros((0, n_var), np.int64),
            F=np.zeros((0, n_obj)),
            G=np.zeros((0, n_ieq)),
            gen=np.zeros(0, np.int64),
            metrics={m: np.zeros(0) for m in METRICS},
        )

    def __len__(self) -> int:
        return len(self.X)

    def add(self, rec: EvalRecord, gen: int) -> np.ndarray:
        """Append a batch; returns its ids. Updates the front incrementally (the front of
        all points is the front of the old front plus the new points)."""
        start = len(self)
        self.X = np.concatenate([self.X, rec.X.astype(np.int64)])
        self.F = np.concatenate([self.F, rec.F])
        self.G = np.concatenate([self.G, rec.G.reshape(len(rec), -1)])
        self.gen = np.concatenate([self.gen, np.full(len(rec), gen, np.int64)])
        self.metrics = {m: np.concatenate([self.metrics[m], rec.metrics[m]]) for m in METRICS}
        ids = np.arange(start, len(self))
        new = ids[feasible(rec.G.reshape(len(rec), -1))]
        cand = np.concatenate([self.front, new])
        nd = cand[nondominated(self.F[cand])]
        _, first = np.unique(self.X[nd], axis=0, return_index=True)
        self.front = np.sort(nd[first])
        return ids


@dataclass
class SearchResult:
    """What a search leaves: ``front`` (rows of front.csv), ``hv`` (final, normalised),
    ``n_evals``, ``n_gen`` (last finished generation), ``status`` ("done"; "stopped": the
    algorithm produced no new offspring; "time budget": ``time_budget`` ran out first),
    ``hv_history`` (rows of hv.csv), ``out_dir``."""

    out_dir: Path
    front: pd.DataFrame
    hv: float
    n_evals: int
    n_gen: int
    status: str
    hv_history: pd.DataFrame
    elapsed_s: float

    def evaluated(self) -> pd.DataFrame:
        return RunFolder(self.out_dir).evaluated()


# --- configuration ---------------------------------------------------------------------------
def resolve_config(
    config: ProblemConfig,
    *,
    budget: int | None = None,
    algorithm: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> ProblemConfig:
    """``config`` with SearchConfig overrides applied (``params``, then ``budget`` and
    ``algorithm``), validated again."""
    changes: dict[str, Any] = dict(params or {})
    if budget is not None:
        changes["budget"] = budget
    if algorithm is not None:
        changes["algorithm"] = algorithm
    return config.replace("search", **changes) if changes else config


def _resume_fingerprint(config: ProblemConfig) -> str:
    # The budget may grow on resume (continue a finished run further); nothing else may change.
    return fingerprint(config.replace("search", budget=1).to_dict())


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb and not (
            isinstance(va, list | tuple) and isinstance(vb, list | tuple) and list(va) == list(vb)
        ):
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


# --- the run folder --------------------------------------------------------------------------
def _frame(problem: SearchProblem, archive: Archive, idx: np.ndarray) -> pd.DataFrame:
    X = archive.X[idx]
    sparsity, bits = problem.gene_matrices(X)
    extra = dict(problem.extra_columns(X))
    if problem.n_ieq_constr:
        extra["feasible"] = feasible(archive.G[idx])
    return solutions_frame(
        idx,
        archive.gen[idx],
        problem.layer_names,
        sparsity,
        bits,
        {m: archive.metrics[m][idx] for m in METRICS},
        extra=extra,
    )


def _front_frame(problem: SearchProblem, archive: Archive) -> pd.DataFrame:
    idx = archive.front[np.argsort(archive.F[archive.front, 0], kind="stable")]
    return _frame(problem, archive, idx)


def _append_evaluated(folder: RunFolder, df: pd.DataFrame) -> None:
    path = folder.file("evaluated.csv")
    new = not path.is_file()
    df.to_csv(path, mode="w" if new else "a", header=new, index=False)


def _hv_frame(rows: list[tuple[int, int, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["gen", "n_evals", "hv", "elapsed_s"])


def _refuse_existing(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise RunError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    folder = RunFolder(out)
    status = folder.status().get("status")
    what = f"a {status} search run" if status else "a run" if folder.exists() else "other files"
    raise RunError(
        f"{out} already holds {what}; pass --resume to continue it, or choose "
        "another --out (nothing was overwritten)"
    )


# --- the loop --------------------------------------------------------------------------------
class _Search:
    def __init__(
        self,
        problem: SearchProblem,
        config: ProblemConfig,
        folder: RunFolder,
        *,
        progress: bool,
        on_generation: OnGeneration | None,
        plots: bool = True,
        deadline: float | None = None,
    ) -> None:
        self.problem = problem
        # time.perf_counter() after which no new generation starts (None: no time limit)
        self.deadline = deadline
        self.cfg = config
        self.scfg = config.search
        self.folder = folder
        self.progress = progress
        self.on_generation = on_generation
        self.draw = plots
        self.fp = _resume_fingerprint(config)
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self.last_plot = -np.inf
        # state (all of it goes into the checkpoint)
        self.algorithm: Algorithm | None = None
        self.archive = Archive.empty(problem.n_var, problem.n_obj, problem.n_ieq_constr)
        self.gen = 0
        self.hv_rows: list[tuple[int, int, float, float]] = []
        self.probe_sensitivity: np.ndarray | None = None
        # the surrogate (moecomp.search.surrogate): tables from the ladder probes, None
        # when off; low-fidelity evaluations (ladder, screening) and their sample count
        self.tables: sg.DivergenceTables | None = None
        self.screened = screening.ScreenRecords.empty(problem.n_var)
        # search.local: the anchors taken so far and whether each one's plans were offered
        self.anchors = np.zeros((0, problem.n_var), np.int64)
        self.anchors_done = np.zeros(0, bool)
        self.low_samples = 0
        self.elapsed_before = 0.0
        self.status = "running"
        self.t0 = time.perf_counter()

    # --- state --------------------------------------------------------------------------
    @property
    def n_full(self) -> int:
        """Full evaluations: the rows of evaluated.csv."""
        return len(self.archive)

    def low_units(self, n_low: int) -> int:
        """What ``n_low`` low-fidelity evaluations cost in evaluations: the samples they
        forwarded over the samples of one full evaluation, rounded up."""
        N = self.problem_samples
        return 0 if n_low == 0 else -(-(n_low * self.low_samples) // N)

    @property
    def problem_samples(self) -> int:
        n = getattr(self.problem, "n_samples", 0)
        return int(n) if n else 1

    @property
    def n_evals(self) -> int:
        """What the budget counts: full evaluations plus the low-fidelity ones at their
        share of the samples (``low_units``)."""
        return self.n_full + self.low_units(self.screened.n_low)

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    @property
    def hv(self) -> float:
        return hypervolume(self.archive.F[self.archive.front], self.problem.ref_point)

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(doc, arrays)`` of the checkpoint: JSON-able values and numeric arrays."""
        a = self.archive
        arrays = {
            "archive.X": a.X,
            "archive.F": a.F,
            "archive.G": a.G,
            "archive.gen": a.gen,
            "archive.front": a.front,
            **{f"archive.metrics.{m}": a.metrics[m] for m in METRICS},
            "hv.gen": np.array([r[0] for r in self.hv_rows], np.int64),
            "hv.n_evals": np.array([r[1] for r in self.hv_rows], np.int64),
            "hv.hv": np.array([r[2] for r in self.hv_rows], np.float64),
            "hv.elapsed_s": np.array([r[3] for r in self.hv_rows], np.float64),
        }
        if self.probe_sensitivity is not None:
            arrays["probe_sensitivity"] = np.asarray(self.probe_sensitivity, np.float64)
        if self.tables is not None:
            arrays["surrogate.prune"] = np.asarray(self.tables.prune, np.float64)
            arrays["surrogate.quant"] = np.asarray(self.tables.quant, np.float64)
            arrays["surrogate.base"] = np.array([self.tables.base], np.float64)
        sc = self.screened
        arrays.update({"screen.X": sc.X, "screen.gen": sc.gen, "screen.kind": sc.kind,
                       "screen.low": sc.low, "screen.predicted": sc.predicted,
                       "screen.full": sc.full.astype(np.uint8),
                       "local.anchors": self.anchors,
                       "local.done": self.anchors_done.astype(np.uint8)})
        algorithm = None
        if self.algorithm is not None:
            algorithm, arrays["algorithm.values"] = capture_algorithm(self.algorithm)
        doc = {
            "algorithm_name": self.scfg.algorithm,
            "algorithm": algorithm,
            "gen": self.gen,
            "elapsed": self.elapsed,
            "status": self.status,
            "started": self.started,
            "low_samples": self.low_samples,
        }
        return doc, arrays

    def _restore(self, ck: Checkpoint) -> None:
        """The state of checkpoint ``ck``; RunError naming a missing or malformed entry."""
        p = self.problem
        if ck.value("algorithm_name", str) != self.scfg.algorithm:
            raise RunError(f"{ck.path}: checkpoint of another algorithm; refusing to resume")
        gen = ck.value("gen", int)
        X = ck.array("archive.X", kinds="iu", shape=(None, p.n_var))
        n = len(X)
        archive = Archive(
            X=X.astype(np.int64),
            F=ck.array("archive.F", kinds="f", shape=(n, p.n_obj)),
            G=ck.array("archive.G", kinds="f", shape=(n, p.n_ieq_constr)),
            gen=ck.array("archive.gen", kinds="i", shape=(n,)),
            metrics={m: ck.array(f"archive.metrics.{m}", kinds="f", shape=(n,)) for m in METRICS},
            front=ck.array("archive.front", kinds="i", shape=(None,)),
        )
        if archive.front.size and not (
            (archive.front >= 0).all() and (archive.front < n).all()
        ):
            raise RunError(f"{ck.path}: checkpoint front refers to missing points")
        hv_gen = ck.array("hv.gen", kinds="i", shape=(None,))
        k = len(hv_gen)
        hv_n = ck.array("hv.n_evals", kinds="i", shape=(k,))
        hv = ck.array("hv.hv", kinds="f", shape=(k,))
        hv_t = ck.array("hv.elapsed_s", kinds="f", shape=(k,))
        probe = None
        if "probe_sensitivity" in ck.arrays:
            probe = ck.array("probe_sensitivity", kinds="f", shape=(p.n_var,))
        tables = None
        if "surrogate.prune" in ck.arrays:
            if not isinstance(p, CompressionProblem):
                raise RunError(f"{ck.path}: checkpoint has surrogate tables, this problem none")
            g = p.genes
            n_s = int(g.s_idx_max.max()) + 1
            tables = sg.DivergenceTables(
                prune=ck.array("surrogate.prune", kinds="f", shape=(g.n_layers, n_s)),
                quant=ck.array("surrogate.quant", kinds="f", shape=(
                    g.n_layers, n_s, g.bits_max - g.bits_min + 1)),
                base=float(ck.array("surrogate.base", kinds="f", shape=(1,))[0]),
            )
        sx = ck.array("screen.X", kinds="iu", shape=(None, p.n_var))
        ns = len(sx)
        screened = screening.ScreenRecords(
            X=sx.astype(np.int64),
            gen=ck.array("screen.gen", kinds="i", shape=(ns,)),
            kind=ck.array("screen.kind", kinds="i", shape=(ns,)),
            low=ck.array("screen.low", kinds="f", shape=(ns,)),
            predicted=ck.array("screen.predicted", kinds="f", shape=(ns,)),
            full=ck.array("screen.full", kinds="u", shape=(ns,)).astype(bool),
        )
        anchors = np.zeros((0, p.n_var), np.int64)
        anchors_done = np.zeros(0, bool)
        if "local.anchors" in ck.arrays:  # (checkpoints before search.local have none)
            anchors = ck.array("local.anchors", kinds="iu", shape=(None, p.n_var))
            anchors_done = ck.array("local.done", kinds="u", shape=(len(anchors),))
            if len(anchors) and (np.any(anchors < p.xl) or np.any(anchors > p.xu)):
                raise RunError(f"{ck.path}: checkpoint's array 'local.anchors' holds genes "
                               "outside the problem's bounds")
        unknown = np.setdiff1d(screened.kind, list(screening.KIND_LABELS))
        if len(unknown):
            raise RunError(f"{ck.path}: checkpoint's array 'screen.kind' holds {int(unknown[0])}, "
                           f"not one of {sorted(screening.KIND_LABELS)}")
        low_samples = ck.value("low_samples", int)
        if low_samples and not (isinstance(p, CompressionProblem)
                                and 0 < low_samples < p.n_samples):
            raise RunError(f"{ck.path}: checkpoint's low-fidelity samples ({low_samples}) do "
                           "not fit this problem's calibration data")
        algorithm_doc = ck.value("algorithm", (dict, type(None)))
        elapsed = ck.value("elapsed", (int, float))
        started = ck.value("started", str)
        self.archive = archive
        self.gen = gen
        self.hv_rows = [
            (int(g), int(m), float(h), float(t))
            for g, m, h, t in zip(hv_gen, hv_n, hv, hv_t, strict=True)
        ]
        self.probe_sensitivity = probe
        self.tables = tables
        self.screened = screened
        self.anchors = anchors.astype(np.int64)
        self.anchors_done = anchors_done.astype(bool)
        self.low_samples = low_samples
        if low_samples:
            assert isinstance(p, CompressionProblem)
            p.set_low_fidelity(low_samples)
        self.elapsed_before = float(elapsed)
        self.started = started
        self.t0 = time.perf_counter()
        self.algorithm = None
        if algorithm_doc is not None:
            # rebuilt from the config (code of this package), then given the saved state
            self.setup()
            assert self.algorithm is not None
            buf = ck.array("algorithm.values", kinds="u", shape=(None,))
            restore_algorithm(self.algorithm, algorithm_doc, buf)

    def checkpoint(self) -> None:
        doc, arrays = self._state()
        save_checkpoint(self.folder.file(CHECKPOINT), doc, arrays, fp=self.fp)

    def resume_from_checkpoint(self) -> None:
        self._restore(load_checkpoint(self.folder.file(CHECKPOINT), fp=self.fp))
        if self.algorithm is None:  # killed between the probes and the first generation
            self.setup()
        # evaluated.csv may hold rows of the generation that was cut off: rewrite it (and
        # hv.csv) from the checkpoint's archive, the single source of truth.
        atomic_write_csv(
            self.folder.file("evaluated.csv"),
            _frame(self.problem, self.archive, np.arange(self.n_full)),
        )
        atomic_write_csv(self.folder.file("hv.csv"), _hv_frame(self.hv_rows))
        if len(self.screened) or self.folder.file(SCREENED).is_file():
            atomic_write_csv(self.folder.file(SCREENED),
                             self._screen_frame(np.arange(len(self.screened))))

    # --- files --------------------------------------------------------------------------
    def _timings(self) -> dict[str, float] | None:
        timings = getattr(getattr(self.problem, "evaluator", None), "timings", None)
        if not callable(timings):
            return None
        t = timings()
        if not isinstance(t, dict) or not t.get("total"):
            return None
        return {k: round(float(v), 3) for k, v in t.items()}

    def write_status(self, **more: Any) -> None:
        s = self.scfg
        self.folder.write_status(
            {
                "status": self.status,
                "problem": self.cfg.name,
                "algorithm": s.algorithm,
                "operators": s.operators,
                "problem_kind": s.problem,
                "seed": s.seed,
                "pop_size": s.pop_size,
                "budget": s.budget,
                "n_evals": self.n_evals,
                "n_full": self.n_full,
                "n_low": self.screened.n_low,
                "low_samples": self.low_samples,
                "surrogate": self.tables is not None,
                # where the students ran (a run-time setting, not part of problem.json)
                "device": str(getattr(getattr(self.problem, "evaluator", None), "device",
                                      "unknown")),
                "gen": self.gen,
                "hv": self.hv,
                "front_size": int(len(self.archive.front)),
                "elapsed_s": round(self.elapsed, 3),
                # seconds the Evaluator spent in this process since it was built: forward vs
                # the rest (the per-evaluation overhead); none when a runner evaluates
                # elsewhere
                "evaluator_s": self._timings(),
                "started": self.started,
                "updated": datetime.now(UTC).isoformat(timespec="seconds"),
                **more,
            }
        )

    def plots(self, *, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.draw or (not force and now - self.last_plot < PLOT_INTERVAL_S):
            return
        self.last_plot = now
        ok = feasible(self.archive.G)
        idx = np.flatnonzero(ok)
        pos = np.searchsorted(idx, self.archive.front)
        info = front_info(self.archive.F[idx], pos, self.problem.objective_labels)
        title = f"{self.cfg.name}: {self.n_full} evaluations, HV {self.hv:.4f}"
        draw_front(info, self.folder.plots / "front.png", title=title)
        if self.hv_rows:
            hv = _hv_frame(self.hv_rows)
            draw_hv(
                hv["n_evals"].to_numpy(),
                hv["hv"].to_numpy(),
                self.folder.plots / "hv.png",
                title=self.cfg.name,
            )

    def record(self, rec: EvalRecord) -> None:
        """Add one evaluated batch of generation ``self.gen`` to the archive and the csv."""
        ids = self.archive.add(rec, self.gen)
        _append_evaluated(self.folder, _frame(self.problem, self.archive, ids))

    def record_screened(self, X: np.ndarray, gen: int, kind: int | np.ndarray, *,
                        low: np.ndarray, predicted: np.ndarray, full: np.ndarray) -> None:
        """Add what screening looked at to its records and to screened.csv."""
        ids = self.screened.add(X, gen, kind, low=low, predicted=predicted, full=full)
        df = self._screen_frame(ids)
        path = self.folder.file(SCREENED)
        new = not path.is_file()
        df.to_csv(path, mode="w" if new else "a", header=new, index=False)

    def _screen_frame(self, ids: np.ndarray) -> pd.DataFrame:
        """Rows of screened.csv: the ladder probes and every candidate screening judged, with
        the divergence on the first ``samples`` calibration samples (empty where not
        measured so), the surrogate's prediction, and whether it got a full evaluation (then
        it is also a row of evaluated.csv). Never points of the front."""
        sc = self.screened
        sparsity, bits = self.problem.gene_matrices(sc.X[ids])
        low = sc.low[ids]
        cols: dict[str, Any] = {
            "id": ids.astype(int),
            "gen": sc.gen[ids],
            "kind": [screening.KIND_LABELS[int(k)] for k in sc.kind[ids]],
            "samples": np.where(np.isfinite(low), self.low_samples, 0).astype(np.int64),
            "low_divergence": low,
            "predicted_divergence": sc.predicted[ids],
            "full": sc.full[ids],
        }
        for j, n in enumerate(self.problem.layer_names):
            cols[sparsity_col(n)] = np.round(sparsity[:, j], 6)
        for j, n in enumerate(self.problem.layer_names):
            cols[bits_col(n)] = bits[:, j].astype(int)
        return pd.DataFrame(cols)

    def finish_generation(self) -> None:
        hv = self.hv
        self.hv_rows.append((self.gen, self.n_evals, hv, round(self.elapsed, 3)))
        atomic_write_csv(self.folder.file("front.csv"), _front_frame(self.problem, self.archive))
        atomic_write_csv(self.folder.file("hv.csv"), _hv_frame(self.hv_rows))
        self.write_status()
        self.checkpoint()
        self.plots(force=self.gen == 1)

    # --- steps --------------------------------------------------------------------------
    def probe(self) -> None:
        """Generation 0: the surrogate's ladder probes, or the single-layer probes of the DE
        operators' sensitivity (DE operators only)."""
        p = self.problem
        if not isinstance(p, CompressionProblem):
            return
        if self.scfg.surrogate and p.target is not None and self.ladder(p):
            return
        if self.scfg.operators != "de":
            return
        X = probe_genes(
            p.genes, probe_sparsity=self.scfg.probe_sparsity, probe_bits=self.scfg.probe_bits
        )
        if len(X) > self.scfg.budget // 4:
            return  # too small a budget to spend on probes: operators go undirected
        rec = p.evaluate_genes(X)
        self.record(rec)
        self.probe_sensitivity = sensitivity_from_probes(p.genes, X, rec.metrics["divergence"])
        self.finish_generation()

    def ladder(self, p: CompressionProblem) -> bool:
        """Generation 0 of a search with the surrogate: every layer's ladder probes (at low
        fidelity when ``screen_fidelity`` allows, listed in screened.csv; otherwise in full,
        in evaluated.csv), the tables built from them, and the DE operators' sensitivity
        from the single-layer probes among them. False (nothing done) when the ladder would
        cost more than a quarter of the budget."""
        s = self.scfg
        lad = sg.ladder_genes(p.genes, extra_sparsity=(s.probe_sparsity,),
                              extra_bits=(s.probe_bits,))
        m = screening.low_fidelity_samples(p.n_samples, s.screen_fidelity)
        self.low_samples = m
        cost = self.low_units(len(lad.X)) if m else len(lad.X)
        if cost > s.budget // 4:
            self.low_samples = 0
            return False
        if m:
            p.set_low_fidelity(m)
            d = p.evaluate_low(lad.X)
            n = len(lad.X)
            self.record_screened(lad.X, 0, screening.LADDER, low=d, predicted=np.full(n, np.nan),
                                 full=np.zeros(n, bool))
        else:
            rec = p.evaluate_genes(lad.X)
            self.record(rec)
            d = rec.metrics["divergence"]
        assert p.target is not None
        weights, ranks = p.target.weights(), p.ranks()
        ep = [sg.pruning_error(weights[n], ranks[n], p.genes, j)
              for j, n in enumerate(p.layer_names)]
        eq = [sg.quantization_error(weights[n], ranks[n], p.genes, j,
                                    quantizer=self.cfg.genes.quantizer, seed=s.seed)
              for j, n in enumerate(p.layer_names)]
        self.tables = sg.build_tables(p.genes, lad, d, ep, eq)
        if s.operators == "de":
            X = probe_genes(p.genes, probe_sparsity=s.probe_sparsity, probe_bits=s.probe_bits)
            at = {k: i for i, k in enumerate(screening.row_keys(lad.X))}
            dp = np.array([d[at[k]] for k in screening.row_keys(X)])
            self.probe_sensitivity = sensitivity_from_probes(p.genes, X, dp)
        self.finish_generation()
        return True

    def setup(self) -> None:
        self.algorithm = make_algorithm(self.scfg, self.problem, self.probe_sensitivity)
        p = self.problem
        init = getattr(self.algorithm, "initialization", None)
        if (self.tables is not None and isinstance(p, CompressionProblem) and init is not None
                and self.scfg.allocation_share > 0):
            init.sampling = AllocationSampling(
                self.tables, p.genes, init.sampling, mode=self.cfg.objectives.mode,
                ref_point=p.ref_point, share=self.scfg.allocation_share,
            )
        self.algorithm.setup(
            self.problem, termination=NoTermination(), verbose=False, progress=False
        )

    def _mutation(self) -> DirectedMutation | None:
        mating = getattr(self.algorithm, "mating", None)
        mut = getattr(mating, "mutation", None)
        return mut if isinstance(mut, DirectedMutation) else None

    def bind_local(self) -> None:
        """With ``directed_by = "tables"`` and the surrogate on, the mutation ranks each
        child's genes by the cost tables at its own genes (not checkpointed: bound again
        before every generation)."""
        mut = self._mutation()
        p = self.problem
        if mut is None or not isinstance(p, CompressionProblem):
            return
        tables = self.tables
        if self.scfg.directed_by == "tables" and tables is not None:
            mut.local = partial(local_marginals, tables, p.genes)
        else:
            mut.local = None

    def refresh(self) -> None:
        mut = self._mutation()
        p = self.problem
        if mut is None or self.probe_sensitivity is None or not isinstance(p, CompressionProblem):
            return
        window = max(4 * self.scfg.pop_size, 4 * p.n_var)
        lo = max(0, self.n_full - window)
        share = np.concatenate([p.genes.weight_share, p.genes.weight_share])
        mut.sensitivity = refresh_sensitivity(
            self.probe_sensitivity,
            self.archive.X[lo:],
            self.archive.metrics["divergence"][lo:],
            xl=p.xl,
            xu=p.xu,
            compress_dir=p.compress_dir,
            weight_share=share,
        )

    def screens(self) -> bool:
        """Whether this generation's offspring are screened: the surrogate is on, the
        algorithm mates its offspring from a population (not MOEA/D, whose offspring belong
        to neighbourhoods) and its first population is evaluated."""
        alg = self.algorithm
        return (
            self.tables is not None
            and self.scfg.screen_factor > 1
            and alg is not None
            and bool(alg.is_initialized)
            and hasattr(alg, "n_offsprings")
            and not hasattr(alg, "indices")
        )

    def targeted(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Up to ``search.reallocate`` plans ``(t, n_var)`` allocated on the corrected tables
        to dominate points of the front (``reallocation.dominating_plans``), none of them
        evaluated before or among the mated candidates ``X``; their predicted divergences
        ``(t,)`` and kinds ``(t,)`` (``TARGETED`` or ``NEAR``)."""
        p = self.problem
        n = self.scfg.reallocate
        if n <= 0 or self.tables is None or not isinstance(p, CompressionProblem):
            return np.zeros((0, p.n_var), np.int64), np.zeros(0), np.zeros(0, np.int64)
        a = self.archive
        link = sg.fit_on_points(self.tables, p.genes, a.X, a.metrics["divergence"],
                                per_term=screening.PER_TERM)
        plans, pred, near = dominating_plans(
            n, self.tables, p.genes, link, a.F[a.front], mode=self.cfg.objectives.mode,
            ref_point=p.ref_point, exclude=np.concatenate([a.X, X]), front_X=a.X[a.front])
        return plans, pred, np.where(near, screening.NEAR, screening.TARGETED)

    def local(self, pop: Population) -> Population:
        """``pop`` with up to ``search.local`` rows added (``operators.local``): the moves of
        front points and the plans their measured slopes say beat them, none evaluated
        before or in ``pop``, within the budget left; recorded in screened.csv as evaluated
        in full."""
        p, alg = self.problem, self.algorithm
        left = self.scfg.budget - self.n_evals - len(pop)
        n = min(self.scfg.local, left)
        if (n <= 0 or not isinstance(p, CompressionProblem) or alg is None
                or hasattr(alg, "indices") or len(self.archive) == 0):
            return pop
        a = self.archive
        X0 = np.rint(np.asarray(pop.get("X"), float)).astype(np.int64).reshape(-1, p.n_var)
        rows, is_plan, pred, self.anchors, self.anchors_done = local_offers(
            n, p.genes, a.X, a.metrics["divergence"], self.anchors, self.anchors_done,
            a.front, a.F[a.front], p.ref_point, self.cfg.objectives.mode, exclude=X0)
        if len(rows) == 0:
            return pop
        self.record_screened(rows, self.gen + 1,
                             np.where(is_plan, screening.LOCAL, screening.LOCAL_MOVE),
                             low=np.full(len(rows), np.nan), predicted=pred,
                             full=np.ones(len(rows), bool))
        return Population.merge(pop, Population.new("X", rows))

    def screen(self, X: np.ndarray, kinds: np.ndarray | None = None,
               predicted: np.ndarray | None = None) -> np.ndarray:
        """Indices of the candidates ``X (n, n_var)`` that get a full evaluation (see
        ``moecomp.search.screening``): by the surrogate, then, with low fidelity, by the
        divergence on the first samples combined with it. Candidates evaluated in full
        before, or twice among ``X``, are skipped. Every candidate judged is recorded
        (screened.csv), with its low-fidelity divergence where one was measured, and its
        kind (``kinds (n,)``, default all mated candidates). ``predicted (n,)``: divergences
        already predicted for some rows (the targeted plans; NaN for the others), used
        instead of the link's."""
        p = self.problem
        assert isinstance(p, CompressionProblem) and self.tables is not None
        s, a = self.scfg, self.archive
        seen = set(screening.row_keys(a.X))
        fresh_rows = []
        for i, key in enumerate(screening.row_keys(X)):
            if key not in seen:
                seen.add(key)
                fresh_rows.append(i)
        fresh = np.asarray(fresh_rows, np.int64)
        if len(fresh) == 0:
            return fresh
        Xf = X[fresh]
        g = p.genes
        exact = sg.exact_objectives(g, g.numel, Xf, self.cfg.objectives.mode)
        link = sg.fit_on_points(self.tables, g, a.X, a.metrics["divergence"], gen=a.gen,
                                per_term=screening.PER_TERM)
        mu = link.predict(self.tables, g, Xf)
        if predicted is not None:
            given = np.asarray(predicted, float)[fresh]
            mu = np.where(np.isfinite(given), np.log(np.maximum(given, 1e-300)), mu)
        front = a.F[a.front]
        n_min = max(1, int(round(screening.MIN_SHARE * s.pop_size)))
        max_div = self.cfg.objectives.max_divergence

        def select(ex: np.ndarray, m: np.ndarray, sd: np.ndarray | float,
                   n_max: int = s.pop_size) -> np.ndarray:
            return screening.select(ex, m, sd, front, p.ref_point, n_max=n_max,
                                    n_min=n_min, kappa=screening.KAPPA,
                                    max_divergence=max_div)[0]

        left = s.budget - self.n_evals
        low = np.full(len(fresh), np.nan)
        first = np.zeros(0, np.int64)
        if self.low_samples and left > 1:
            first = select(exact, mu, link.sigma, screening.LOW_FACTOR * s.pop_size)
            n_low = self.screened.n_low
            k = len(first)
            while k > 0 and self.low_units(n_low + k) - self.low_units(n_low) > left - 1:
                k -= 1
            first = first[:k]
            left -= self.low_units(n_low + k) - self.low_units(n_low)
        if len(first):
            low[first] = p.evaluate_low(Xf[first])
            off, sd_low, _ = screening.low_offset(self.screened, a.X, a.metrics["divergence"])
            mu2, sd2 = screening.combine(mu[first], link.sigma,
                                         np.log(np.maximum(low[first], 1e-12)) + off, sd_low)
            chosen = first[select(exact[first], mu2, sd2)]
        else:
            chosen = select(exact, mu, link.sigma)
        chosen = chosen[: max(0, left)]
        full = np.zeros(len(fresh), bool)
        full[chosen] = True
        kind = screening.CANDIDATE if kinds is None else np.asarray(kinds)[fresh]
        self.record_screened(Xf, self.gen + 1, kind, low=low,
                             predicted=np.exp(mu), full=full)
        return fresh[chosen]

    def step(self) -> bool:
        """One generation; False when the algorithm has nothing new to offer."""
        alg = self.algorithm
        assert alg is not None
        self.bind_local()
        if self.screens():
            n_off = alg.n_offsprings  # type: ignore[attr-defined]
            alg.n_offsprings = self.scfg.screen_factor * self.scfg.pop_size  # type: ignore
            try:
                cand = alg.ask()
            finally:
                alg.n_offsprings = n_off  # type: ignore[attr-defined]
            if cand is None or len(cand) == 0:
                return False
            X = np.rint(np.asarray(cand.get("X"), dtype=float)).astype(np.int64)
            kinds = np.full(len(X), screening.CANDIDATE)
            predicted = np.full(len(X), np.nan)
            extra, extra_pred, extra_kinds = self.targeted(X)
            if len(extra):
                cand = Population.merge(cand, Population.new("X", extra))
                X = np.concatenate([X, extra])
                kinds = np.concatenate([kinds, extra_kinds])
                predicted = np.concatenate([predicted, extra_pred])
            pop = self.local(cand[self.screen(X, kinds, predicted)])
        else:
            pop = alg.ask()
            if pop is not None and len(pop) and alg.is_initialized:
                pop = self.local(pop)
        if pop is None or len(pop) == 0:
            return False
        left = self.scfg.budget - self.n_evals
        if len(pop) > left:
            pop = pop[:left]
            indices = getattr(alg, "indices", None)  # ParallelMOEAD's neighbourhoods
            if indices is not None:
                alg.indices = indices[:left]  # type: ignore[attr-defined]
        self.problem.take_records()
        alg.evaluator.eval(self.problem, pop)
        recs = self.problem.take_records()
        if sum(len(r) for r in recs) != len(pop):
            raise RuntimeError("evaluation records do not match the population asked for")
        alg.tell(infills=pop)
        self.gen += 1
        for rec in recs:
            self.record(rec)
        self.refresh()
        self.finish_generation()
        return True

    def run(self) -> SearchResult:
        with SearchProgress(
            self.scfg.budget, enabled=self.progress, start=self.n_evals, description=self.cfg.name
        ) as bar:
            bar.update(self.gen, self.n_evals, self.hv)
            try:
                while self.n_evals < self.scfg.budget:
                    if self.deadline is not None and time.perf_counter() >= self.deadline:
                        self.status = "time budget"
                        break
                    if not self.step():
                        self.status = "stopped"
                        break
                    bar.update(self.gen, self.n_evals, self.hv_rows[-1][2])
                    if self.on_generation is not None:
                        self.on_generation(self.gen, self.n_evals, self.hv_rows[-1][2])
            except BaseException as e:
                self.interrupted(e)
                raise
        if self.status == "running":
            self.status = "done"
        self.write_status()
        self.checkpoint()
        self.plots(force=True)
        return self.result()

    def interrupted(self, e: BaseException) -> None:
        """Say so in search.json: the run stopped early (an error, a pruned Optuna trial,
        SIGINT or SIGTERM) and continues from its checkpoint with ``resume``."""
        self.status = "interrupted"
        cause = terminated_in(e) or e
        self.write_status(error=f"{type(cause).__name__}: {cause}")

    def start(self) -> None:
        """A new run: clear the files of an earlier one, probe, set up, first checkpoint."""
        for name in ("evaluated.csv", "front.csv", "hv.csv", SCREENED, CHECKPOINT):
            self.folder.file(name).unlink(missing_ok=True)
        self.write_status()
        try:
            self.probe()
            self.setup()
            self.checkpoint()
        except BaseException as e:
            self.interrupted(e)
            raise

    def result(self) -> SearchResult:
        hv = _hv_frame(self.hv_rows)
        return SearchResult(
            out_dir=self.folder.path,
            front=self.folder.front(),
            hv=self.hv,
            n_evals=self.n_evals,
            n_gen=self.gen,
            status=self.status,
            hv_history=hv,
            elapsed_s=self.elapsed,
        )


def run_search(
    problem: ProblemConfig | SearchProblem | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    budget: int | None = None,
    algorithm: str | None = None,
    resume: bool = False,
    progress: bool = True,
    params: Mapping[str, Any] | None = None,
    on_generation: OnGeneration | None = None,
    runner: Runner | None = None,
    plots: bool = True,
    target: Target | None = None,
    device: str = "auto",
    time_budget: float | None = None,
) -> SearchResult:
    """Search a problem's Pareto front and write the run folder ``out_dir``.

    problem: a problem file, a ProblemConfig (the target, ranks and Evaluator are built), or a
        built SearchProblem (reused, e.g. by Optuna trials sharing one Evaluator).
    budget, algorithm, params: overrides of ``SearchConfig`` fields (``params`` any of them,
        e.g. from Optuna or ``--params-from``); the resolved config is saved as problem.json.
    resume: continue the run in ``out_dir`` from its checkpoint (its config must be the same
        except ``search.budget``, which may grow); without a checkpoint the run starts over.
        Without ``resume``, an ``out_dir`` holding anything is refused.
    on_generation: ``(gen, n_evals, hv)`` after each generation, once its files are written;
        an exception it raises (``optuna.TrialPruned``) stops the search and propagates.
    runner: where population chunks are evaluated (default in-process).
    plots: draw plots/front.png and plots/hv.png (after the first generation, then at most
        every ``PLOT_INTERVAL_S`` seconds, and at the end).
    target: the Target to search, when built in Python (``moecomp.target.make_target``);
        otherwise it is built from the problem's factories. Either way, what it is (inputs,
        output, divergence, metric, the teacher's fingerprint) is written to target.json.
    device: where relevance and the Evaluator run when they are built here (``auto``: CUDA
        when torch sees one, else the CPU; ``cpu``, ``cuda``, ``cuda:N``); a built
        SearchProblem keeps its own. Not part of problem.json: a run resumes on any device.
    time_budget: seconds of this call (set-up included: target, ranks, probes); no generation
        starts after them, the status is ``"time budget"`` and ``resume`` continues the run.
    """
    t_call = time.perf_counter()
    if time_budget is not None and not (math.isfinite(time_budget) and time_budget > 0):
        raise ConfigError("time_budget", f"must be a positive number of seconds, got {time_budget}")
    resolve_device(device, field="device")  # before the target is built (it may train)
    built: SearchProblem | None = None
    if isinstance(problem, SearchProblem):
        built = problem
        base = problem.base_config  # overrides of an earlier run must not leak
    elif isinstance(problem, ProblemConfig):
        base = problem
    else:
        base = load_problem(Path(problem))
    cfg = resolve_config(base, budget=budget, algorithm=algorithm, params=params)
    if built is not None:
        kind = "shared" if built.n_var == 1 else "layerwise"
        if cfg.search.problem != kind:
            raise ConfigError(
                "search.problem",
                f"the given problem is {kind!r}; build a new one to search another genome",
            )
        built.config = cfg
    out = Path(out_dir)
    folder = RunFolder(out)
    has_ckpt = folder.file(CHECKPOINT).is_file()
    if resume and not has_ckpt and folder.file(LEGACY_CHECKPOINT).is_file():
        raise RunError(
            f"{out} holds {LEGACY_CHECKPOINT}, a checkpoint of an older moecomp (a pickle, "
            "which can run code when loaded); it is not read any more. Start a new run in "
            "another --out (nothing was changed)"
        )
    if resume and (folder.exists() or has_ckpt):
        stored = folder.problem()
        if _resume_fingerprint(stored) != _resume_fingerprint(cfg):
            diff = _config_diff(
                stored.replace("search", budget=1).to_dict(),
                cfg.replace("search", budget=1).to_dict(),
            )
            raise RunError(
                f"{out} holds a run of another problem config; refusing to resume "
                f"it. Differences (stored -> now): {'; '.join(diff[:8])}"
            )
    else:
        _refuse_existing(out)
    if built is None:
        if target is None:
            target = build_target(cfg, progress=progress)
        built = build_problem(cfg, target=target, runner=runner, progress=progress,
                              device=device)
    elif runner is not None:
        built.runner = runner
    if target is None:
        target = getattr(getattr(built, "evaluator", None), "target", None)
    if isinstance(target, Target) and not (resume and folder.file("target.json").is_file()):
        folder.write_target_info(target_info(target))

    search = _Search(
        built, cfg, folder, progress=progress, on_generation=on_generation, plots=plots,
        deadline=None if time_budget is None else t_call + time_budget,
    )
    folder.write_problem(cfg)
    if resume and has_ckpt:
        search.resume_from_checkpoint()
    else:
        search.start()
    return search.run()
