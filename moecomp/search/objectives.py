"""The objective space of a run: which metric columns are minimised, their axis labels with
units, and the fixed hypervolume reference point, as ``moecomp.search`` sets them. Read from a
problem config alone, so run folders, comparisons and picks agree without a target."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moecomp.config import ProblemConfig
from moecomp.divergence import divergence_label
from moecomp.metric import drop_label
from moecomp.target import metric_name_unit


@dataclass(frozen=True)
class ObjectiveSpace:
    """The minimised objectives of a run: metric column names, axis labels with units, and
    the fixed HV reference point ``(n_obj,)`` in raw units. ``size`` is density * bits / 32
    (the share of the fp32 weight bits left)."""

    names: tuple[str, ...]
    labels: tuple[str, ...]
    ref_point: np.ndarray

    def matrix(self, df: pd.DataFrame) -> np.ndarray:
        """``F (n, n_obj)`` of a metric frame (rows of evaluated.csv / compare_de.csv)."""
        cols = []
        for name in self.names:
            if name == "size":
                cols.append(df["density"].to_numpy(float) * df["bits"].to_numpy(float) / 32.0)
            else:
                cols.append(df[name].to_numpy(float))
        return np.column_stack(cols) if cols else np.zeros((len(df), 0))


def objective_space(problem: ProblemConfig) -> ObjectiveSpace:
    """The objectives and HV reference of ``problem``'s search, as ``moecomp.search`` sets
    them: 3obj density, bits, divergence; 2obj size, divergence; the weight-sharing problem
    (``search.problem = "shared"``) size and divergence or the metric's drop."""
    o = problem.objectives
    div = divergence_label(o.divergence)
    size = "size (share of fp32 weight bits)"
    if problem.search.problem == "shared":  # the objectives of SharedCodebookProblem
        if problem.genes.shared_fidelity == "metric_drop":
            acc_ref = [o.ref_point[0] if o.mode == "2obj" else 1.0, 100.0]
            return ObjectiveSpace(
                ("size", "metric_drop"),
                (size, drop_label(*metric_name_unit(o))),
                np.asarray(acc_ref, dtype=float),
            )
        div_ref = list(o.ref_point) if o.mode == "2obj" else [1.0, o.ref_point[2]]
        return ObjectiveSpace(("size", "divergence"), (size, div), np.asarray(div_ref, dtype=float))
    if o.mode == "2obj":
        return ObjectiveSpace(
            ("size", "divergence"), (size, div), np.asarray(o.ref_point, dtype=float)
        )
    return ObjectiveSpace(
        ("density", "bits", "divergence"),
        ("density (share of weights kept)", "mean bits per kept weight", div),
        np.asarray(o.ref_point, dtype=float),
    )
