"""Held-out seeds (fast: the fake search): the best parameters and the defaults run once per
held-out seed, cached in holdout.csv (a second call runs nothing), the best rows run again
when the best trial changes; the verdict's numbers; ``moecomp study --report`` shows both."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from tunehelpers import fake_hv, fake_search, write_study
from typer.testing import CliRunner

import moecomp.tune.holdout as holdout_module
from moecomp.config import SearchConfig
from moecomp.errors import ConfigError, RunError
from moecomp.tune import load_study_config, run_study
from moecomp.tune.holdout import compare, run_holdout
from moecomp.tune.report import holdout_info, write_report

BUDGET = 48
HELD = [10, 11, 12, 13, 14]


def small_study(tmp_path, **over):
    kw = {
        "name": "held",
        "n_trials": 3,
        "budget": {"evaluations": BUDGET, "report_steps": 2, "seeds": 2, "seed": 0},
        "holdout": {"seeds": HELD},
        "sampler": {"kind": "random", "seed": 1},
        "pruner": {"kind": "none"},
        "space": {"crossover_prob": {"low": 0.1, "high": 0.5}},
    }
    kw.update(over)
    return load_study_config(write_study(tmp_path / "study.toml", **kw))


@pytest.fixture
def counted(monkeypatch, fake_search_patch):
    """The fake search, counting the held-out runs: (params_set, seed) per call."""
    calls: list[tuple[str, int]] = []

    def counting(problem, out_dir, **kw):
        calls.append((out_dir.name.split("-seed-")[0], kw["params"]["seed"]))
        return fake_search(problem, out_dir, **kw)

    monkeypatch.setattr(holdout_module, "run_search", counting)
    return calls


def test_holdout_runs_both_sets_then_reads_the_cache(tmp_path, counted):
    cfg = small_study(tmp_path)
    study = run_study(cfg, progress=False)
    first = run_holdout(cfg, study, progress=False)
    assert first.ran == 10 and sorted(counted) == sorted(
        (s, seed) for s in ("best", "default") for seed in HELD
    )
    rows = pd.read_csv(cfg.out_dir / "holdout.csv")
    assert list(rows.columns[:5]) == ["params_set", "seed", "hv", "n_evals", "seconds"]
    assert len(rows) == 10
    best = study.best_trial.params
    for r in rows.itertuples():
        run_dir = cfg.out_dir / "holdout" / f"{r.params_set}-seed-{r.seed}"
        sent = json.loads((run_dir / "params.json").read_text())
        assert sent["seed"] == r.seed
        # the defaults: the problem file's search table as it is
        own = cfg.load_problem().search.crossover_prob
        want_cp = best["crossover_prob"] if r.params_set == "best" else own
        assert sent["crossover_prob"] == want_cp
        assert r.hv == pytest.approx(fake_hv(sent, r.n_evals, BUDGET))
    saved = json.loads((cfg.out_dir / "holdout.json").read_text())
    assert saved["seeds"] == HELD and saved["best_trial"] == study.best_trial.number
    # the problem's crossover_prob (> 0.9) beats the trials' (<= 0.5)
    assert saved["default"]["median"] > saved["best"]["median"]
    assert saved["winner"] == "default"
    assert saved["p_value"] == pytest.approx(0.0625)  # 5 seeds, all one way: 2 / 2**5
    assert saved["ratio_per_seed"] == pytest.approx(
        [b / d for b, d in zip(saved["best"]["hv"], saved["default"]["hv"], strict=True)]
    )

    counted.clear()
    again = run_holdout(cfg, study, progress=False)
    assert again.ran == 0 and counted == []  # all cached
    pd.testing.assert_frame_equal(again.rows, first.rows)

    # a better trial: only the best parameters run again, the defaults' rows are kept
    study.enqueue_trial({"crossover_prob": 0.5})
    study = run_study(cfg, n_trials=4, progress=False)
    assert study.best_trial.params == {"crossover_prob": 0.5}
    changed = run_holdout(cfg, study, progress=False)
    assert changed.ran == 5 and sorted(counted) == [("best", s) for s in HELD]
    old, new = first.rows.set_index(["params_set", "seed"]), changed.rows.set_index(
        ["params_set", "seed"]
    )
    pd.testing.assert_frame_equal(new.loc["default"], old.loc["default"])
    assert (new.loc["best"]["hv"] > old.loc["best"]["hv"]).all()
    assert set(new.loc["best"]["trial"]) == {study.best_trial.number}
    assert len(pd.read_csv(cfg.out_dir / "holdout.csv")) == 10  # the old best rows are gone


def test_an_interrupted_holdout_continues(tmp_path, counted):
    cfg = small_study(tmp_path)
    study = run_study(cfg, progress=False)

    def dies_on_the_third(problem, out_dir, **kw):
        if len(counted) == 2:
            raise KeyboardInterrupt
        counted.append((out_dir.name, kw["params"]["seed"]))
        return fake_search(problem, out_dir, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(holdout_module, "run_search", dies_on_the_third)
        with pytest.raises(KeyboardInterrupt):
            run_holdout(cfg, study, progress=False)
    assert len(pd.read_csv(cfg.out_dir / "holdout.csv")) == 2
    counted.clear()
    assert run_holdout(cfg, study, progress=False).ran == 8


@pytest.mark.parametrize(
    ("best", "default", "p", "winner", "words"),
    [
        ([2, 3, 4, 5, 6, 7], [1, 1, 1, 1, 1, 1], 2 / 64, "best", "best parameters win (Wilcoxon"),
        ([1, 1, 1, 1, 1], [2, 3, 4, 5, 6], 2 / 32, "default", "no clear winner"),
        ([1, 2, 3], [0.5, 1.5, 2.5], None, "best", "no test with fewer than 5"),
        ([1, 1, 1, 1, 1], [1, 1, 1, 1, 1], 1.0, "tie", "no clear winner"),
    ],
)
def test_compare_known_answers(best, default, p, winner, words):
    seeds = tuple(range(len(best)))
    rows = pd.DataFrame(
        [{"params_set": "best", "seed": s, "hv": v} for s, v in zip(seeds, best, strict=True)]
        + [{"params_set": "default", "seed": s, "hv": v} for s, v in zip(seeds, default,
                                                                         strict=True)]
    )
    got = compare(rows, seeds=seeds)
    assert got["p_value"] == (None if p is None else pytest.approx(p))
    assert got["winner"] == winner and words in got["verdict"]
    assert got["best"]["hv"] == best and got["best"]["median"] == pytest.approx(
        pd.Series(best).median()
    )
    assert got["ratio_per_seed"] == pytest.approx([b / d for b, d in zip(best, default,
                                                                          strict=True)])


def test_holdout_seeds_are_checked(tmp_path, fake_search_patch):
    with pytest.raises(ConfigError, match=r"\[1\] are trial seeds") as err:
        small_study(tmp_path, holdout={"seeds": [1, 20]})
    assert err.value.field == "holdout.seeds"
    # without budget.seed, the trial seeds come from the problem (seed 0): checked at run
    cfg = small_study(
        tmp_path, budget={"evaluations": BUDGET, "seeds": 2}, holdout={"seeds": [0, 20]}
    )
    with pytest.raises(ConfigError, match=r"\[0\] are trial seeds"):
        run_study(cfg, progress=False)
    # the default: the three seeds after the trial seeds
    cfg = small_study(tmp_path, holdout={})
    assert cfg.holdout_seeds(cfg.load_problem()) == (2, 3, 4)


def test_holdout_needs_a_complete_trial(tmp_path, fake_search_patch):
    import optuna

    cfg = small_study(tmp_path)
    study = optuna.create_study(direction="maximize")
    with pytest.raises(RunError, match="no COMPLETE trial"):
        run_holdout(cfg, study, progress=False)


def test_report_draws_the_holdout(tmp_path, counted):
    cfg = small_study(tmp_path)
    study = run_study(cfg, progress=False)
    held = run_holdout(cfg, study, progress=False)
    info = holdout_info(held.rows)
    assert len(info) == 10 and set(info["params_set"]) == {"best", "default"}
    written = write_report(study, tmp_path / "report", budget=BUDGET, report_steps=2,
                           holdout=held.rows)
    assert written["holdout"].stat().st_size > 10_000


def test_study_report_shows_best_and_defaults(tmp_path, counted):
    from moecomp.cli import app

    small_study(tmp_path, holdout={"seeds": [10, 11]})
    result = CliRunner().invoke(
        app, ["study", str(tmp_path / "study.toml"), "--no-progress", "--report"]
    )
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())  # rich wraps lines at the runner's 80 columns
    assert "held-out seeds 10, 11" in out
    assert "best (trial" in out and "defaults" in out
    assert "no test with fewer than 5" in out
    assert (tmp_path / "out" / "held" / "report" / "holdout.png").is_file()
    assert len(counted) == 4

    counted.clear()
    skipped = CliRunner().invoke(
        app, ["study", str(tmp_path / "study.toml"), "--no-progress", "--report", "--no-holdout"]
    )
    assert skipped.exit_code == 0, skipped.output
    assert "held-out seeds skipped" in " ".join(skipped.output.split()) and counted == []


def test_fields_of_the_default_set():
    """The defaults are every search field of the problem but seed and budget."""
    from tunehelpers import DIGITS

    from moecomp.config import load_problem
    from moecomp.tune.study import search_fields

    fields = search_fields(load_problem(DIGITS))
    assert set(fields) == set(SearchConfig.__dataclass_fields__) - {"budget"}
