"""Studies that survive their workers: several processes on one PostgreSQL study with one
killed mid-trial, and an SQLite study interrupted and run again.

What Optuna's heartbeat guarantees, and so what is asserted: a killed worker's trial stays
RUNNING until another worker starts a trial after the grace period; it is then set to FAIL
and queued again as a *new* trial (WAITING, same parameters, ``failed_trial`` and
``retry_history`` system attributes), which the next worker runs. Trial numbers stay unique
and contiguous; the COMPLETE count reaches the target (parallel workers may pass it by at
most one trial each, as with Optuna's MaxTrialsCallback).

No test waits a fixed time: the killed worker stops itself mid-trial and says so
(``tunehelpers.PAUSING_WORKER``), and the restart waits until the storage counts the killed
trial stale. The PostgreSQL test uses the README's URL form, ``postgresql://user@host/db``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
from optuna.trial import FrozenTrial, TrialState
from tunehelpers import (
    REPO,
    pausing_study_command,
    run_ok,
    study_command,
    worker_env,
    write_study,
)

from moecomp.tune.study import storage_url

# retried_trial_number and retry_history are marked experimental by Optuna
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

PG_BIN = Path("/usr/lib/postgresql/15/bin")
N_TRIALS = 8
SMALL = {
    "budget": {"evaluations": 96, "report_steps": 8, "seed": 0, "seeds": 1},
    "sampler": {"kind": "random", "seed": 0},
    "pruner": {"kind": "none"},
    "heartbeat": {"interval": 1, "grace_period": 2, "max_retry": 2},
    "space": {
        "pop_size": {"low": 8, "high": 16, "step": 8},
        "mutation_prob": {"low": 0.1, "high": 0.6},
    },
}


def wait_for(predicate, *, timeout: float, what: str, procs=(), logs=(), poll: float = 0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = predicate()
        if got:
            return got
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                raise AssertionError(
                    f"a worker exited with {p.returncode} while waiting for {what}:\n"
                    + "\n".join(tail(x) for x in logs)
                )
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def trials_of(url: str, name: str) -> list[FrozenTrial]:
    """The study's trials, [] before a worker has created it. Never creates tables itself:
    that would race with the workers creating them."""
    try:
        storage = optuna.storages.RDBStorage(storage_url(url), skip_table_creation=True)
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except (KeyError, sqlalchemy.exc.DBAPIError, optuna.exceptions.StorageInternalError):
        return []  # no study / no tables yet


def kill_paused(url: str, name: str, marker: Path, proc: subprocess.Popen[bytes],
                logs: list[Path]) -> int:
    """Wait until the pausing worker ``proc`` says (``marker``) which trial it stopped in,
    SIGKILL it there, and return that trial's number, checked to be left RUNNING by it."""
    wait_for(marker.is_file, timeout=240, what="the worker to pause mid-trial", procs=[proc],
             logs=logs)
    number = int(marker.read_text())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    trial = next(t for t in trials_of(url, name) if t.number == number)
    assert trial.state == TrialState.RUNNING and trial.intermediate_values
    assert trial.user_attrs["worker"] == f"{socket.gethostname()}:{proc.pid}"
    return number


def stale_ids(url: str) -> list[int]:
    """Trial ids the storage now counts as stale (heartbeat older than the grace period); a
    read, unlike ``fail_stale_trials``. Optuna's own query, so the same clock and rule."""
    storage = optuna.storages.RDBStorage(
        storage_url(url),
        skip_table_creation=True,
        heartbeat_interval=SMALL["heartbeat"]["interval"],
        grace_period=SMALL["heartbeat"]["grace_period"],
    )
    study_id = storage.get_study_id_from_name("lite")
    return storage._get_stale_trial_ids(study_id)


def check_numbers_and_retry(trials: list[FrozenTrial], killed: int) -> FrozenTrial:
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))), f"numbers not contiguous: {numbers}"
    left = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert not left, f"trials left RUNNING or WAITING: {left}"
    stale = trials[killed]
    assert stale.state == TrialState.FAIL, f"killed trial {killed} is {stale.state.name}"
    retries = [t for t in trials if Retry.retried_trial_number(t) == killed]
    assert len(retries) == 1, f"trial {killed} retried {len(retries)} times"
    retry = retries[0]
    assert Retry.retry_history(retry) == [killed]
    assert retry.params == stale.params
    assert retry.number > killed
    assert retry.state == TrialState.COMPLETE
    return retry


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text()[-n:] if path.is_file() else ""


