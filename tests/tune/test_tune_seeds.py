"""Trials of several seeds (fast: the fake search): the value is the mean of the seeds' final
HVs as their run folders hold them, reports sit on one grid over all seeds, fronts are
artifacts, and a study is not continued with another seed count."""

from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest
from optuna.artifacts import download_artifact
from optuna.trial import TrialState
from tunehelpers import DIGITS, fake_hv, fake_search, patch_fake_search, write_study

from moecomp.config import load_problem
from moecomp.errors import ConfigError
from moecomp.tune import load_study_config, run_study
from moecomp.tune.report import best_hv_info, intermediate_info, write_report
from moecomp.tune.study import artifacts_dir

BUDGET, STEPS, SEEDS = 64, 4, 3
SPACE = {
    "crossover_prob": {"low": 0.0, "high": 1.0},
    "pop_size": {"low": 8, "high": 24, "step": 8},
}


def seeded_study(tmp_path, **over):
    kw = {
        "name": "seeded",
        "n_trials": 8,
        "budget": {"evaluations": BUDGET, "report_steps": STEPS, "seeds": SEEDS, "seed": 5},
        "sampler": {"kind": "random", "seed": 3},
        "pruner": {"kind": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
        "space": SPACE,
    }
    kw.update(over)
    return load_study_config(write_study(tmp_path / "study.toml", **kw))


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("seeded")
    with pytest.MonkeyPatch.context() as mp:
        patch_fake_search(mp)
        cfg = seeded_study(tmp_path)
        study = run_study(cfg, progress=False)
    return tmp_path, cfg, study


def seed_dirs(cfg, number):
    return [cfg.out_dir / f"trial-{number}" / f"seed-{s}" for s in range(5, 5 + SEEDS)]


def expected_reports(dirs) -> dict[int, float]:
    """What the trial should have reported at each grid step, from the seeds' hv.csv: at the
    first generation reaching the step, the mean of the earlier seeds' final HVs and this
    seed's HV."""
    want, finals = {}, []
    for i, d in enumerate(dirs):
        if not (d / "hv.csv").is_file():
            break
        hv = pd.read_csv(d / "hv.csv")
        for j in range(1, STEPS + 1):
            reached = hv[hv["n_evals"] * STEPS >= j * BUDGET]
            if reached.empty:
                break
            want[i * STEPS + j] = (sum(finals) + reached["hv"].iloc[0]) / (len(finals) + 1)
        finals.append(hv["hv"].iloc[-1])
    return want


def test_trial_value_is_the_mean_of_the_seed_folders(seeded):
    _, cfg, study = seeded
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert complete
    for t in complete:
        dirs = seed_dirs(cfg, t.number)
        finals = [pd.read_csv(d / "hv.csv")["hv"].iloc[-1] for d in dirs]
        assert t.value == pytest.approx(sum(finals) / SEEDS)
        assert t.user_attrs["hv_per_seed"] == pytest.approx(finals)
        assert t.user_attrs["seeds"] == [5, 6, 7]
        assert t.user_attrs["run_dir"] == str(cfg.out_dir / f"trial-{t.number}")
        for seed, d, hv in zip((5, 6, 7), dirs, finals, strict=True):
            sent = json.loads((d / "params.json").read_text())
            assert sent["seed"] == seed
            assert {k: sent[k] for k in t.params} == t.params  # same parameters every seed
            n = int(pd.read_csv(d / "hv.csv")["n_evals"].iloc[-1])
            assert hv == pytest.approx(fake_hv(sent, n, BUDGET))
        assert len({round(h, 9) for h in finals}) == SEEDS, "the seeds give different HVs"
    saved = json.loads((cfg.out_dir / "best_params.json").read_text())
    assert saved["hv_per_seed"] == study.best_trial.user_attrs["hv_per_seed"]
    assert saved["seeds"] == [5, 6, 7] and saved["value"] == study.best_value


def test_reports_sit_on_one_grid_over_all_seeds(seeded):
    _, cfg, study = seeded
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "seeded random sampler: some trials are clearly worse"
    for t in trials:
        want = expected_reports(seed_dirs(cfg, t.number))
        got = dict(t.intermediate_values)
        if t.state == TrialState.COMPLETE:
            assert sorted(got) == list(range(1, STEPS * SEEDS + 1))
            assert got[STEPS * SEEDS] == pytest.approx(t.value)
        else:
            assert max(got) < STEPS * SEEDS, "never pruned after the last seed's budget"
        assert got == pytest.approx({k: want[k] for k in got})
    # the grid in evaluations: the same points for every trial, whatever its pop_size
    inter = intermediate_info(study, budget=BUDGET, report_steps=STEPS)
    assert set(inter["n_evals"]) <= {k * BUDGET / STEPS for k in range(1, STEPS * SEEDS + 1)}


def test_every_seeds_front_is_an_artifact(seeded, tmp_path):
    _, cfg, study = seeded
    store = optuna.artifacts.FileSystemArtifactStore(str(artifacts_dir(cfg)))
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        ids = t.user_attrs["front_artifacts"]
        assert sorted(ids) == ["5", "6", "7"]
        assert "front_artifact_id" not in t.user_attrs  # the one-seed attribute
        for seed, d in zip((5, 6, 7), seed_dirs(cfg, t.number), strict=True):
            got = tmp_path / f"a-{t.number}-{seed}.csv"
            download_artifact(artifact_store=store, file_path=str(got), artifact_id=ids[str(seed)])
            pd.testing.assert_frame_equal(pd.read_csv(got), pd.read_csv(d / "front.csv"))


def test_best_hv_history_spans_the_seeds(seeded, tmp_path):
    _, _, study = seeded
    hv = best_hv_info(study)
    assert list(hv["seed"].unique()) == [5, 6, 7]
    assert hv["n_evals"].is_monotonic_increasing
    assert hv["hv"].iloc[-1] == pytest.approx(study.best_value)
    assert hv.groupby("seed")["seed_hv"].last().to_list() == pytest.approx(
        study.best_trial.user_attrs["hv_per_seed"]
    )
    written = write_report(study, tmp_path / "report", budget=BUDGET, report_steps=STEPS)
    assert written["best_hv"].stat().st_size > 10_000


def test_another_seed_count_is_refused(tmp_path, fake_search_patch):
    run_study(seeded_study(tmp_path, n_trials=1), progress=False)
    changed = seeded_study(
        tmp_path, n_trials=2, budget={"evaluations": BUDGET, "report_steps": STEPS, "seeds": 2}
    )
    with pytest.raises(ConfigError, match="run with seeds 3, this file says 2") as err:
        run_study(changed, progress=False)
    assert err.value.field == "budget.seeds"


def test_a_study_stored_before_seeds_counts_as_one_seed(tmp_path, fake_search_patch):
    """A study stored without the seeds attribute ran one seed per trial: it continues with
    budget.seeds = 1 and is refused with more."""
    one = seeded_study(
        tmp_path, n_trials=2, budget={"evaluations": BUDGET, "report_steps": STEPS, "seeds": 1}
    )
    one.out_dir.parent.mkdir(parents=True)
    old = optuna.create_study(study_name=one.name, storage=one.storage_url, direction="maximize")
    old.set_user_attr("problem", load_problem(DIGITS).name)
    old.set_user_attr("budget", BUDGET)
    assert run_study(one, progress=False).user_attrs["seeds"] == 1
    with pytest.raises(ConfigError, match="seeds 1, this file says 3") as err:
        run_study(seeded_study(tmp_path, n_trials=3), progress=False)
    assert err.value.field == "budget.seeds"


def test_a_retry_takes_over_the_finished_seeds(tmp_path, monkeypatch, fake_search_patch):
    """A killed worker's trial is retried (a new trial, same parameters and user attributes);
    the retry copies the seeds its predecessor finished instead of running them again, and
    reports their HV as if it had run them."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    import moecomp.tune.study as study_module

    cfg = seeded_study(tmp_path, n_trials=1, pruner={"kind": "none"})
    calls: list[int] = []
    kill = [True]

    def killed_in_the_last_seed(problem, out_dir, **kw):
        calls.append(kw["params"]["seed"])
        if kill[0] and kw["params"]["seed"] == 7:
            raise RuntimeError("the worker was killed")
        return fake_search(problem, out_dir, **kw)

    monkeypatch.setattr(study_module, "run_search", killed_in_the_last_seed)
    with pytest.raises(RuntimeError, match="killed"):
        run_study(cfg, progress=False)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    (failed,) = study.trials
    assert failed.state == TrialState.FAIL and len(failed.user_attrs["hv_per_seed"]) == 2
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        RetryHeartbeatStaleTrialCallback(max_retry=1)(study, failed)  # as for a stale trial

    calls.clear()
    kill[0] = False
    study = run_study(cfg, n_trials=1, progress=False)
    assert calls == [7], "only the seed the killed trial did not finish runs"
    retry = study.trials[1]
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params
    dirs = seed_dirs(cfg, retry.number)
    finals = [pd.read_csv(d / "hv.csv")["hv"].iloc[-1] for d in dirs]
    assert retry.user_attrs["hv_per_seed"] == pytest.approx(finals)
    assert finals[:2] == pytest.approx(failed.user_attrs["hv_per_seed"])
    assert retry.value == pytest.approx(sum(finals) / SEEDS)
    assert dict(retry.intermediate_values) == pytest.approx(expected_reports(dirs))
    assert sorted(retry.intermediate_values) == list(range(1, STEPS * SEEDS + 1))


def test_a_finished_search_is_reused_only_with_the_same_settings(tmp_path):
    from moecomp.tune.study import finished_search, search_fields

    problem = load_problem(DIGITS)
    fields = {**search_fields(problem), "crossover_prob": 0.4, "seed": 3}
    fake_search(problem, tmp_path / "run", budget=BUDGET, params=fields)
    assert finished_search(tmp_path / "run", fields, budget=BUDGET)["status"] == "done"
    assert finished_search(tmp_path / "run", fields, budget=2 * BUDGET) is None
    assert finished_search(tmp_path / "run", {**fields, "seed": 4}, budget=BUDGET) is None
    assert finished_search(tmp_path / "nothing", fields, budget=BUDGET) is None


# --- the real search on digits ------------------------------------------------------------


def test_digits_trials_and_holdout_read_back(tmp_path, digits_ready):
    """Real searches (tiny): a trial's value is the mean of its seed folders' search.json
    HVs; the held-out runs are cached (a second call leaves their folders untouched)."""
    from moecomp.tune.holdout import run_holdout

    cfg = load_study_config(
        write_study(
            tmp_path / "digits.toml",
            name="digits",
            n_trials=2,
            budget={"evaluations": 40, "report_steps": 2, "seeds": 2, "seed": 0},
            holdout={"seeds": [7]},
            sampler={"kind": "random", "seed": 0},
            pruner={"kind": "none"},
            space={"pop_size": {"choices": [8, 12]}},
        )
    )
    study = run_study(cfg, progress=False)
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        status = [
            json.loads((cfg.out_dir / f"trial-{t.number}" / f"seed-{s}" / "search.json")
                       .read_text())
            for s in (0, 1)
        ]
        assert [s["seed"] for s in status] == [0, 1]
        assert all(s["status"] == "done" and s["n_evals"] >= 40 for s in status)
        assert t.user_attrs["hv_per_seed"] == pytest.approx([s["hv"] for s in status])
        assert t.value == pytest.approx((status[0]["hv"] + status[1]["hv"]) / 2)
        assert sorted(t.intermediate_values) == [1, 2, 3, 4]
    held = run_holdout(cfg, study, progress=False)
    assert held.ran == 2
    folders = {r.params_set: cfg.out_dir / "holdout" / f"{r.params_set}-seed-7"
               for r in held.rows.itertuples()}
    for r in held.rows.itertuples():
        assert r.hv == pytest.approx(
            json.loads((folders[r.params_set] / "search.json").read_text())["hv"]
        )
    mtimes = {k: (f / "search.json").stat().st_mtime_ns for k, f in folders.items()}
    assert run_holdout(cfg, study, progress=False).ran == 0
    assert {k: (f / "search.json").stat().st_mtime_ns for k, f in folders.items()} == mtimes
