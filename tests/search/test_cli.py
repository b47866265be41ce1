"""`moecomp search` on the command line."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from moecomp.cli import app
from moecomp.cli.search import read_params
from moecomp.errors import ConfigError, RunError


def test_search_command_writes_a_run_and_reports(tmp_path, repo, digits_target):
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"search": {"mutation_prob": 0.5, "directed_strength": 0.9}}))
    out = tmp_path / "run"
    args = [
        "search",
        str(repo / "problems" / "digits-mlp.toml"),
        "--budget",
        "30",
        "--out",
        str(out),
        "--seed",
        "2",
        "--pop-size",
        "8",
        "--params-from",
        str(params),
        "--no-progress",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "30 evaluations" in res.output and "final hypervolume" in res.output
    assert str(out) in res.output
    stored = json.loads((out / "problem.json").read_text())["search"]
    assert stored["seed"] == 2 and stored["pop_size"] == 8 and stored["budget"] == 30
    assert stored["mutation_prob"] == 0.5 and stored["directed_strength"] == 0.9
    assert len(pd.read_csv(out / "evaluated.csv")) == 30
    # the same --out again, without --resume, is refused
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and isinstance(again.exception, RunError)


def test_bad_options_name_the_field(tmp_path, repo):
    res = CliRunner().invoke(
        app,
        [
            "search",
            str(repo / "problems" / "digits-mlp.toml"),
            "--algorithm",
            "cmaes",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert isinstance(res.exception, ConfigError) and "--algorithm" in str(res.exception)
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"no_such_setting": 1}))
    res = CliRunner().invoke(
        app,
        [
            "search",
            str(repo / "problems" / "digits-mlp.toml"),
            "--params-from",
            str(bad),
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert isinstance(res.exception, ConfigError)
    assert "search.no_such_setting" in str(res.exception)


def test_read_params_shapes(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"pop_size": 12}))
    assert read_params(p) == {"pop_size": 12}
    p.write_text(json.dumps({"params": {"pop_size": 14}}))
    assert read_params(p) == {"pop_size": 14}
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        read_params(p)
    with pytest.raises(ConfigError, match="no such file"):
        read_params(tmp_path / "missing.json")
