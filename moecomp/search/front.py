"""The non-dominated front of evaluated points and its hypervolume.

Hypervolume: objectives are divided by the problem's fixed reference point and measured
against all ones with pymoo's ``HV`` (moocore), so it lies in [0, 1] and compares across
runs, algorithms and samplers of one problem. Points beyond the reference contribute 0.
"""

from __future__ import annotations

import numpy as np
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting


def nondominated(F: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of ``F (n, n_obj)`` (minimised), ascending.

    Rows with equal objectives are all kept (none dominates another)."""
    F = np.asarray(F, dtype=float)
    if len(F) == 0:
        return np.zeros(0, dtype=np.int64)
    idx = NonDominatedSorting().do(F, only_non_dominated_front=True)
    return np.sort(np.asarray(idx, dtype=np.int64))


def feasible(G: np.ndarray) -> np.ndarray:
    """bool ``(n,)``: every constraint of ``G (n, n_ieq)`` is ``<= 0``."""
    G = np.asarray(G, dtype=float)
    return np.all(G <= 0.0, axis=1) if G.shape[1] else np.ones(len(G), dtype=bool)


def hypervolume(F: np.ndarray, ref_point: np.ndarray) -> float:
    """HV of ``F (n, n_obj)`` divided by ``ref_point (n_obj,)``, reference all ones; 0 for
    no points."""
    F = np.asarray(F, dtype=float)
    if len(F) == 0:
        return 0.0
    ref = np.asarray(ref_point, dtype=float)
    return float(HV(ref_point=np.ones(len(ref)))(F / ref))


def contributions(F: np.ndarray, ref_point: np.ndarray) -> np.ndarray:
    """``(n,)`` each point's exclusive share of the hypervolume of ``F (n, n_obj)`` (what
    removing it alone loses; units of :func:`hypervolume`)."""
    F = np.asarray(F, dtype=float)
    whole = hypervolume(F, ref_point)
    return np.array([whole - hypervolume(np.delete(F, i, axis=0), ref_point)
                     for i in range(len(F))])
