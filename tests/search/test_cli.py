"""`moecomp search` on the command line: options, a broken checkpoint, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

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
    status = json.loads((out / "search.json").read_text())
    assert status["n_evals"] == 30 and len(pd.read_csv(out / "evaluated.csv")) == status["n_full"]
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


def test_a_checkpoint_with_missing_keys_is_a_one_line_error(cli, one_line_error, tmp_path, repo,
                                                            digits_ranks):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    out = tmp_path / "run"
    problem = str(repo / "problems" / "digits-mlp.toml")
    common = ["--pop-size", "8", "--out", str(out), "--no-progress"]
    code, _, err = cli("search", problem, "--budget", "20", *common)
    assert code == 0, err
    ckpt = out / "checkpoint.safetensors"
    with safe_open(str(ckpt), framework="numpy") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys() if k != "hv.hv"}  # noqa: SIM118
        meta = f.metadata()
    save_file(arrays, str(ckpt), metadata=meta)
    code, _, err = cli("search", problem, "--budget", "30", "--resume",
                       *common)
    one_line_error(code, err, "checkpoint lacks array 'hv.hv'")


def test_sigterm_leaves_a_truthful_resumable_run(tmp_path, repo, digits_ranks):
    """A real ``moecomp search`` process: SIGTERM once its first generation is on disk (the
    test waits for the file, however long that takes) gives one line, exit 143, search.json
    "interrupted", and ``--resume`` continues it."""
    out = tmp_path / "run"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH")) if p)
    args = [sys.executable, "-m", "moecomp", "search", str(repo / "problems" / "digits-mlp.toml"),
            "--pop-size", "8", "--out", str(out), "--no-progress"]
    # a budget no machine finishes before the signal: the test does not race the search
    proc = subprocess.Popen([*args, "--budget", "10000000"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(out / "hv.csv", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.startswith("error: search interrupted (SIGTERM)") and "Traceback" not in err
    assert err.strip().count("\n") == 0
    status = json.loads((out / "search.json").read_text())
    assert status["status"] == "interrupted" and status["error"] == "Terminated: SIGTERM"
    from moecomp.search import run_search

    done = run_search(repo / "problems" / "digits-mlp.toml", out, budget=status["n_evals"] + 8,
                      resume=True, progress=False, params={"pop_size": 8}, plots=False)
    assert done.status == "done" and done.n_evals == status["n_evals"] + 8
    assert json.loads((out / "search.json").read_text())["status"] == "done"


def wait_for_file(path: Path, proc: subprocess.Popen[str]) -> None:
    """Block until ``path`` exists (the event), failing if ``proc`` ends first; the short
    poll only paces the check, the outcome does not depend on it."""
    import time

    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
