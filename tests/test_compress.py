"""compress: from a drop budget to the smallest file, on digits at a tiny budget: the command
writes compress.json, the chosen file decodes and is within the budget on validation, the test
drop is what the decoded file gives, and a stopped compress continues without redoing the
candidates it finished."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest

from moecomp.codec import read_mcz
from moecomp.compress import NoCandidateWithinBudget, _Strategy, compress, ratio_bins
from moecomp.errors import ConfigError
from moecomp.metric import Metric
from moecomp.solution import RunContext, student_model

BUDGET = 160  # search evaluations: a few seconds on digits


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, repo):
    """`moecomp compress` through the CLI: searches digits into OUT, then refines."""
    import sys

    from moecomp.cli import main

    out = tmp_path_factory.mktemp("compress") / "digits"
    argv = sys.argv
    sys.argv = ["moecomp", "compress", str(repo / "problems" / "digits-mlp.toml"),
                "--max-drop", "1.0", "--budget", str(BUDGET), "--out", str(out),
                "--candidates", "5", "--calibration", "256", "--no-progress"]
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        sys.argv = argv
    assert e.value.code in (0, None)
    return out


def test_compress_writes_the_smallest_file_within_the_budget(compressed, digits_target):
    info = json.loads((compressed / "compress.json").read_text())
    assert info["status"] == "done" and info["split"] == "validation"
    assert info["measure"] == "metric_drop" and info["limit"] == 1.0
    for key in ("file", "bytes", "ratio", "val_drop", "test_drop", "candidates"):
        assert key in info, key
    # the chosen file: real, decodes, and its validation drop is within the budget
    path = compressed / info["file"].split("/")[-1]
    assert path.is_file() and path.stat().st_size == info["bytes"]
    decoded = read_mcz(path)
    model = student_model(digits_target.teacher, {
        k: v.to(digits_target.state_dict()[k].dtype) for k, v in decoded.state_dict.items()})
    val = digits_target.fidelity(model, "validation")
    test = digits_target.fidelity(model, "test")
    assert val.metric_drop == pytest.approx(info["val_drop"]) and val.metric_drop <= 1.0
    assert test.metric_drop == pytest.approx(info["test_drop"])
    assert info["ratio"] == pytest.approx(4 * digits_target.n_params / info["bytes"])
    # every candidate tried is in the table; the chosen one is the smallest within the budget
    table = pd.DataFrame(info["candidates"])
    assert len(table) <= 5 and {"search_id", "steps", "bytes", "ratio", "val_drop",
                                "test_drop", "within"} <= set(table.columns)
    assert table["stage"].iloc[0] == "plain"
    within = table[table["within"]]
    assert (within["val_drop"] <= 1.0).all() and (table[~table["within"]]["val_drop"] > 1.0).all()
    chosen = within.sort_values("bytes").iloc[0]
    assert info["solution"] == chosen["key"] and info["search_id"] == chosen["search_id"]
    csv = pd.read_csv(compressed / "candidates.csv")
    assert csv["candidate"].tolist() == table["candidate"].tolist()
    # a merged candidate's steps start with those of the candidate it merged (its lineage)
    steps = dict(zip(table["key"], table["steps"], strict=True))
    for _, row in table[table["stage"] == "merge"].iterrows():
        before = steps[row["parent"]]
        assert before == "none" or row["steps"].startswith(before + " | ")


def test_compress_continues_where_it_stopped(compressed, digits_target, tmp_path, monkeypatch):
    import moecomp.refine as refine_mod

    ctx = RunContext(compressed, target=digits_target)
    out = tmp_path / "again"
    calls: list[str] = []
    stop_at = [3]
    real = refine_mod.refine

    def stopping(run, solution, **kw):
        calls.append(str(solution))
        if len(calls) == stop_at[0]:
            stop_at[0] = 0
            raise KeyboardInterrupt  # killed while refining the third candidate
        return real(run, solution, **kw)

    monkeypatch.setattr(refine_mod, "refine", stopping)
    settings = dict(run=ctx, out=out, max_drop=1.0, candidates=6, calibration=256,
                    progress=False)
    with pytest.raises(KeyboardInterrupt):
        compress(**settings)
    done = pd.read_csv(out / "candidates.csv")
    assert len(done) == 2
    assert json.loads((out / "compress.json").read_text())["status"] == "interrupted"

    calls.clear()
    result = compress(**settings)
    # the two finished candidates are read back, not refined again
    table = result.candidates
    assert table["candidate"].tolist()[:2] == done["candidate"].tolist()
    assert table["resumed"].tolist()[:2] == [True, True]
    assert len(calls) == len(table) - 2
    assert result.val_drop <= 1.0 and result.file.is_file()

    # a larger budget reuses every refined candidate (only "within" changes)
    calls.clear()
    looser = compress(**{**settings, "max_drop": 3.0, "candidates": 2})
    assert looser.candidates["stage"].iloc[0] == "plain"
    assert looser.ratio >= 1.0 and looser.val_drop <= 3.0


def test_compress_with_confidence_chooses_within_the_bound(compressed, digits_target,
                                                          tmp_path):
    from statistics import NormalDist

    ctx = RunContext(compressed, target=digits_target)
    out = tmp_path / "c90"
    # digits' validation split is small (359 images): its standard errors are large
    settings = dict(run=ctx, out=out, max_drop=5.0, candidates=5, calibration=256,
                    progress=False)
    compress(**settings)
    # candidates recorded before compress kept standard errors: theirs are measured again
    old = pd.read_csv(out / "candidates.csv")
    old.drop(columns=["val_se", "test_se", "val_bound"]).to_csv(out / "candidates.csv",
                                                                 index=False)
    result = compress(**settings, confidence=0.9)
    z = NormalDist().inv_cdf(0.9)
    table = result.candidates
    assert table["resumed"].any()
    for _, row in table.iterrows():
        assert row["val_bound"] == pytest.approx(row["val_measure"] + z * row["val_se"])
        assert row["within"] == (row["val_bound"] <= 5.0)
    resumed = table[table["resumed"]].iloc[0]
    model = student_model(digits_target.teacher, digits_target.round_dense(
        ctx.solution(str(resumed["key"])).state))
    fresh = digits_target.fidelity(model, "validation")
    assert resumed["val_se"] == pytest.approx(fresh.metric_drop_se)
    assert resumed["val_se"] == pytest.approx(float(
        old.set_index("key").loc[resumed["key"], "val_se"]))
    # the chosen file: the smallest whose bound is within, and compress.json says so
    chosen = table[table["within"]].sort_values("bytes").iloc[0]
    assert result.solution == chosen["key"] and result.val_drop + z * result.val_se <= 5.0
    info = json.loads((out / "compress.json").read_text())
    assert info["confidence"] == 0.9
    assert info["val_se"] == pytest.approx(result.val_se) and result.val_se > 0
    assert info["val_bound"] == pytest.approx(result.val_drop + z * result.val_se)
    # a metric of one number per split has no bound
    scalar = copy.copy(digits_target)
    scalar.metric = Metric("agreement", "tests:agreement",
                           lambda t, s, labels: float((t.argmax(-1) == s.argmax(-1))
                                                      .double().mean() * 100), "maximize", "%")
    scalar._teacher_metric = {}
    with pytest.raises(ConfigError) as e:
        compress(run=RunContext(compressed, target=scalar), out=tmp_path / "scalar",
                 max_drop=3.0, candidates=1, progress=False, confidence=0.9)
    assert e.value.field == "confidence" and "per-sample" in str(e.value)
    with pytest.raises(ConfigError, match=r"\[0.5, 1\)"):
        compress(run=ctx, out=tmp_path / "bad", max_drop=3.0, confidence=1.0)


def test_compress_refines_every_slot_while_nothing_is_within(compressed, digits_target,
                                                             tmp_path):
    """The slots kept for merging refine while no candidate is within the budget (no merge
    could use them)."""
    out = tmp_path / "none"
    with pytest.raises(NoCandidateWithinBudget):
        compress(run=RunContext(compressed, target=digits_target), out=out,
                 max_divergence=1e-12, candidates=4, calibration=256, progress=False)
    table = pd.read_csv(out / "candidates.csv")
    assert len(table) == 4 and not table["within"].any()
    assert (table["stage"] != "merge").all()


def test_compress_errors_are_one_line(compressed, cli, one_line_error):
    code, _, err = cli("compress", "--run", str(compressed), "--no-progress")
    one_line_error(code, err, "--max-drop", "--max-divergence")
    code, _, err = cli("compress", "--run", str(compressed), "--max-drop", "1",
                       "--max-divergence", "0.1")
    one_line_error(code, err, "one budget")
    code, _, err = cli("compress", "--run", str(compressed), "--max-drop", "1",
                       "--time-budget", "0")
    one_line_error(code, err, "--time-budget")
    code, _, err = cli("compress", "--run", str(compressed), "--max-drop", "1",
                       "--confidence", "0.3")
    one_line_error(code, err, "--confidence", "[0.5, 1)")
    code, _, err = cli("compress", "--run", str(compressed / "missing"), "--max-drop", "1")
    one_line_error(code, err, "--run")
    # the Python API's parameter names are said as the command's options
    code, _, err = cli("compress", "--run", str(compressed), "--max-drop", "1", "--masks",
                       "gradual")
    one_line_error(code, err, "--masks", "--finetune-epochs > 0")
    assert "finetune_epochs" not in err
    code, _, err = cli("compress", "--run", str(compressed), "--max-drop", "1",
                       "--repair-masks")
    one_line_error(code, err, "--repair-masks", "--finetune-epochs > 0")
    code, _, err = cli("compress", "--run", str(compressed), "--max-drop", "1",
                       "--finetune-epochs", "1", "--optimizer", "rmsprop")
    one_line_error(code, err, "--optimizer", "adam, sgd")
    code, _, err = cli("compress", "--run", str(compressed), "--max-drop", "1",
                       "--optimizer", "sgd")
    one_line_error(code, err, "--optimizer", "--finetune-epochs > 0")


def test_ratio_bins_and_the_bisection_order():
    assert ratio_bins(np.array([10.0, 10.5, 11.5, 30.0]), 10.0).tolist() == [-1, 0, 1, 11]
    bins = [[1, 2], [3, 4], [5], [6, 7], [8]]
    s = _Strategy(bins)
    assert s.next({}) == 5  # the middle bin first
    assert s.next({5: True}) == 6  # within: the upper half
    assert s.next({5: True, 6: False}) == 7  # the crossing found: the next solution above it
    assert s.next({5: True, 6: False, 7: True}) == 8
    assert s.next({5: False}) == 1  # over: the lower half
    every = {i: False for ids in bins for i in ids}
    assert s.next(every) is None


def test_settings_key_tells_repaired_masks_apart():
    """A resumed compress reuses a candidate only under equal settings: the repair is part
    of the key with fine-tuning; without it the key is as it was before the option."""
    from moecomp.compress import _settings

    base = dict(measure="metric", reconstruct=False, finetune_epochs=3, lr=2e-3, seed=0,
                calibration=8192)
    assert _settings(**base, repair_masks=True) != _settings(**base)
    assert "repair" not in _settings(**base, repair_masks=False)
    assert _settings(**{**base, "finetune_epochs": 0}, repair_masks=True) == \
        _settings(**{**base, "finetune_epochs": 0})
    # the optimizer likewise: Adam's keys are those written before the option existed
    assert _settings(**base, optimizer="sgd") != _settings(**base)
    assert _settings(**base, optimizer="adam") == _settings(**base)
    assert "optimizer" not in _settings(**base)


def test_api_names_become_options_only_as_whole_words():
    """The command says the API's parameter names as its options, without rewriting the
    words inside other names or the options themselves."""
    from moecomp.cli.compress import OPTION_OF
    from moecomp.cli.finetune_options import said_as_options

    msg = "repair_masks needs finetune_epochs > 0; the masks stay; --masks gradual"
    assert said_as_options(msg, OPTION_OF) == (
        "--repair-masks needs --finetune-epochs > 0; the --masks stay; --masks gradual")
