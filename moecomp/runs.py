"""Run folders: where a search writes its results and every later stage reads them.

Layout of ``RUN/``::

    problem.json     the resolved ProblemConfig (with command-line overrides applied); it
                     names the factories later commands import to rebuild the same target
    target.json      what the target turned out to be: inputs, output, divergence, metric
                     (name, direction, units, the teacher's values), compressed layers
    search.json      status, algorithm, seed, budget, evaluations, elapsed seconds
    evaluated.csv    every evaluated solution: id, gen, metrics, s:<tensor>, b:<tensor>
    front.csv        the non-dominated subset of evaluated.csv (same columns)
    hv.csv           gen, n_evals, hv, elapsed_s
    checkpoint.safetensors   the search state after the last finished generation (data
                     only: arrays and JSON, moecomp.search.checkpoint)
    plots/           PNG figures
    picks.csv, refined/, exports/   written by pick, refine and export

A solution is named by its ``id``: the evaluation counter, stable across resumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from moecomp.atomic import replace_atomically
from moecomp.config import ProblemConfig, problem_from_dict
from moecomp.errors import RunError
from moecomp.plan import CompressionPlan, LayerPlan

METRICS = ("density", "bits", "divergence", "size_bytes", "ratio", "metric", "metric_drop")
"""Columns of evaluated.csv after id and gen: ``metric`` is the target's task metric (e.g.
accuracy in %) on the calibration samples and ``metric_drop`` the teacher's minus it (for a
metric to maximise), NaN without a metric; target.json names the metric and its units."""

LEGACY_COLUMNS = {"accuracy": "metric", "acc_drop": "metric_drop", "val_acc": "val_metric",
                  "test_acc": "test_metric", "teacher_val_acc": "teacher_val_metric",
                  "teacher_test_acc": "teacher_test_metric", "calib_acc": "calib_metric"}
"""Column names of run folders written before metrics were generic."""


def sparsity_col(name: str) -> str:
    return f"s:{name}"


def bits_col(name: str) -> str:
    return f"b:{name}"


def plans_from_genes(names: Sequence[str], sparsity: np.ndarray, bits: np.ndarray, *,
                     quantizer: str = "uniform") -> list[CompressionPlan]:
    """Plans from gene matrices: sparsity (n, L) in [0, 1), bits (n, L) ints 1..8."""
    out = []
    for s_row, b_row in zip(sparsity, bits, strict=True):
        out.append(CompressionPlan(layers={
            n: LayerPlan(sparsity=round(float(s), 6), bits=int(b), quantizer=quantizer)
            for n, s, b in zip(names, s_row, b_row, strict=True)
        }))
    return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename (``moecomp.atomic``): a killed process never
    leaves half a file, two processes writing it at once never mix theirs."""
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_csv(path: Path, df: pd.DataFrame) -> None:
    replace_atomically(path, lambda tmp: df.to_csv(tmp, index=False))


class RunFolder:
    """Read and write one run folder."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # --- paths --------------------------------------------------------------------------
    @property
    def plots(self) -> Path:
        p = self.path / "plots"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def file(self, name: str) -> Path:
        return self.path / name

    def exists(self) -> bool:
        return (self.path / "problem.json").is_file()

    def require(self, name: str) -> Path:
        p = self.path / name
        if not p.is_file():
            if not self.path.exists():
                raise RunError(f"{self.path} is not a run folder (it does not exist)")
            if not self.path.is_dir():
                raise RunError(f"{self.path} is not a run folder (it is a file)")
            raise RunError(f"{self.path} has no {name}: did the search finish a generation?")
        return p

    # --- problem and status -------------------------------------------------------------
    def write_problem(self, problem: ProblemConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "problem.json", json.dumps(problem.to_dict(), indent=2))

    def problem(self) -> ProblemConfig:
        raw = json.loads(self.require("problem.json").read_text())
        return problem_from_dict(_lists_to_toml(raw))

    def write_status(self, status: dict[str, Any]) -> None:
        atomic_write_text(self.path / "search.json", json.dumps(status, indent=2))

    def status(self) -> dict[str, Any]:
        p = self.path / "search.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    # --- tables -------------------------------------------------------------------------
    def write_target_info(self, info: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "target.json", json.dumps(info, indent=2))

    def target_info(self) -> dict[str, Any]:
        """target.json (``{}`` for a run that predates it)."""
        p = self.path / "target.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def table(self, name: str) -> pd.DataFrame:
        """A CSV of the run folder, legacy column names renamed."""
        return read_table(self.require(name))

    def evaluated(self) -> pd.DataFrame:
        return self.table("evaluated.csv")

    def front(self) -> pd.DataFrame:
        return self.table("front.csv")

    def hv_history(self) -> pd.DataFrame:
        return pd.read_csv(self.require("hv.csv"))

    def layer_names(self, df: pd.DataFrame | None = None) -> list[str]:
        df = self.evaluated() if df is None else df
        return [c[2:] for c in df.columns if c.startswith("s:")]

    def row(self, solution: int) -> pd.Series:
        """The evaluated row of solution ``id``."""
        df = self.evaluated()
        hit = df[df["id"] == solution]
        if hit.empty:
            raise RunError(f"{self.path} has no solution {solution}; ids run "
                           f"{int(df['id'].min())}..{int(df['id'].max())}")
        return hit.iloc[0]

    def plan(self, solution: int) -> CompressionPlan:
        """The CompressionPlan of solution ``id``."""
        row = self.row(solution)
        quantizer = self.problem().genes.quantizer
        names = self.layer_names()
        s = np.array([[row[sparsity_col(n)] for n in names]], dtype=float)
        b = np.array([[row[bits_col(n)] for n in names]], dtype=int)
        meta = {"run": str(self.path), "solution": int(solution)}
        if "shared_k" in row.index:  # a weight-sharing run (search.problem = "shared")
            layers = {n: LayerPlan(sparsity=round(float(s[0, j]), 6), bits=int(b[0, j]),
                                   quantizer="shared") for j, n in enumerate(names)}
            return CompressionPlan(layers=layers, shared_k=int(row["shared_k"]), meta=meta)
        plan = plans_from_genes(names, s, b, quantizer=quantizer)[0]
        return CompressionPlan(layers=plan.layers, shared_k=plan.shared_k, meta=meta)


def read_table(path: Path) -> pd.DataFrame:
    """A run folder's CSV with legacy column names (``accuracy``, ``acc_drop``, ...) renamed."""
    df = pd.read_csv(path)
    return df.rename(columns={k: v for k, v in LEGACY_COLUMNS.items() if k in df.columns})


