"""The search driver on the digits problem: budget, HV (pymoo as oracle), run folder,
refusals, algorithms, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from moecomp.errors import ConfigError, RunError
from moecomp.search import CompressionProblem, run_search
from moecomp.search.problem import layer_genes

OBJ = ["density", "bits", "divergence"]
# Observed: seed 0, budget 400, pop 32, DE operators (mutation_strength 25), NSGA-II on
# digits-mlp: HV 0.6709 (2026-11-22; seeds 1 and 2 gave 0.6754 and 0.6801). The threshold
# sits 10 % below.
HV_400_OBSERVED = 0.6709
HV_400_THRESHOLD = 0.9 * HV_400_OBSERVED


def fresh(digits_problem, digits_target, digits_evaluator, **search):
    cfg = digits_problem.replace("search", **search) if search else digits_problem
    return CompressionProblem(cfg, digits_evaluator, layer_genes(cfg, digits_target))


@pytest.fixture(scope="module")
def run400(tmp_path_factory, digits_problem, digits_target, digits_evaluator):
    out = tmp_path_factory.mktemp("search") / "run400"
    p = fresh(digits_problem, digits_target, digits_evaluator)
    result = run_search(p, out, budget=400, progress=False, params={"seed": 0})
    return result, out


def pymoo_hv(F: np.ndarray, ref) -> float:
    return float(HV(ref_point=np.ones(len(ref)))(F / np.asarray(ref)))


def test_budget_is_exact_and_every_evaluation_is_listed(run400):
    result, out = run400
    assert result.n_evals == 400 and result.status == "done"
    ev = pd.read_csv(out / "evaluated.csv")
    status = json.loads((out / "search.json").read_text())
    assert status["status"] == "done" and status["n_evals"] == 400
    assert ev["id"].tolist() == list(range(status["n_full"]))
    # the surrogate's ladder probes ran at low fidelity: screened.csv, never evaluated.csv
    sc = pd.read_csv(out / "screened.csv")
    assert (sc["gen"][sc["kind"] == "ladder"] == 0).all() and ev["gen"].min() == 1
    n_low = int(np.isfinite(sc["low_divergence"]).sum())
    assert status["n_low"] == n_low and status["low_samples"] == 64
    assert status["n_full"] + -(-n_low * 64 // 512) == 400  # samples forwarded, rounded up
    assert (out / "problem.json").is_file() and (out / "checkpoint.safetensors").is_file()
    assert (out / "plots" / "front.png").stat().st_size > 0
    assert (out / "plots" / "hv.png").stat().st_size > 0


def test_plain_search_probes_in_full_and_lists_every_evaluation(
    tmp_path, digits_problem, digits_target, digits_evaluator
):
    p = fresh(digits_problem, digits_target, digits_evaluator)
    r = run_search(p, tmp_path / "run", budget=120, progress=False, plots=False,
                   params={"surrogate": False})
    ev = r.evaluated()
    assert r.n_evals == 120 and ev["id"].tolist() == list(range(120))
    assert (ev["gen"] == 0).sum() == 7  # the sensitivity probes, 2L + 1
    assert not (tmp_path / "run" / "screened.csv").exists()


def test_seeded_search_reaches_the_observed_hypervolume(run400):
    result, _ = run400
    assert result.hv >= HV_400_THRESHOLD, result.hv


def test_final_hv_equals_pymoo_hv_of_front_csv(run400, digits_problem):
    result, out = run400
    ref = digits_problem.objectives.ref_point
    front = pd.read_csv(out / "front.csv")
    assert result.hv == pytest.approx(pymoo_hv(front[OBJ].to_numpy(), ref), rel=1e-12)
    hv = pd.read_csv(out / "hv.csv")
    assert hv["hv"].iloc[-1] == pytest.approx(result.hv, rel=1e-12)
    assert hv["n_evals"].iloc[-1] == 400
    assert np.all(np.diff(hv["hv"]) >= -1e-12)  # the front of all points only improves


def test_front_is_the_non_dominated_subset_of_evaluated(run400):
    _, out = run400
    ev = pd.read_csv(out / "evaluated.csv")
    front = pd.read_csv(out / "front.csv")
    nd = NonDominatedSorting().do(ev[OBJ].to_numpy(), only_non_dominated_front=True)
    genes = [c for c in ev.columns if c.startswith(("s:", "b:"))]
    want = {tuple(r) for r in ev.iloc[nd][genes].to_numpy()}
    assert {tuple(r) for r in front[genes].to_numpy()} == want
    assert len(front) == len(want)  # one row per distinct solution
    assert set(front.columns) == set(ev.columns)


def test_refuses_to_overwrite_a_run(run400, digits_problem, digits_target, digits_evaluator):
    _, out = run400
    before = (out / "evaluated.csv").read_bytes()
    p = fresh(digits_problem, digits_target, digits_evaluator)
    with pytest.raises(RunError, match="already holds a done search run"):
        run_search(p, out, budget=50, progress=False)
    with pytest.raises(RunError, match="another problem config.*search.seed: 0 -> 1"):
        run_search(p, out, budget=400, progress=False, resume=True, params={"seed": 1})
    assert (out / "evaluated.csv").read_bytes() == before


class _Payload:
    """A pickle that, if it were ever unpickled, would create a file."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_refuses_foreign_legacy_and_incomplete_checkpoints(
    tmp_path, run400, digits_problem, digits_target, digits_evaluator
):
    import pickle

    from safetensors import safe_open
    from safetensors.numpy import save_file

    _, out = run400
    marker = tmp_path / "pwned"
    p = fresh(digits_problem, digits_target, digits_evaluator)
    kw = {"budget": 400, "progress": False, "resume": True, "params": {"seed": 0}}

    def copy_of_run(name):
        run = tmp_path / name
        run.mkdir()
        for f in ("problem.json", "search.json", "evaluated.csv", "front.csv", "hv.csv"):
            (run / f).write_bytes((out / f).read_bytes())
        return run

    run = copy_of_run("forged")  # a pickle under the checkpoint's name
    (run / "checkpoint.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(RunError, match="not a moecomp search checkpoint"):
        run_search(p, run, **kw)

    run = copy_of_run("legacy")  # what moecomp 0.1 wrote: refused, and nothing removed
    (run / "checkpoint.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(RunError, match="checkpoint.pkl, a checkpoint of an older moecomp"):
        run_search(p, run, **kw)
    assert (run / "evaluated.csv").read_bytes() == (out / "evaluated.csv").read_bytes()
    assert not marker.exists()

    run = copy_of_run("incomplete")  # a real checkpoint without its archive's genes
    with safe_open(str(out / "checkpoint.safetensors"), framework="numpy") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys() if k != "archive.X"}  # noqa: SIM118
        meta = f.metadata()
    save_file(arrays, str(run / "checkpoint.safetensors"), metadata=meta)
    with pytest.raises(RunError, match="checkpoint lacks array 'archive.X'"):
        run_search(p, run, **kw)

    run = copy_of_run("unknown-kind")  # a screened row of a kind no search writes
    with safe_open(str(out / "checkpoint.safetensors"), framework="numpy") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    assert len(arrays["screen.kind"]) > 0
    arrays["screen.kind"] = arrays["screen.kind"].copy()
    arrays["screen.kind"][0] = 9
    save_file(arrays, str(run / "checkpoint.safetensors"), metadata=meta)
    with pytest.raises(RunError, match="'screen.kind' holds 9"):
        run_search(p, run, **kw)

    run = copy_of_run("bad-anchor")  # a search.local anchor outside the gene bounds
    arrays["screen.kind"][0] = 1
    arrays["local.anchors"] = np.full((1, p.n_var), 10_000, np.int64)
    arrays["local.done"] = np.zeros(1, np.uint8)
    save_file(arrays, str(run / "checkpoint.safetensors"), metadata=meta)
    with pytest.raises(RunError, match="'local.anchors' holds genes outside"):
        run_search(p, run, **kw)


def test_other_files_are_not_overwritten(tmp_path, digits_problem, digits_target, digits_evaluator):
    (tmp_path / "notes.txt").write_text("mine")
    p = fresh(digits_problem, digits_target, digits_evaluator)
    with pytest.raises(RunError, match="other files"):
        run_search(p, tmp_path, budget=20, progress=False)


@pytest.mark.parametrize(
    ("algorithm", "operators"),
    [
        ("nsga3", "de"),
        ("spea2", "de"),
        ("moead", "de"),
        ("nsga2", "default"),
    ],
)
def test_algorithms_and_operators(
    tmp_path, algorithm, operators, digits_problem, digits_target, digits_evaluator
):
    p = fresh(digits_problem, digits_target, digits_evaluator)
    r = run_search(
        p,
        tmp_path / "run",
        budget=45,
        algorithm=algorithm,
        progress=False,
        params={"pop_size": 10, "operators": operators},
        plots=False,
    )
    assert r.n_evals == 45 and r.hv > 0.0
    ev = pd.read_csv(tmp_path / "run" / "evaluated.csv")
    assert len(ev) == json.loads((tmp_path / "run" / "search.json").read_text())["n_full"]
    assert (ev.filter(like="b:") >= 1).all().all() and (ev.filter(like="s:") <= 0.98).all().all()


def test_age_needs_numba(tmp_path, digits_problem, digits_target, digits_evaluator):
    p = fresh(digits_problem, digits_target, digits_evaluator)
    try:
        import numba  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="numba"):
            run_search(p, tmp_path / "run", budget=30, algorithm="age", progress=False)
    else:
        r = run_search(
            p,
            tmp_path / "run",
            budget=30,
            algorithm="age",
            progress=False,
            params={"pop_size": 10},
            plots=False,
        )
        assert r.n_evals == 30


