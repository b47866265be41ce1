"""The whole path on the embedded default (scikit-learn digits, a 17k-parameter MLP):
train the teacher, search, pick on validation, refine (each step kept only if validation does
not get worse), export, decode and verify, the same in one command (``compress``), compare
with the single-objective DE baseline, and write the report. A minute or two on 2 cores."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from moecomp.config import ProblemConfig, load_problem
from moecomp.errors import ConfigError

DEMO_BUDGET = 4000  # evaluations: ~30 s of search on 2 cores, a well-spread front
DEMO_DROP = 1.0  # the demo's budget: accuracy points lost on validation
DEMO_CANDIDATES = 8  # refined candidates of the demo's compress
DEFAULT_PROBLEM = Path(__file__).resolve().parents[1] / "problems" / "digits-mlp.toml"


@dataclass(frozen=True)
class DemoResult:
    run: Path
    export: Path
    report: Path
    ratio: float
    test_metric: float
    teacher_test_metric: float
    compressed: Path | None = None
    compressed_ratio: float | None = None


def default_problem() -> ProblemConfig:
    if not DEFAULT_PROBLEM.is_file():
        raise ConfigError("problem", f"{DEFAULT_PROBLEM} not found: run the demo from a "
                          "checkout of moecomp (pip install -e .)")
    return load_problem(DEFAULT_PROBLEM)


def run_demo(out: Path, *, budget: int | None = None, fresh: bool = False,
             compare: bool = True, console: Console | None = None) -> DemoResult:
    from moecomp.compare import compare_with_de
    from moecomp.compress import compress
    from moecomp.export import export_solution
    from moecomp.pick import pick
    from moecomp.plots import plot_run
    from moecomp.refine import refine
    from moecomp.report import write_report
    from moecomp.search import run_search
    from moecomp.search.run import CHECKPOINT
    from moecomp.solution import RunContext
    from moecomp.train import teacher_paths, train_teacher

    c = console or Console()
    # The demo shows the method of the papers: Directed Evolution ranks the weights
    # (tentative zeroing measured against the teacher) before the search.
    problem = default_problem().replace("relevance", scorer="directed")
    if budget is None:
        budget = DEMO_BUDGET
    t0 = time.perf_counter()

    c.rule("1. teacher")
    _, record = train_teacher(problem)
    c.print(f"digits MLP: test accuracy {record['test_accuracy']:.2f} % "
            f"({record['n_params']:,} parameters) -> {teacher_paths(problem)[0]}")

    names = {"nsga2": "NSGA-II", "nsga3": "NSGA-III", "moead": "MOEA/D", "age": "AGE-MOEA"}
    algorithm = names.get(problem.search.algorithm, problem.search.algorithm.upper())
    c.rule(f"2. relevance (Directed Evolution) and search ({algorithm}, DE-style operators)")
    if fresh and out.exists():
        shutil.rmtree(out)
    resume = out.exists() and (out / CHECKPOINT).exists()
    result = run_search(problem, out, budget=budget, resume=resume, progress=True)
    c.print(f"{result.n_evals} evaluations, final hypervolume {result.hv:.4f}, "
            f"{len(result.front)} solutions on the front")

    c.rule("3. pick (bounds on the validation split)")
    picks = pick(out, max_drop=DEMO_DROP, knee=True)
    best = picks[picks["rule"].str.startswith("best ratio")].iloc[0]
    knee = picks[picks["rule"].str.startswith("knee")]
    c.print(f"best ratio with <= {DEMO_DROP} point drop on validation: solution "
            f"{int(best['id'])} ({best['ratio']:.1f}x estimated, validation drop "
            f"{best['val_drop']:.2f}, test drop {best['test_drop']:.2f} points); "
            f"knee: solution(s) {', '.join(str(int(i)) for i in knee['id'])}")

    # Fine-tuning, not reconstruction: on this small model the post-training re-fit plus
    # merging lost 1.7 test points for no size gain (2026-11-22); on FashionMNIST it is
    # the best post-training step (BENCHMARKS.md).
    c.rule("4. refine (2 distillation epochs; then bin merging within the budget left)")
    ctx = RunContext(out)
    tuned = refine(ctx, int(best["id"]), finetune_epochs=2)
    for o in tuned.steps:
        c.print(f"{tuned.key}: {o.line()}")
    left = max(0.0, DEMO_DROP - tuned.val_measure)
    ref = refine(ctx, tuned.key, merge=True, tolerance=left)
    for o in ref.steps:
        c.print(f"{ref.key}: {o.line()}")
    c.print(f"{ref.key} (from {ref.parent}, searched solution {ref.root}): validation drop "
            f"{ref.val_drop:.2f} +- {ref.val_drop_se:.2f} points (one standard error over "
            f"{len(ctx.target.require('validation'))} images), test {ref.test_metric:.2f} %, "
            f"{ref.file_bytes:,} bytes, {ref.ratio:.1f}x")

    c.rule("5. export, decode, verify")
    exp = export_solution(ctx, ref.key, safetensors=True, onnx=True)
    c.print(f"{exp.mcz}: {exp.file_bytes:,} bytes, {exp.ratio:.1f}x vs fp32 "
            f"({exp.fp32_bytes:,} bytes); decoded test accuracy {exp.test_metric:.2f} % "
            f"(teacher {exp.teacher_test_metric:.2f} %); decoded file reproduces the solution "
            "exactly")

    c.rule(f"6. the same in one command: compress --max-drop {DEMO_DROP} "
           f"(reconstruction, {DEMO_CANDIDATES} candidates)")
    comp = compress(ctx, out=out / "compress", max_drop=DEMO_DROP,
                    candidates=DEMO_CANDIDATES, calibration=1024, progress=True)
    c.print(f"{comp.file}: {comp.bytes:,} bytes, {comp.ratio:.1f}x vs fp32; validation drop "
            f"{comp.val_drop:.2f} +- {comp.val_se:.2f}, test drop {comp.test_drop:.2f} +- "
            f"{comp.test_se:.2f} points; "
            f"{len(comp.candidates)} candidates -> {comp.out / 'compress.json'}")

    if compare:
        c.rule("7. compare with single-objective Directed Evolution")
        cmp = compare_with_de(out)
        row = cmp.summary.set_index("method")
        budget = int(row.loc["search front", "budget"])
        c.print(f"hypervolume: search front {row.loc['search front', 'hv']:.4f} vs DE baseline "
                f"{row.loc['DE baseline', 'hv']:.4f} at the same {budget}"
                f" evaluations; the front dominates {cmp.front_dominates_de} of"
                f" {len(cmp.de)} DE points, DE dominates {cmp.de_dominates_front} front points"
                f" -> {cmp.files['markdown']}")

    c.rule("8. plots and report")
    plots = plot_run(out, picks=picks)
    report = write_report(out)
    for p in plots:
        c.print(f"plot   {p}")
    c.print(f"report {report}")
    c.print(f"[bold green]done in {time.perf_counter() - t0:.0f} s[/]")
    return DemoResult(out, exp.mcz, report, exp.ratio, exp.test_metric, exp.teacher_test_metric,
                      comp.file, comp.ratio)
