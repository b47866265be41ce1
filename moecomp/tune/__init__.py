"""Tune: Optuna studies whose trials are whole searches (stage 7 of shared/DESIGN.md).

``config`` reads study files, ``study`` runs them and reads the best parameters back,
``holdout`` compares the best parameters with the defaults on held-out seeds, ``report``
draws a finished study.
"""

from moecomp.tune.config import StudyConfig, load_study_config
from moecomp.tune.study import best_params, load_study, run_study

__all__ = ["StudyConfig", "best_params", "load_study", "load_study_config", "run_study"]