# --- PostgreSQL: three workers, one killed -------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_postgres(*cmd: str) -> None:
    subprocess.run(
        ["runuser", "-u", "postgres", "--", *cmd],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def postgres_url():
    """A throw-away PostgreSQL server on 127.0.0.1 (initdb/pg_ctl as the postgres user in a
    folder it owns, trust auth, a free port, its socket inside that folder), always stopped.
    Missing binaries skip the test locally and fail it in CI."""
    for why, missing in (
        (
            f"PostgreSQL binaries missing under {PG_BIN} (Debian's postgresql package)",
            not (PG_BIN / "initdb").is_file(),
        ),
        ("needs root to run initdb as the postgres user", os.geteuid() != 0),
    ):
        if missing:
            if os.environ.get("CI"):
                pytest.fail(why)
            pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="moecomp-pg-"))  # under /tmp: postgres can reach it
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    subprocess.run(["chown", "-R", "postgres:", str(root)], check=True)
    port = free_port()
    try:
        as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
        as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-h 127.0.0.1 -p {port} -k {sock}",
            "start",
        )
        as_postgres(
            str(PG_BIN / "createdb"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "postgres",
            "moecomp",
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/moecomp"
    finally:
        if (data / "postmaster.pid").is_file():
            subprocess.run(
                [
                    "runuser",
                    "-u",
                    "postgres",
                    "--",
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(data),
                    "-m",
                    "immediate",
                    "stop",
                ],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.postgres
def test_postgres_workers_survive_a_killed_worker(tmp_path, postgres_url, digits_ready):
    # the README's form, postgresql://user@host/db, exactly as a user writes it
    assert postgres_url.startswith("postgresql://postgres@127.0.0.1:")
    study_file = write_study(tmp_path / "pg.toml", name="pg", n_trials=N_TRIALS, **SMALL)
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    marker = tmp_path / "paused"
    procs = []
    for i, log in enumerate(logs):
        extra = ("--storage", postgres_url, "--worker", str(i))
        # worker 0 stops in its first trial, after its first report, until it is killed
        cmd = pausing_study_command(study_file, marker, 0, *extra) if i == 0 else study_command(
            study_file, *extra
        )
        with open(log, "w") as out:
            procs.append(
                subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=worker_env(),
                                 cwd=REPO)
            )
    try:
        killed = kill_paused(postgres_url, "pg", marker, procs[0], logs)
        for p in procs[1:]:
            assert p.wait(timeout=240) == 0, "\n".join(tail(x) for x in logs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    study = optuna.load_study(study_name="pg", storage=storage_url(postgres_url))
    trials = study.get_trials()
    n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
    # Past the target: each of the two survivors may finish one trial it had started, and
    # the retry runs even when the target was reached without it (plus, if both survivors
    # race for the retry, the loser samples one more).
    assert N_TRIALS <= n_complete <= N_TRIALS + 3, [t.state.name for t in trials]
    check_numbers_and_retry(trials, killed)
    assert Path(study.user_attrs["best_run_dir"]).is_dir()


# --- SQLite: interrupted and run again ------------------------------------------------------


def test_sqlite_study_interrupted_and_run_again(tmp_path, digits_ready):
    study_file = write_study(tmp_path / "lite.toml", name="lite", n_trials=4, **SMALL)
    url = f"sqlite:///{tmp_path / 'out' / 'lite.db'}"
    log = tmp_path / "first.log"
    marker = tmp_path / "paused"
    with open(log, "w") as out:
        # one trial finished, the second stopped after its first report, then killed there
        proc = subprocess.Popen(
            pausing_study_command(study_file, marker, 1),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=worker_env(),
            cwd=REPO,
        )
    try:
        killed = kill_paused(url, "lite", marker, proc, [log])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = {
        t.number: (t.params, t.value)
        for t in optuna.load_study(study_name="lite", storage=url).get_trials(
            states=(TrialState.COMPLETE,)
        )
    }
    assert before, tail(log)

    # a restart once the killed trial has gone stale (waited for as the storage sees it):
    # the worker fails it and runs its retry as one of the missing trials
    killed_id = next(t._trial_id for t in trials_of(url, "lite") if t.number == killed)
    wait_for(lambda: killed_id in stale_ids(url), timeout=60, what="the killed trial to go stale")
    out = run_ok(study_command(study_file), timeout=240)
    assert "4 complete" in out.stdout, out.stdout

    trials = optuna.load_study(study_name="lite", storage=url).get_trials()
    after = {t.number: (t.params, t.value) for t in trials if t.state == TrialState.COMPLETE}
    assert len(after) == 4  # one worker: exactly the target
    assert {k: after[k] for k in before} == before  # finished trials kept as they were
    assert len(trials) == 5  # 4 COMPLETE + the killed one (FAIL)
    retry = check_numbers_and_retry(trials, killed)
    assert (tmp_path / "out" / "lite" / f"trial-{retry.number}" / "front.csv").is_file()