class MetricInfo(NamedTuple):
    """How a run's task metric is shown: its name (``accuracy``), unit (``%``, or a user's,
    may be empty) and direction (``maximize`` or ``minimize``)."""

    name: str
    unit: str
    direction: str

    @property
    def percent(self) -> bool:
        """A percentage: drops are in points and values lie in [0, 100]."""
        return self.unit == "%"

    @property
    def label(self) -> str:
        """The metric with its unit, e.g. ``accuracy (%)``."""
        return f"{self.name} ({self.unit})" if self.unit else self.name

    @property
    def drop_unit(self) -> str:
        """The unit of its drop: ``points`` for a percentage, else the metric's own."""
        return "points" if self.percent else self.unit

    @property
    def drop_label(self) -> str:
        """Its drop with units, e.g. ``accuracy drop (points)``."""
        # moecomp.metric imports torch, which reading a run folder does not otherwise need.
        from moecomp.metric import drop_label

        return drop_label(self.name, self.unit)


def metric_info(run: RunFolder, evaluated: pd.DataFrame | None = None) -> MetricInfo | None:
    """The task metric a run's tables and figures show, from ``RUN/target.json``; None when
    the target has none (it was searched on divergence alone, metric columns are NaN).

    A run that predates target.json (or whose target.json does not say) measured accuracy in
    % wherever its ``metric`` column (of ``evaluated``, default evaluated.csv) has values.
    """
    info = run.target_info()
    if "metric" in info:
        m = info["metric"]
        if m is None:
            return None
        return MetricInfo(str(m.get("name") or m.get("ref") or "metric"),
                          str(m.get("unit") or ""), str(m.get("direction") or "maximize"))
    df = run.evaluated() if evaluated is None else evaluated
    if "metric" in df.columns and df["metric"].notna().any():
        return MetricInfo("accuracy", "%", "maximize")
    return None


def _lists_to_toml(raw: Any) -> Any:
    """JSON turns tuples into lists; the config builder accepts lists, so nothing to do but
    drop nulls (TOML has no null: an absent key means the default) and rename the keys of
    older run folders."""
    if isinstance(raw, dict):
        out = {k: _lists_to_toml(v) for k, v in raw.items() if v is not None}
        if "max_accuracy_drop" in out:
            out["max_metric_drop"] = out.pop("max_accuracy_drop")
        if out.get("shared_fidelity") == "acc_drop":
            out["shared_fidelity"] = "metric_drop"
        return out
    return raw


def solutions_frame(ids: np.ndarray, gen: int | np.ndarray, names: Sequence[str],
                    sparsity: np.ndarray, bits: np.ndarray, metrics: dict[str, np.ndarray],
                    *, extra: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Rows for evaluated.csv: ids (n,), gen (one int or (n,)), genes (n, L), metrics
    name -> (n,); ``extra``: further columns (n,) after the metrics, e.g. ``shared_k`` (the
    weight-sharing genome's K) or ``feasible``."""
    gens = np.broadcast_to(np.asarray(gen, dtype=int), (len(ids),))
    cols: dict[str, Any] = {"id": ids.astype(int), "gen": gens.copy()}
    for m in METRICS:
        cols[m] = metrics[m]
    for k, v in (extra or {}).items():
        cols[k] = v
    for j, n in enumerate(names):
        cols[sparsity_col(n)] = np.round(sparsity[:, j], 6)
    for j, n in enumerate(names):
        cols[bits_col(n)] = bits[:, j].astype(int)
    return pd.DataFrame(cols)