def test_constraints_keep_the_front_feasible(
    tmp_path, digits_problem, digits_target, digits_evaluator
):
    cfg = digits_problem.replace("objectives", max_divergence=0.05)
    p = CompressionProblem(cfg, digits_evaluator, layer_genes(cfg, digits_target))
    r = run_search(
        p, tmp_path / "run", budget=60, progress=False, params={"pop_size": 12}, plots=False
    )
    assert (r.front["divergence"] <= 0.05).all() and r.front["feasible"].all()
    ev = r.evaluated()
    assert (~ev["feasible"]).any()  # the probes and extremes include infeasible points


def test_shared_codebook_search(tmp_path, make_problem):
    p = make_problem(search={"problem": "shared"}, genes={"shared_k_max": 64})
    r = run_search(
        p, tmp_path / "run", budget=24, progress=False, params={"pop_size": 8}, plots=False
    )
    assert r.n_evals == 24 and r.hv > 0
    ev = r.evaluated()
    assert ev["shared_k"].between(2, 64).all()
    from moecomp.runs import RunFolder

    plan = RunFolder(tmp_path / "run").plan(int(r.front["id"].iloc[0]))
    assert plan.shared_k == int(r.front["shared_k"].iloc[0])


@pytest.mark.parametrize("algorithm, directed_by, reallocate, local",
                         [("nsga2", "ranks", 0, 0), ("nsga3", "ranks", 0, 0),
                          ("moead", "ranks", 0, 0), ("nsga2", "tables", 0, 0),
                          ("nsga3", "ranks", 6, 0), ("nsga2", "ranks", 0, 8)])
def test_on_generation_stops_the_search_and_resume_continues(
    tmp_path, algorithm, directed_by, reallocate, local, digits_problem, digits_target,
    digits_evaluator
):
    seen = []

    class Stop(Exception):
        pass

    def hook(gen, n_evals, hv):
        seen.append((gen, n_evals, hv))
        if gen == 2:
            raise Stop

    out = tmp_path / "run"
    kw = {
        "budget": 60,
        "progress": False,
        "params": {"pop_size": 12, "directed_by": directed_by, "reallocate": reallocate,
                   "local": local},
        "algorithm": algorithm,
        "plots": False,
    }
    with pytest.raises(Stop):
        run_search(
            fresh(digits_problem, digits_target, digits_evaluator), out, on_generation=hook, **kw
        )
    assert [s[0] for s in seen] == [1, 2] and seen[0][1] < seen[1][1]
    assert json.loads((out / "search.json").read_text())["status"] == "interrupted"
    resumed = run_search(
        fresh(digits_problem, digits_target, digits_evaluator), out, resume=True, **kw
    )
    whole = run_search(
        fresh(digits_problem, digits_target, digits_evaluator), tmp_path / "whole", **kw
    )
    assert resumed.n_evals == whole.n_evals == 60
    pd.testing.assert_frame_equal(resumed.front, whole.front)


