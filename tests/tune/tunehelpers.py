"""Helpers of the tune tests: study files, a fake search with the real contract (for the
fast wiring tests) and worker processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "problems" / "digits-mlp.toml"


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def write_study(
    path: Path,
    *,
    name: str,
    problem: Path = DIGITS,
    n_trials: int = 6,
    budget: dict[str, Any] | None = None,
    sampler: dict[str, Any] | None = None,
    pruner: dict[str, Any] | None = None,
    heartbeat: dict[str, Any] | None = None,
    holdout: dict[str, Any] | None = None,
    space: dict[str, dict[str, Any]] | None = None,
    storage: str | None = None,
) -> Path:
    """A study TOML in ``path``'s folder (outputs go to ``<folder>/out``)."""
    lines = [f'name = "{name}"', f'problem = "{problem}"', f"n_trials = {n_trials}"]
    if storage is not None:
        lines.append(f'storage = "{storage}"')
    tables = {"budget": budget, "sampler": sampler, "pruner": pruner, "heartbeat": heartbeat,
              "holdout": holdout}
    for table, values in tables.items():
        if values:
            lines.append(f"[{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for field, spec in (space or {"pop_size": {"low": 8, "high": 16, "step": 4}}).items():
        lines.append(f"[space.{field}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in spec.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- a fake search: the contract of run_search, HV from the parameters ---------------------


@dataclass
class FakeResult:
    hv: float
    n_evals: int
    front: pd.DataFrame


def fake_hv(params: dict[str, Any], n_evals: int, budget: int) -> float:
    """HV climbs toward ``crossover_prob`` (trials with a small one are clearly worse), a
    little higher with each seed (so seeds differ; seed 0 as before seeds mattered)."""
    top = float(params.get("crossover_prob", 0.5)) * (1.0 + 0.01 * int(params.get("seed", 0)))
    return top * (1.0 - math.exp(-3.0 * n_evals / budget))


def fake_search(
    problem: Any,
    out_dir: Any,
    *,
    budget: int | None = None,
    algorithm: str | None = None,
    resume: bool = False,
    progress: bool = True,
    params: dict[str, Any] | None = None,
    on_generation: Any = None,
    runner: Any = None,
    plots: bool = True,
) -> FakeResult:
    from moecomp.runs import RunFolder
    from moecomp.search.run import resolve_config

    assert budget is not None and params is not None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(params))
    folder = RunFolder(out)
    # problem.json and search.json as a real search writes them (``problem`` is a config)
    folder.write_problem(resolve_config(problem, budget=budget, params=params))
    folder.write_status({"status": "running"})
    pop = int(params.get("pop_size", 8))
    n_evals, gen, hv_rows = 0, 0, []
    front = pd.DataFrame()
    while n_evals < budget:
        gen += 1
        n_evals += pop  # like a real search, the last generation may pass the budget
        hv = fake_hv(params, n_evals, budget)
        hv_rows.append({"gen": gen, "n_evals": n_evals, "hv": hv, "elapsed_s": 0.01 * gen})
        pd.DataFrame(hv_rows).to_csv(out / "hv.csv", index=False)
        front = pd.DataFrame(
            {
                "id": [gen, gen + 1000],
                "density": [0.5, 0.2],
                "bits": [4.0, 2.0],
                "divergence": [0.01, hv],
            }
        )
        front.to_csv(out / "front.csv", index=False)
        if on_generation is not None:
            on_generation(gen, n_evals, hv)
    folder.write_status({"status": "done", "hv": hv_rows[-1]["hv"], "n_evals": n_evals})
    return FakeResult(hv=hv_rows[-1]["hv"], n_evals=n_evals, front=front)


def patch_fake_search(mp: Any) -> None:
    """run_search is the fake one in the study and in the held-out runs (``mp``: a
    pytest MonkeyPatch)."""
    import moecomp.tune.holdout as holdout_module
    import moecomp.tune.study as study_module

    for module in (study_module, holdout_module):
        mp.setattr(module, "run_search", fake_search)
        # the fake search needs no target, ranks or evaluator
        mp.setattr(module, "build_problem", lambda config, runner=None, device="auto": config)


def worker_env() -> dict[str, str]:
    """Environment of worker processes: the session's artifacts, no output buffering."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def study_command(study_file: Path, *extra: str) -> list[str]:
    """``moecomp study FILE --no-progress ...`` with this interpreter (the package has no
    ``__main__``, so the entry point is called directly)."""
    return [
        sys.executable,
        "-c",
        "from moecomp.cli import main; main()",
        "study",
        str(study_file),
        "--no-progress",
        *extra,
    ]


# A worker that stops mid-trial at a chosen point and says so, so that a test kills it there
# and nowhere else: right after its ``pause_at``-th trial (0-based, counting this process's
# trials) stored its first HV report, it writes the trial's number to ``marker`` (atomically)
# and waits for its end. No timing decides where the kill lands.
PAUSING_WORKER = """
import os, signal, sys
import optuna

marker, pause_at = sys.argv[1], int(sys.argv[2])
sys.argv = ["moecomp", *sys.argv[3:]]
seen = []
report = optuna.trial.Trial.report


def pausing_report(self, value, step):
    report(self, value, step)  # stored before the marker is written
    if self.number not in seen:
        seen.append(self.number)
    if len(seen) - 1 == pause_at:
        with open(marker + ".tmp", "w") as f:
            f.write(str(self.number))
        os.replace(marker + ".tmp", marker)
        while True:
            signal.pause()


optuna.trial.Trial.report = pausing_report
from moecomp.cli import main

main()
"""


def pausing_study_command(
    study_file: Path, marker: Path, pause_at: int, *extra: str
) -> list[str]:
    """``study_command`` in a worker that pauses mid-trial (``PAUSING_WORKER``)."""
    return [sys.executable, "-c", PAUSING_WORKER, str(marker), str(pause_at),
            "study", str(study_file), "--no-progress", *extra]


def run_ok(cmd: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=worker_env(), timeout=timeout, cwd=REPO
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc
