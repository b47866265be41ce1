"""Study files: the shipped ones load; bad fields raise errors that name them."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecomp.errors import ConfigError
from moecomp.tune.config import load_study_config, study_from_dict

REPO = Path(__file__).resolve().parents[2]


def study(**over):
    raw = {
        "name": "t",
        "problem": str(REPO / "problems" / "digits-mlp.toml"),
        "space": {"pop_size": {"low": 8, "high": 32}},
    }
    raw.update(over)
    return raw


@pytest.mark.parametrize("name", ["tune-digits-mlp", "tune-fashion-lenet300"])
def test_shipped_study_files_load(name):
    cfg = load_study_config(REPO / "studies" / f"{name}.toml")
    assert cfg.name == name
    assert cfg.problem_path.is_file()
    assert cfg.out_dir == (REPO / "studies" / "out" / name).resolve()
    assert cfg.storage_url == f"sqlite:///{REPO.resolve()}/studies/out/{name}.db"
    assert cfg.budget.seeds == 3  # said in the file, as the default
    problem = cfg.load_problem()
    assert set(cfg.trial_seeds(problem)).isdisjoint(cfg.holdout_seeds(problem))
    kinds = {p.name: p.kind for p in cfg.space}
    assert kinds["algorithm"] == "categorical"
    assert kinds["pop_size"] == "int"
    assert kinds["crossover_prob"] == "float"


def test_space_values_are_typed_after_the_search_field():
    cfg = study_from_dict(
        study(
            space={
                "pop_size": {"low": 8, "high": 32, "step": 4},
                "mutation_prob": {"low": 0, "high": 1},  # ints accepted for a float field
                "directed_strength": {"low": 0.1, "high": 1.0, "log": True},
                "algorithm": {"choices": ["nsga2", "spea2"]},
            }
        )
    )
    spec = {p.name: p for p in cfg.space}
    assert (spec["pop_size"].low, spec["pop_size"].high, spec["pop_size"].step) == (8, 32, 4)
    assert isinstance(spec["pop_size"].low, int)
    assert isinstance(spec["mutation_prob"].low, float)
    assert spec["directed_strength"].log
    assert spec["algorithm"].choices == ("nsga2", "spea2")


@pytest.mark.parametrize(
    ("raw", "field", "message"),
    [
        (study(colour="red"), "colour", "allowed: name, problem"),
        (study(n_trials="10"), "n_trials", "integer"),
        (study(n_trials=0), "n_trials", r"\[1, 1000000\]"),
        (study(budget={"evaluations": 0}), "budget.evaluations", r"\[1, 10000000\]"),
        (study(budget={"evals": 10}), "budget.evals", "allowed: evaluations"),
        (study(budget={"seeds": 0}), "budget.seeds", r"\[1, 50\]"),
        (study(budget={"seeds": 51}), "budget.seeds", r"\[1, 50\]"),
        (study(budget={"seeds": 2.5}), "budget.seeds", "integer"),
        (study(holdout={"seeds": []}), "holdout.seeds", "must not be empty"),
        (study(holdout={"seeds": [9, 9]}), "holdout.seeds", "duplicates"),
        (study(holdout={"seeds": "9"}), "holdout.seeds", "list"),
        (
            study(budget={"seed": 4, "seeds": 3}, holdout={"seeds": [6, 7]}),
            "holdout.seeds",
            r"\[6\] are trial seeds \(\[4, 5, 6\]",
        ),
        (study(holdout={"n": 3}), "holdout.n", "allowed: seeds"),
        (study(sampler={"kind": "cmaes"}), "sampler.kind", "'tpe', 'random'"),
        (
            study(pruner={"kind": "median", "interval_steps": 0}),
            "pruner.interval_steps",
            r"\[1, 100000\]",
        ),
        (
            study(heartbeat={"interval": 10, "grace_period": 5}),
            "heartbeat.grace_period",
            "> heartbeat.interval",
        ),
        (study(space={}), "space", "is empty"),
        (
            study(space={"pop_sise": {"low": 8, "high": 9}}),
            "space.pop_sise",
            "unknown search field; tunable: algorithm",
        ),
        (study(space={"budget": {"low": 8, "high": 9}}), "space.budget", "fixed for a study"),
        (study(space={"pop_size": {"low": 2, "high": 9}}), "space.pop_size.low", r"\[4, 10000\]"),
        (study(space={"pop_size": {"low": 8.5, "high": 9}}), "space.pop_size.low", "integer"),
        (study(space={"pop_size": {"low": 20, "high": 9}}), "space.pop_size.low", "<= high"),
        (
            study(space={"pop_size": {"low": 8, "high": 16, "step": 0.5}}),
            "space.pop_size.step",
            "integer",
        ),
        (study(space={"pop_size": {"high": 16}}), "space.pop_size", "needs low and high"),
        (
            study(space={"mutation_prob": {"low": 0.2, "high": 1.5}}),
            "space.mutation_prob.high",
            r"\[0, 1\]",
        ),
        (
            study(space={"mutation_prob": {"low": 0.0, "high": 0.5, "log": True}}),
            "space.mutation_prob.low",
            "> 0 with log",
        ),
        (study(space={"algorithm": {"low": 1, "high": 2}}), "space.algorithm", "needs choices"),
        (
            study(space={"algorithm": {"choices": ["nsga2", "cmaes"]}}),
            "space.algorithm.choices[1]",
            "'nsga2'",
        ),
        (study(space={"algorithm": {"choices": []}}), "space.algorithm.choices", "empty"),
        (study(space={"pop_size": {"choices": [8, 8]}}), "space.pop_size.choices", "duplicates"),
        (
            study(space={"pop_size": {"choices": [8, 16], "low": 4}}),
            "space.pop_size",
            "either choices",
        ),
        (
            study(space={"pop_size": {"low": 8, "high": 16, "colour": 1}}),
            "space.pop_size.colour",
            "unknown key",
        ),
        (study(name="../x"), "name", "plain folder name"),
        ({"problem": "p.toml", "space": {"pop_size": {"low": 8, "high": 9}}}, "name", "missing"),
    ],
)
def test_bad_fields_are_named(raw, field, message):
    with pytest.raises(ConfigError, match=message) as err:
        study_from_dict(raw)
    assert err.value.field == field


def test_missing_problem_file_is_named(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('name = "s"\nproblem = "nope.toml"\n[space.pop_size]\nlow = 8\nhigh = 16\n')
    with pytest.raises(ConfigError, match="no such problem file") as err:
        load_study_config(p)
    assert err.value.field == "problem"


def test_paths_resolve_against_the_study_file(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "s.toml"
    p.write_text(
        f'name = "s"\nproblem = "{REPO / "problems" / "digits-mlp.toml"}"\n'
        'output = "../results"\n[space.pop_size]\nlow = 8\nhigh = 16\n'
    )
    cfg = load_study_config(p)
    assert cfg.out_dir == (tmp_path / "results" / "s").resolve()
    assert cfg.storage_url == f"sqlite:///{(tmp_path / 'results' / 's.db').resolve()}"
