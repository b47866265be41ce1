"""run_study's wiring (fast: a fake search with the real contract): values, reports and
pruning, artifacts, continuing a study, best parameters, the report and the command."""

from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest
from optuna.artifacts import download_artifact
from optuna.trial import TrialState
from tunehelpers import fake_hv, patch_fake_search, write_study
from typer.testing import CliRunner

from moecomp.config import SearchConfig
from moecomp.errors import ConfigError, RunError
from moecomp.tune import best_params, load_study_config, run_study
from moecomp.tune.report import (
    best_hv_info,
    history_info,
    importance_info,
    intermediate_info,
    write_report,
)
from moecomp.tune.study import artifacts_dir, n_finished, report_steps_crossed, storage_url

SPACE = {
    "crossover_prob": {"low": 0.0, "high": 1.0},
    "pop_size": {"low": 8, "high": 24, "step": 8},
    "algorithm": {"choices": ["nsga2", "spea2"]},
}


def fake_study(tmp_path, **over):
    kw = {
        "name": "fake",
        "n_trials": 8,
        "budget": {"evaluations": 64, "report_steps": 4, "seeds": 1},  # the layout of one
        "sampler": {"kind": "random", "seed": 3},
        "pruner": {"kind": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
        "space": SPACE,
    }
    kw.update(over)
    return load_study_config(write_study(tmp_path / "study.toml", **kw))


@pytest.mark.parametrize(
    ("n_evals", "done", "want"),
    [
        (0, 0, []),
        (15, 0, []),
        (16, 0, [1]),
        (40, 1, [2]),
        (64, 2, [3, 4]),
        (90, 0, [1, 2, 3, 4]),
        (64, 4, []),
    ],
)
def test_report_steps_sit_on_an_evaluation_grid(n_evals, done, want):
    assert list(report_steps_crossed(n_evals, budget=64, steps=4, done=done)) == want


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One 8-trial study of the fake search, shared by the tests that only read it."""
    tmp_path = tmp_path_factory.mktemp("fake")
    with pytest.MonkeyPatch.context() as mp:
        patch_fake_search(mp)
        cfg = fake_study(tmp_path)
        study = run_study(cfg, progress=False)
    return tmp_path, cfg, study


def test_study_values_reports_pruning_and_artifacts(finished):
    tmp_path, cfg, study = finished
    assert n_finished(study) == 8
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert [t.number for t in study.trials] == list(range(8))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert complete and pruned, "seeded random sampler: some trials are clearly worse"
    for t in complete:
        n = t.user_attrs["n_evals"]
        assert n >= 64
        assert t.value == pytest.approx(fake_hv(t.params, n, 64))
        # one report per grid step, the last at the budget
        assert sorted(t.intermediate_values) == [1, 2, 3, 4]
    for t in pruned:
        assert max(t.intermediate_values) < 4, "never pruned after the budget is spent"
    for t in trials:  # every trial's front: in its run folder and as an artifact
        run_front = tmp_path / "out" / "fake" / f"trial-{t.number}" / "front.csv"
        assert t.user_attrs["run_dir"] == str(run_front.parent)
        got = tmp_path / f"artifact-{t.number}.csv"
        download_artifact(
            artifact_store=optuna.artifacts.FileSystemArtifactStore(str(artifacts_dir(cfg))),
            file_path=str(got),
            artifact_id=t.user_attrs["front_artifact_id"],
        )
        pd.testing.assert_frame_equal(pd.read_csv(got), pd.read_csv(run_front))
    # each search gets every search field: the problem file's, the study seed, the trial's
    fields = set(SearchConfig.__dataclass_fields__) - {"budget"}
    for t in trials:
        sent = json.loads(
            (tmp_path / "out" / "fake" / f"trial-{t.number}" / "params.json").read_text()
        )
        assert set(sent) == fields
        assert {k: sent[k] for k in t.params} == t.params
        own = cfg.load_problem().search.mutation_prob  # not tuned here: the problem file's
        assert sent["seed"] == 0 and sent["mutation_prob"] == own
    best = study.best_trial
    assert study.user_attrs["best_run_dir"] == best.user_attrs["run_dir"]
    assert study.user_attrs["best_trial"] == best.number
    saved = json.loads((cfg.out_dir / "best_params.json").read_text())
    assert saved["params"] == best.params and saved["trial"] == best.number
    assert json.loads((cfg.out_dir / "study.json").read_text())["name"] == "fake"


def test_rerun_continues_and_runs_only_the_missing_trials(tmp_path, fake_search_patch):
    cfg = fake_study(tmp_path, n_trials=3)
    first = run_study(cfg, progress=False)
    before = [(t.number, t.state, t.params) for t in first.trials]
    assert len(before) == 3
    again = run_study(cfg, progress=False)  # target reached: nothing runs
    assert len(again.trials) == 3
    more = run_study(cfg, n_trials=5, progress=False)
    assert n_finished(more) == 5
    assert [(t.number, t.state, t.params) for t in more.trials[:3]] == before
    # the sampler is re-seeded past the stored trials: no redrawn points
    assert len({tuple(sorted(t.params.items())) for t in more.trials}) == 5


def test_a_changed_budget_is_refused(tmp_path, fake_search_patch):
    run_study(fake_study(tmp_path, n_trials=1), progress=False)
    changed = fake_study(tmp_path, n_trials=2, budget={"evaluations": 128})
    with pytest.raises(ConfigError, match="would not compare") as err:
        run_study(changed, progress=False)
    assert err.value.field == "budget.evaluations"


def test_workers_starting_together_agree_on_the_study(tmp_path):
    """CI once saw a worker refuse a study another worker was creating: it read the problem
    before the other wrote it and the budget after. The identity is now read once and
    written whole; here the other worker writes it between our read and our write."""
    from moecomp.tune.study import _check_same_study

    cfg = fake_study(tmp_path)
    problem = cfg.load_problem()
    cfg.out_dir.parent.mkdir(parents=True, exist_ok=True)
    other = optuna.create_study(study_name="fake", storage=cfg.storage_url, direction="maximize")

    class LateLook:
        """Our view of the study: the first read is empty, the other worker then writes."""

        def __init__(self):
            self.study = optuna.load_study(study_name="fake", storage=cfg.storage_url)
            self.reads = 0

        @property
        def user_attrs(self):
            self.reads += 1
            if self.reads == 1:
                _check_same_study(other, cfg, problem)
                return {}
            return self.study.user_attrs

        def set_user_attr(self, key, value):
            self.study.set_user_attr(key, value)

    ours = LateLook()
    _check_same_study(ours, cfg, problem)  # type: ignore[arg-type]
    attrs = other.user_attrs
    want = {"problem": problem.name, "budget": 64, "seeds": 1}
    assert attrs["identity"] == want
    assert {k: attrs[k] for k in want} == want
    assert sorted(attrs["space"]) == sorted(SPACE)
    with pytest.raises(ConfigError, match="budget 64, this file says 128"):
        _check_same_study(other, fake_study(tmp_path, budget={"evaluations": 128}), problem)


def test_best_params_from_every_source(finished):
    tmp_path, cfg, study = finished
    want = study.best_trial.params
    assert best_params(study) == want
    assert best_params(tmp_path / "study.toml") == want
    assert best_params(cfg.out_dir / "best_params.json") == want
    assert best_params(cfg.out_dir.with_suffix(".db")) == want
    assert best_params(cfg.storage_url, study_name="fake") == want
    with pytest.raises(RunError, match="no study 'other'"):
        best_params(cfg.storage_url, study_name="other")


def test_best_params_of_a_study_never_run(tmp_path):
    fake_study(tmp_path)
    with pytest.raises(RunError, match="run `moecomp study` first"):
        best_params(tmp_path / "study.toml")


def test_report_info_and_pngs(finished, tmp_path):
    _, _, study = finished
    hist = history_info(study)
    assert list(hist["number"]) == sorted(hist["number"])
    assert hist["best"].dropna().is_monotonic_increasing
    first = int((hist["state"] == "COMPLETE").to_numpy().argmax())
    assert hist["best"].iloc[first:].notna().all()  # carried through pruned trials
    assert hist["best"].max() == pytest.approx(study.best_value)
    imp = importance_info(study)
    assert set(imp.index) <= {"crossover_prob", "pop_size", "algorithm"}
    assert imp.sum() == pytest.approx(1.0)
    hv = best_hv_info(study)
    assert hv["hv"].iloc[-1] == pytest.approx(study.best_value)
    inter = intermediate_info(study, budget=64, report_steps=4)
    assert set(inter["n_evals"]) <= {16.0, 32.0, 48.0, 64.0}
    written = write_report(study, tmp_path / "report", budget=64, report_steps=4)
    assert set(written) == {"history", "importances", "best_hv"}
    for path in written.values():
        assert path.is_file() and path.stat().st_size > 10_000


def test_study_command_runs_and_reports(tmp_path, fake_search_patch):
    from moecomp.cli import app

    fake_study(tmp_path, n_trials=4)
    result = CliRunner().invoke(
        app, ["study", str(tmp_path / "study.toml"), "--no-progress", "--report"]
    )
    assert result.exit_code == 0, result.output
    assert "best parameters" in result.output
    assert "crossover_prob" in result.output
    for png in ("history.png", "importances.png", "best_hv.png"):
        assert (tmp_path / "out" / "fake" / "report" / png).is_file()
    again = CliRunner().invoke(
        app, ["study", str(tmp_path / "study.toml"), "--no-progress", "--n-trials", "5"]
    )
    assert again.exit_code == 0, again.output
    assert "5 complete" in again.output or "pruned" in again.output


def test_study_command_names_a_bad_field(tmp_path, monkeypatch, capsys):
    from moecomp.cli import main

    bad = write_study(tmp_path / "bad.toml", name="bad", space={"pop_size": {"low": 2, "high": 8}})
    monkeypatch.setattr("sys.argv", ["moecomp", "study", str(bad), "--no-progress"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert "space.pop_size.low: must be in [4, 10000], got 2" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("sampler", "pruner"),
    [
        ("tpe", "median"),
        ("random", "hyperband"),
        ("nsga2", "none"),
        ("qmc", "median"),
        ("gp", "none"),
    ],
)
def test_every_sampler_and_pruner_runs(tmp_path, fake_search_patch, sampler, pruner):
    cfg = fake_study(
        tmp_path,
        n_trials=4,
        sampler={"kind": sampler, "seed": 1, "n_startup_trials": 2, "population_size": 2},
        pruner={"kind": pruner, "n_startup_trials": 1},
    )
    study = run_study(cfg, storage=optuna.storages.InMemoryStorage(), progress=False)
    assert n_finished(study) == 4
    for t in study.trials:
        assert 0.0 <= t.params["crossover_prob"] <= 1.0
        assert t.params["pop_size"] in (8, 16, 24)
        assert t.params["algorithm"] in ("nsga2", "spea2")


def test_storage_urls_are_opened_with_the_installed_postgres_driver(repo):
    """The README's ``postgresql://user@host/db`` names psycopg 3, moecomp's dependency,
    whatever SQLAlchemy's default for the bare scheme (psycopg2 in 2.0, psycopg in 2.1)."""
    import importlib.util

    assert "--storage postgresql://user@host/db" in (repo / "README.md").read_text()
    assert storage_url("postgresql://user@host/db") == "postgresql+psycopg://user@host/db"
    assert importlib.util.find_spec("psycopg") is not None
    assert storage_url("sqlite:///x/y.db") == "sqlite:///x/y.db"
    with pytest.raises(ConfigError, match="storage: the driver of 'mysql' is not installed"):
        storage_url("mysql://u@h/d")
    with pytest.raises(ConfigError, match="not a database URL"):
        storage_url("my study")