def test_a_sigterm_that_lands_inside_an_import_is_still_the_signal(
    tmp_path, digits_problem, digits_target, digits_evaluator
):
    """SIGTERM during a module's initialisation (matplotlib's, at the first plot) reaches
    the search as ``ImportError: initialization failed`` raised from Terminated: the run
    says it was terminated, and ``sigterm_raises`` hands the command the Terminated."""
    from moecomp.search.run import Terminated, sigterm_raises, terminated_in

    def landed_in_an_import(gen, n_evals, hv):
        try:
            raise Terminated("SIGTERM")
        except Terminated as t:
            raise ImportError("initialization failed") from t

    out = tmp_path / "run"
    with pytest.raises(Terminated), sigterm_raises():
        run_search(fresh(digits_problem, digits_target, digits_evaluator), out, budget=60,
                   progress=False, params={"pop_size": 12}, plots=False,
                   on_generation=landed_in_an_import)
    status = json.loads((out / "search.json").read_text())
    assert status["status"] == "interrupted" and status["error"] == "Terminated: SIGTERM"
    # an error of its own is left as it is
    with pytest.raises(ValueError), sigterm_raises():
        raise ValueError("not a signal")
    assert terminated_in(ValueError("x")) is None


def test_a_spent_time_budget_stops_before_the_next_generation_and_resume_finishes(
    tmp_path, digits_problem, digits_target, digits_evaluator
):
    kw = {"budget": 48, "progress": False, "params": {"pop_size": 12}, "plots": False}
    out = tmp_path / "run"
    # a budget spent during the set-up (ranks, probes): no generation starts
    cut = run_search(fresh(digits_problem, digits_target, digits_evaluator), out,
                     time_budget=1e-9, **kw)
    assert cut.status == "time budget" and cut.n_gen == 0 and cut.n_evals < 48
    assert json.loads((out / "search.json").read_text())["status"] == "time budget"
    resumed = run_search(fresh(digits_problem, digits_target, digits_evaluator), out,
                         resume=True, **kw)
    whole = run_search(fresh(digits_problem, digits_target, digits_evaluator),
                       tmp_path / "whole", **kw)
    assert resumed.status == whole.status == "done" and resumed.n_evals == 48
    pd.testing.assert_frame_equal(resumed.front, whole.front)
    with pytest.raises(ConfigError, match="time_budget"):
        run_search(digits_problem, tmp_path / "bad", time_budget=0.0, **kw)


# A search in a child process that stops at a chosen point and says so on stdout, where the
# test signals it: no timing decides where the signal lands. ``after``: checkpoints written
# before the stop (probes, set-up, then one per generation).
STOP_SCRIPT = """
import signal, sys, time
from pathlib import Path
# A test run started in the background of a non-interactive shell (``cmd &``: nohup, CI
# wrappers) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
# the parent's SIGINT would be lost and the child wait forever (seen: a fresh-clone run
# launched as ``(bash scripts/test.sh &)``). The child is the user's terminal session here.
signal.signal(signal.SIGINT, signal.default_int_handler)
import moecomp.search.run as run_mod
from moecomp.search.runner import LocalRunner

problem, out, budget, algorithm, stop_at, after = sys.argv[1:7]
after = int(after)
saved = [0]
real_save = run_mod.save_checkpoint


def stop():
    print("stopped", flush=True)
    # Wait for the parent's signal. Not signal.pause(): a signal that lands after the
    # interpreter's last check for pending signals and before pause() blocks is handled by
    # nothing, and pause() then waits forever (seen under load). Each pass of this loop checks
    # for pending signals, so the handler (KeyboardInterrupt, Terminated) runs in <= 50 ms.
    while True:
        time.sleep(0.05)


def save(path, doc, arrays, *, fp):
    if saved[0] == after and stop_at == "before_checkpoint":
        stop()
    if saved[0] == after and stop_at == "mid_checkpoint":  # half a temporary file written
        whole = path.parent.parent / "whole-checkpoint"
        real_save(whole, doc, arrays, fp=fp)
        blob = whole.read_bytes()
        path.with_name(path.name + ".tmp").write_bytes(blob[: len(blob) // 2])
        stop()
    saved[0] += 1
    real_save(path, doc, arrays, fp=fp)


class Runner(LocalRunner):
    def map_chunks(self, fn, chunks):
        if stop_at == "evaluation" and saved[0] == after:
            stop()
        return super().map_chunks(fn, chunks)


run_mod.save_checkpoint = save
with run_mod.sigterm_raises():
    run_mod.run_search(problem, out, budget=int(budget), algorithm=algorithm, runner=Runner(),
                       progress=False, params=PARAMS, plots=False)
"""
KILL_PARAMS = {"pop_size": 12, "seed": 11}
KILL_BUDGET = 120  # ~10 generations; the stop comes in the third


