"""The scorers by name (the values of ``relevance.scorer`` in a problem file)."""

from __future__ import annotations

from typing import Protocol

from moecomp.config import RelevanceConfig
from moecomp.relevance.base import Scorer
from moecomp.relevance.directed import DirectedEvolution
from moecomp.relevance.magnitude import Magnitude
from moecomp.relevance.taylor import Taylor


class ScorerClass(Protocol):
    """A scorer's class: called with no arguments it gives the scorer with default
    settings; ``from_config`` gives it with a problem's ``[relevance]`` settings."""

    def __call__(self) -> Scorer: ...

    def from_config(self, cfg: RelevanceConfig, *, progress: bool = False) -> Scorer: ...


SCORERS: dict[str, ScorerClass] = {
    "magnitude": Magnitude,
    "taylor": Taylor,
    "directed": DirectedEvolution,
}