def child_env(repo) -> dict[str, str]:
    """The environment of a child Python that imports this checkout's moecomp."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.parametrize(
    ("algorithm", "stop_at", "sig"),
    [
        # every algorithm, every place a stop can land, every signal, in 5 runs
        ("nsga2", "evaluation", signal.SIGKILL),
        ("nsga2", "before_checkpoint", signal.SIGKILL),  # csv files ahead of the checkpoint
        ("moead", "mid_checkpoint", signal.SIGKILL),  # half a temporary checkpoint left
        ("spea2", "evaluation", signal.SIGTERM),
        ("nsga3", "before_checkpoint", signal.SIGINT),
    ],
)
def test_resume_after_a_signal_gives_the_uninterrupted_front(
    tmp_path, repo, algorithm, stop_at, sig, digits_problem, digits_target, digits_evaluator
):
    out = tmp_path / "run" / "stopped"
    script = tmp_path / "search.py"
    script.write_text(STOP_SCRIPT.replace("PARAMS", repr(KILL_PARAMS)))
    problem_file = str(repo / "problems" / "digits-mlp.toml")
    args = [problem_file, str(out), str(KILL_BUDGET), algorithm, stop_at, "4"]
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=repo,
        env=child_env(repo),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "stopped\n", "the search ended before its stop"
        os.kill(proc.pid, sig)
    finally:
        proc.wait(timeout=120)
    status = json.loads((out / "search.json").read_text())
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert status["status"] == "running"  # nothing can write after a SIGKILL
    else:
        assert proc.returncode != 0
        assert status["status"] == "interrupted"
        want = "Terminated: SIGTERM" if sig == signal.SIGTERM else "KeyboardInterrupt"
        assert status["error"].startswith(want)
    killed_at = len(pd.read_csv(out / "evaluated.csv"))
    assert killed_at < KILL_BUDGET

    resumed = run_search(
        problem_file,
        out,
        budget=KILL_BUDGET,
        algorithm=algorithm,
        resume=True,
        progress=False,
        params=KILL_PARAMS,
        plots=False,
    )
    whole = run_search(
        fresh(digits_problem, digits_target, digits_evaluator, **KILL_PARAMS),
        tmp_path / "whole",
        budget=KILL_BUDGET,
        algorithm=algorithm,
        progress=False,
        plots=False,
    )
    assert resumed.n_evals == whole.n_evals == KILL_BUDGET
    assert json.loads((out / "search.json").read_text())["status"] == "done"
    for name in ("front.csv", "evaluated.csv", "screened.csv"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    a = pd.read_csv(out / "hv.csv")
    b = pd.read_csv(tmp_path / "whole" / "hv.csv")
    pd.testing.assert_frame_equal(a.drop(columns="elapsed_s"), b.drop(columns="elapsed_s"))


def test_overrides_of_one_run_do_not_leak_into_the_next(tmp_path, make_problem, digits_problem):
    p = make_problem()
    run_search(
        p,
        tmp_path / "a",
        budget=20,
        progress=False,
        plots=False,
        params={"directed_strength": 0.0, "pop_size": 8},
    )
    run_search(p, tmp_path / "b", budget=20, progress=False, plots=False)
    stored = json.loads((tmp_path / "b" / "problem.json").read_text())["search"]
    own = digits_problem.search  # the problem file's, not the earlier run's overrides
    assert (stored["directed_strength"], stored["pop_size"]) == (own.directed_strength,
                                                                 own.pop_size)
    assert own.directed_strength != 0.0 and own.pop_size != 8
