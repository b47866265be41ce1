"""From a drop budget to the smallest file: search, refine candidates, choose on validation,
export, verify, report on test.

``compress(problem, out=..., max_drop=D)`` does what a user with a budget would do by hand
with ``search``, ``pick``, ``refine`` and ``export``:

1. **search** the problem into ``OUT`` (continued if ``OUT`` holds an unfinished search), or
   reuse a finished run (``run=``);
2. measure every front solution on the **validation** split (cached in ``RUN/validation.csv``,
   shared with ``pick``); the best estimated ratio within the budget as it is, unrefined, is
   the first candidate and the floor;
3. **refine candidates across the front's ratio range** above that floor: the front is cut into
   bins of estimated ratio (x1.1 wide) and each bin's solutions are ordered by their validation
   measure. Refining (post-training reconstruction; or fine-tuning when ``finetune_epochs``
   > 0) moves the ratio at which the budget is crossed, so the bins are bisected: the best
   solution of the middle bin is refined, and the half above or below it is kept by whether
   it ended within the budget. Then the bins just above the best success get their next
   solutions (the validation measure is noisy near the budget), for as many candidates as
   ``candidates`` and ``time_budget`` allow;
4. **merge bins** (``merge``) of the smallest candidates within the budget, with the budget
   left to each as the tolerance (two of ``candidates`` are kept for it once a candidate is
   within; while none is, every slot refines);
5. choose the **smallest file** whose validation measure is within the budget, export it with
   ``moecomp.export.export_solution`` (which decodes it and checks the outputs), measure the
   **test** drop, and write ``OUT/compress.json``.

Every candidate's validation measure comes with its standard error over the split's samples
(``moecomp.target.standard_error``: for accuracy, from the images only one of teacher and
student gets right). With ``confidence`` C, a candidate is within the budget only when its
one-sided C upper bound, ``measure + z_C * SE``, is (z_0.9 = 1.28): the choice then leaves
room for what validation's own noise, and choosing the smallest of many candidates on it,
flatter. Merging spends the budget left under the bound. The front's solutions are still
ordered and floored by their measure alone (``RUN/validation.csv``).

The measure is the metric's drop (``max_drop``, in its units: points for accuracy) or the mean
divergence (``max_divergence``, for targets without a metric, or by choice). Every finished
candidate is a row of ``OUT/candidates.csv`` at once, so a killed ``compress`` continues where it
stopped: the strategy is replayed with the finished candidates read back, not refined again.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from moecomp.config import ProblemConfig, load_problem
from moecomp.errors import ConfigError, MoecompError, RunError
from moecomp.runs import RunFolder, atomic_write_csv, atomic_write_text, read_table
from moecomp.solution import RunContext
from moecomp.target import Target

CANDIDATES_FILE = "candidates.csv"
RESULT_FILE = "compress.json"
BIN_WIDTH = 1.1
"""Width of a bin of estimated ratios (a factor): candidates of one bin are about the same size."""
NEAR_BINS = 3
"""After the bisection, how many bins above the best success get further candidates."""
MERGE_CANDIDATES = 2
"""How many of the smallest candidates within the budget get their bins merged."""


class NoCandidateWithinBudget(MoecompError):
    """No front solution and no refined candidate is within the budget on validation."""


@dataclass(frozen=True)
class CompressResult:
    """What ``compress`` chose and where it is.

    file: the exported ``.mcz``; bytes: its size; ratio: fp32 bytes of all parameters / bytes.
    measure: "metric_drop" or "divergence"; limit: the budget on it (validation).
    val_drop / test_drop: the metric's drop on validation / test (NaN without a metric);
    val_divergence / test_divergence likewise. solution: the refined key in ``run``;
    search_id: the searched solution it comes from; steps: the refine steps kept.
    candidates: every candidate tried (rows of ``OUT/candidates.csv``).
    """

    file: Path
    bytes: int
    ratio: float
    measure: str
    limit: float
    val_drop: float
    test_drop: float
    val_divergence: float
    test_divergence: float
    solution: str
    search_id: int
    steps: str
    run: Path
    out: Path
    candidates: pd.DataFrame
    status: str
    val_se: float = math.nan
    test_se: float = math.nan
    confidence: float | None = None


# --- candidates ----------------------------------------------------------------------------
def ratio_bins(ratios: np.ndarray, floor: float, width: float = BIN_WIDTH) -> np.ndarray:
    """Bin index of each estimated ratio above ``floor``: ``floor(log(r / floor) / log(width))``
    (-1 for ratios at or below the floor). ratios: (n,)."""
    r = np.asarray(ratios, dtype=float)
    out = np.full(r.shape, -1, dtype=int)
    above = r > floor
    if floor <= 0:
        floor = float(r[above].min()) / width if above.any() else 1.0
    out[above] = np.floor(np.log(r[above] / floor) / math.log(width)).astype(int)
    return out


@dataclass
class _Strategy:
    """The order in which front solutions are refined (see the module docstring, step 3).

    bins: non-empty bins, lowest ratio first, each a list of search ids ordered by their
    unrefined validation measure (lowest first). ``next(outcomes)`` gives the next search id to
    refine from the outcomes so far (search id -> within the budget), or None.
    """

    bins: list[list[int]]

    def next(self, outcomes: dict[int, bool]) -> int | None:
        tried = set(outcomes)
        # bisection over the bins: each probe is the best untried solution of the middle bin
        lo, hi = -1, len(self.bins)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            probe = [s for s in self.bins[mid] if s in tried]
            if not probe:
                untried = [s for s in self.bins[mid] if s not in tried]
                return untried[0]
            if any(outcomes[s] for s in probe):
                lo = mid
            else:
                hi = mid
        # near the crossing: the next solutions of the bins just above the best success
        ok = [b for b, ids in enumerate(self.bins) if any(outcomes.get(s, False) for s in ids)]
        best = max(ok, default=-1)
        choices = []
        for b in range(best + 1, min(best + 1 + NEAR_BINS, len(self.bins))):
            for rank, s in enumerate(self.bins[b]):
                if s not in tried:
                    # diagonal order: a bin's next solution, or the best of the bin above
                    choices.append((rank + b - best - 1, b, s))
                    break
        if not choices:
            return None
        return min(choices)[2]


# --- records -------------------------------------------------------------------------------
def _settings(*, measure: str, reconstruct: bool, finetune_epochs: int, lr: float, seed: int,
              calibration: int, masks: str = "fixed", repair_masks: bool = False,
              optimizer: str = "adam") -> str:
    """What a refined candidate depends on, as a key: a resumed compress reuses a candidate
    only when these are equal (fixed masks leave the key as it was before masks moved)."""
    moving: dict[str, Any] = {"masks": masks} if masks != "fixed" and finetune_epochs > 0 \
        else {}
    if repair_masks and finetune_epochs > 0:
        moving["repair_masks"] = True
    if optimizer != "adam" and finetune_epochs > 0:  # Adam's keys stay as they were
        moving["optimizer"] = optimizer
    return json.dumps({"measure": measure, "reconstruct": reconstruct,
                       "finetune_epochs": finetune_epochs, "lr": lr, "seed": seed,
                       "calibration": calibration if reconstruct else None, **moving},
                      sort_keys=True)


def _read_candidates(out: Path) -> pd.DataFrame:
    p = out / CANDIDATES_FILE
    return read_table(p) if p.is_file() else pd.DataFrame()


def _json_value(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# --- the command ---------------------------------------------------------------------------
def compress(
    problem: ProblemConfig | str | os.PathLike[str] | RunContext | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    max_drop: float | None = None,
    max_divergence: float | None = None,
    run: RunContext | str | os.PathLike[str] | None = None,
    target: Target | None = None,
    budget: int | None = None,
    finetune_epochs: int = 0,
    reconstruct: bool | None = None,
    merge: bool = True,
    candidates: int = 16,
    time_budget: float | None = None,
    lr: float | None = None,
    seed: int = 0,
    calibration: int = 8192,
    progress: bool = True,
    device: str = "auto",
    masks: str = "fixed",
    repair_masks: bool = False,
    optimizer: str = "adam",
    confidence: float | None = None,
) -> CompressResult:
    """The smallest file whose validation drop (or divergence) is within a budget.

    problem: a problem file or ProblemConfig to search (into ``out``), or a RunContext of a
        finished search (as ``run``). target: the Target when built in Python
        (``moecomp.target.make_target``), for the search and every later step.
    out: the folder of the result (compress.json, candidates.csv, the chosen ``.mcz``); when
        searching it is the run folder itself. Default: ``RUN/compress`` with ``run``.
    max_drop: budget on the metric's drop from the teacher on validation (its units, points for
        accuracy); max_divergence: budget on the mean divergence on validation. Exactly one.
    run: reuse this run folder's search instead of searching.
    budget: search evaluations (default: the problem file's).
    finetune_epochs: > 0 refines each candidate by distillation fine-tuning for that many
        epochs; reconstruct: layer-wise reconstruction (default: on without fine-tuning, off
        with it: fine-tuning from the plain solution ended better, docs/decisions.md).
    merge: merge bins of the smallest candidates within the budget.
    candidates: at most this many refined candidates (merging counts); time_budget: seconds
        after which no new candidate is started (the search is bounded by ``budget``).
    device: where the search and the refine steps run (``auto``, ``cpu``, ``cuda``,
        ``cuda:N``; see ``run_search`` and ``refine``). masks: with fine-tuning, ``fixed``,
        ``gradual`` or ``rigl`` (``refine``'s ``masks``); repair_masks: with fine-tuning,
        survivors on hidden units that cannot matter move first (``refine``'s). optimizer,
        lr: the fine-tuning optimizer (adam or sgd) and learning rate (None: the optimizer's
        default).
    confidence: None (choose on the validation measure itself) or C in [0.5, 1): a
        candidate is within the budget only when ``measure + z_C * SE`` is, its one-sided C
        upper bound over the validation samples (needs a metric with per-sample values, as
        accuracy has; the divergence always has them).
    Returns a :class:`CompressResult`; raises :class:`NoCandidateWithinBudget` when nothing
    is within the budget (compress.json says so and lists what was tried).
    """
    if (max_drop is None) == (max_divergence is None):
        raise ConfigError("max_drop", "give one budget: max_drop (the metric's drop on "
                          "validation) or max_divergence (the divergence on validation)")
    limit = float(max_drop if max_drop is not None else max_divergence)  # type: ignore[arg-type]
    name = "max_drop" if max_drop is not None else "max_divergence"
    if not math.isfinite(limit) or limit < 0:
        raise ConfigError(name, f"must be a finite number >= 0, got {limit!r}")
    if isinstance(candidates, bool) or candidates < 1:
        raise ConfigError("candidates", f"must be an integer >= 1, got {candidates!r}")
    if time_budget is not None and not time_budget > 0:
        raise ConfigError("time_budget", f"must be > 0 seconds, got {time_budget!r}")
    z = confidence_z(confidence)
    from moecomp.finetune import finetune_settings

    _, lr = finetune_settings(finetune_epochs, masks=masks, repair_masks=repair_masks,
                              optimizer=optimizer, lr=lr)
    if reconstruct is None:
        reconstruct = finetune_epochs == 0
    metric = "metric" if max_drop is not None else "divergence"
    t0 = time.perf_counter()

    ctx, out_dir = _search_or_reuse(problem, run=run, out=out, target=target, budget=budget,
                                    progress=progress, device=device)
    tgt = ctx.target
    if metric == "metric" and tgt.metric is None:
        raise ConfigError("max_drop", "this target has no metric (it works on divergence "
                          "alone): give max_divergence")
    if tgt.val is None:
        raise ConfigError("data", "compress chooses on the validation split; this target has "
                          "none (give the data a validation split)")
    if z > 0 and metric == "metric" and not tgt.has_per_sample_metric("validation"):
        raise ConfigError("confidence", f"the metric {tgt.metric_name!r} gives one number per "
                          "split, and a bound needs its per-sample values (return an (n,) "
                          "tensor), or choose on the divergence (max_divergence)")
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings(measure=metric, reconstruct=bool(reconstruct),
                         finetune_epochs=finetune_epochs, lr=lr, seed=seed,
                         calibration=calibration, masks=masks, repair_masks=repair_masks,
                         optimizer=optimizer)
    run_compress = _Compress(ctx, out_dir, metric=metric, limit=limit, settings=settings,
                             reconstruct=bool(reconstruct), finetune_epochs=finetune_epochs,
                             lr=lr, seed=seed, calibration=calibration, progress=progress,
                             device=device, masks=masks, repair_masks=repair_masks,
                             optimizer=optimizer, confidence=confidence)
    run_compress.write_status("running", started=t0)
    try:
        status = run_compress.run(candidates=candidates, merge=merge, time_budget=time_budget,
                                  t0=t0)
    except BaseException as e:
        from moecomp.search.run import terminated_in

        cause = terminated_in(e) or e
        run_compress.write_status("interrupted", started=t0,
                                  error=f"{type(cause).__name__}: {cause}")
        raise
    return run_compress.finish(status, t0)


def confidence_z(confidence: float | None) -> float:
    """The normal quantile of a one-sided confidence level (0 for None, and for 0.5)."""
    if confidence is None:
        return 0.0
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not (
            0.5 <= confidence < 1):
        raise ConfigError("confidence", f"must be a level in [0.5, 1) (e.g. 0.9), got "
                          f"{confidence!r}")
    return NormalDist().inv_cdf(float(confidence))


def _search_or_reuse(problem: ProblemConfig | str | os.PathLike[str] | RunContext | None, *,
                     run: RunContext | str | os.PathLike[str] | None,
                     out: str | os.PathLike[str] | None, target: Target | None,
                     budget: int | None, progress: bool, device: str = "auto"
                     ) -> tuple[RunContext, Path]:
    if isinstance(problem, RunContext):
        if run is not None:
            raise ConfigError("run", "give the run once: as problem (a RunContext) or run")
        run, problem = problem, None
    if run is not None:
        ctx = run if isinstance(run, RunContext) else RunContext(run, target=target,
                                                                 progress=progress)
        ctx.run.require("front.csv")
        if problem is not None:
            cfg = problem if isinstance(problem, ProblemConfig) else load_problem(Path(problem))
            if cfg.name != ctx.problem.name:
                raise ConfigError("run", f"{ctx.run.path} is a run of problem "
                                  f"{ctx.problem.name!r}, not {cfg.name!r}")
        return ctx, Path(out) if out is not None else ctx.run.path / "compress"
    if problem is None:
        raise ConfigError("problem", "give a problem file to search, or a run folder (run=)")
    if out is None:
        raise ConfigError("out", "give the folder to search into and write the result")
    from moecomp.search import run_search
    from moecomp.search.run import CHECKPOINT

    folder = RunFolder(out)
    status = folder.status()
    searched = status.get("status") in ("done", "stopped") and folder.file("front.csv").is_file()
    if searched and budget is not None and int(status.get("n_evals", 0)) < budget:
        searched = status.get("status") == "stopped"
    if not searched:
        resume = folder.file(CHECKPOINT).is_file()
        run_search(problem, folder.path, budget=budget, resume=resume, progress=progress,
                   target=target, device=device)
    return RunContext(folder, target=target, progress=progress), folder.path


class _Compress:
    """One compress: the candidates, their records and the result files."""

    def __init__(self, ctx: RunContext, out: Path, *, metric: str, limit: float, settings: str,
                 reconstruct: bool, finetune_epochs: int, lr: float, seed: int,
                 calibration: int, progress: bool, device: str = "auto",
                 masks: str = "fixed", repair_masks: bool = False,
                 optimizer: str = "adam", confidence: float | None = None) -> None:
        self.ctx, self.out, self.metric, self.limit = ctx, out, metric, limit
        self.confidence, self.z = confidence, confidence_z(confidence)
        self.repair_masks, self.optimizer = repair_masks, optimizer
        self.settings = settings
        self.reconstruct, self.finetune_epochs = reconstruct, finetune_epochs
        self.lr, self.seed, self.calibration, self.progress = lr, seed, calibration, progress
        self.device, self.masks = device, masks
        self.col = "val_drop" if metric == "metric" else "val_divergence"
        old = _read_candidates(out)
        self.done: dict[str, dict[str, Any]] = {}
        if not old.empty:
            for row in old.to_dict("records"):
                if row.get("settings") == settings and (ctx.run.path / "refined" /
                                                        f"{row['key']}.mcz").is_file():
                    self.done[str(row["candidate"])] = row
        self.rows: list[dict[str, Any]] = []  # this compress's candidates, in order
        self.resumed = 0

    # --- records ------------------------------------------------------------------------
    def write_status(self, status: str, *, started: float, **more: Any) -> None:
        body = {"status": status, "run": str(self.ctx.run.path), "measure": self._measure_name,
                "limit": self.limit, "split": "validation", "confidence": self.confidence,
                "settings": json.loads(self.settings),
                "candidates_tried": len(self.rows),
                "elapsed_s": round(time.perf_counter() - started, 1), **more,
                "candidates": [{k: _json_value(v) for k, v in r.items()} for r in self.rows]}
        atomic_write_text(self.out / RESULT_FILE, json.dumps(body, indent=2))

    @property
    def _measure_name(self) -> str:
        return "metric_drop" if self.metric == "metric" else "divergence"

    def _save_row(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        old = _read_candidates(self.out)
        if not old.empty and "candidate" in old.columns:
            old = old[~((old["candidate"].astype(str) == row["candidate"])
                        & (old["settings"] == row["settings"]))]
        atomic_write_csv(self.out / CANDIDATES_FILE,
                         pd.concat([old, pd.DataFrame([row])], ignore_index=True))

    # --- one candidate ------------------------------------------------------------------
    def attempt(self, candidate: str, stage: str, source: str, search_id: int, est_ratio: float,
                plain: float, *, merge_tolerance: float | None = None) -> dict[str, Any]:
        """Refine ``source`` (a search id, or a refined key to merge), or read the result of a
        finished run of the same candidate back."""
        if candidate in self.done:
            row = dict(self.done[candidate])
            row["resumed"] = True
            if self.z > 0 and not _finite(row.get("val_se")):  # recorded before there were SEs
                row["val_se"], row["test_se"] = self._standard_errors(str(row["key"]))
            self._judge(row)
            self.resumed += 1
            self.rows.append(row)
            return row
        from moecomp.refine import refine

        t = time.perf_counter()
        if stage == "merge":
            r = refine(self.ctx, source, merge=True, tolerance=merge_tolerance or 0.0,
                       metric=self.metric, progress=False, device=self.device)
        elif stage == "plain":
            r = refine(self.ctx, source, metric=self.metric, progress=False,
                       device=self.device)
        else:
            r = refine(self.ctx, source, reconstruct=self.reconstruct,
                       finetune_epochs=self.finetune_epochs, lr=self.lr, seed=self.seed,
                       calibration=self.calibration, metric=self.metric, progress=False,
                       device=self.device, masks=self.masks,
                       repair_masks=self.repair_masks, optimizer=self.optimizer)
        measure = r.val_measure
        steps = " | ".join(o.line() for o in r.steps) or "none"
        if stage == "merge":  # the steps of the candidate merged come first (its lineage)
            prev = next((p for p in self.rows if str(p["key"]) == source), None)
            if prev is not None and prev["steps"] != "none":
                steps = f"{prev['steps']} | {steps}"
        row = {
            "candidate": candidate, "stage": stage, "search_id": search_id,
            "parent": r.parent, "key": r.key, "est_ratio": est_ratio,
            "plain_val": plain, "steps": steps,
            "bytes": r.file_bytes, "ratio": r.ratio, "val_measure": measure,
            "val_drop": r.val_drop, "val_divergence": r.val_divergence,
            "test_drop": r.test_drop, "test_divergence": r.test_divergence,
            "val_se": r.val_measure_se,
            "test_se": r.test_drop_se if self.metric == "metric" else r.test_divergence_se,
            "seconds": round(time.perf_counter() - t, 1),
            "settings": self.settings, "resumed": False,
        }
        self._judge(row)
        self._save_row(row)
        return row

    def _judge(self, row: dict[str, Any]) -> None:
        """The row's bound (its measure, plus z standard errors with a confidence) and
        whether that is within the budget."""
        bound = float(row["val_measure"])
        if self.z > 0:
            bound += self.z * float(row["val_se"])
        row["val_bound"] = bound
        row["within"] = bool(bound <= self.limit)

    def _standard_errors(self, key: str) -> tuple[float, float]:
        """The validation and test standard errors of a stored refined solution (for rows
        recorded before compress kept them)."""
        from moecomp.evaluate.options import resolve_device
        from moecomp.solution import student_model

        tgt = self.ctx.target.on_device(resolve_device(self.device, field="device"))
        model = student_model(tgt.teacher, tgt.round_dense(self.ctx.solution(key).state))
        val = tgt.fidelity(model, "validation")
        test = tgt.fidelity(model, "test") if tgt.test is not None else None
        if self.metric == "metric":
            return val.metric_drop_se, test.metric_drop_se if test else math.nan
        return val.divergence_se, test.divergence_se if test else math.nan

    # --- the strategy -------------------------------------------------------------------
    def run(self, *, candidates: int, merge: bool, time_budget: float | None,
            t0: float) -> str:
        from moecomp.pick import validation_measures

        ctx = self.ctx
        front = ctx.run.front()
        if front.empty:
            raise RunError(f"{ctx.run.path}: front.csv has no solutions")
        vals = validation_measures(ctx, front["id"].astype(int).tolist(), progress=self.progress)
        front = front.reset_index(drop=True).assign(
            val_drop=vals["val_drop"].to_numpy(), val_divergence=vals["val_divergence"].to_numpy())
        est = dict(zip(front["id"].astype(int), front["ratio"].astype(float), strict=True))
        plain = dict(zip(front["id"].astype(int), front[self.col].astype(float), strict=True))
        within = front[front[self.col].to_numpy(float) <= self.limit]
        floor = 0.0
        bar = tqdm(total=candidates, desc="compress", disable=not self.progress)
        best: dict[str, Any] | None = None

        def note(row: dict[str, Any]) -> None:
            nonlocal best
            if row["within"] and (best is None or row["bytes"] < best["bytes"]):
                best = row
            bar.update(1)
            bar.set_postfix_str(f"best {best['ratio']:.1f}x" if best else "none within yet")

        def out_of_time() -> bool:
            return time_budget is not None and time.perf_counter() - t0 > time_budget

        status = "done"
        if not within.empty:
            top = within.sort_values(["ratio", self.col], ascending=[False, True]).iloc[0]
            sid = int(top["id"])
            floor = float(top["ratio"])
            note(self.attempt(f"plain:{sid}", "plain", str(sid), sid, est[sid], plain[sid]))
        above = front[front["ratio"].to_numpy(float) > floor]
        bins_of = ratio_bins(above["ratio"].to_numpy(float), floor)
        bins: list[list[int]] = []
        for b in sorted(set(bins_of.tolist())):
            ids = above[bins_of == b].sort_values([self.col, "ratio"], ascending=[True, False])
            bins.append(ids["id"].astype(int).tolist())
        strategy = _Strategy(bins)
        outcomes: dict[int, bool] = {}
        def reserve() -> int:
            """Slots kept for merging: none while no candidate is within (they refine)."""
            found = any(r["within"] and r["stage"] != "merge" for r in self.rows)
            return min(MERGE_CANDIDATES, candidates - 1) if merge and found else 0

        while len(self.rows) < candidates - reserve():
            if out_of_time():
                status = "time budget reached"
                break
            nxt = strategy.next(outcomes)
            if nxt is None:
                break
            sid = nxt
            bar.set_description(f"compress (solution {sid})")
            row = self.attempt(f"refine:{sid}", "refine", str(sid), sid, est[sid], plain[sid])
            outcomes[sid] = bool(row["within"])
            note(row)
        if merge:
            ok = sorted((r for r in self.rows if r["within"] and r["stage"] != "merge"),
                        key=lambda r: r["bytes"])[:MERGE_CANDIDATES]
            for r in ok:
                if len(self.rows) >= candidates:
                    break
                if out_of_time():
                    status = "time budget reached"
                    break
                bar.set_description(f"compress (merge {r['key']})")
                slack = max(0.0, self.limit - float(r["val_bound"]))
                note(self.attempt(f"merge:{r['candidate']}:{slack:.6g}", "merge", str(r["key"]),
                                  int(r["search_id"]), float(r["est_ratio"]),
                                  float(r["plain_val"]), merge_tolerance=slack))
        bar.close()
        return status

    # --- the result ---------------------------------------------------------------------
    def finish(self, status: str, t0: float) -> CompressResult:
        from moecomp.export import export_solution

        ok = [r for r in self.rows if r["within"]]
        table = pd.DataFrame(self.rows)
        if not ok:
            self.write_status("no candidate within the budget", started=t0)
            best_seen = min((float(r["val_measure"]) for r in self.rows), default=math.nan)
            at, bound = "", ""
            if self.z > 0 and self.rows:
                at = f" at {self.confidence:g} confidence"
                bound = (f"the best bound is "
                         f"{min(float(r['val_bound']) for r in self.rows):.4g}, ")
            raise NoCandidateWithinBudget(
                f"{'--max-drop' if self.metric == 'metric' else '--max-divergence'} "
                f"{self.limit:g}: no front solution or refined candidate is within it on "
                f"validation{at} ({bound}the best measured {self.col} is {best_seen:.4g}; "
                f"{len(self.rows)} candidates in {self.out / CANDIDATES_FILE})")
        best = min(ok, key=lambda r: (r["bytes"], r["val_measure"]))
        ctx = self.ctx
        name = ctx.problem.name
        mcz = self.out / f"{name}-{best['key']}.mcz"
        e = export_solution(ctx, str(best["key"]), out=mcz, progress=False)
        tgt = ctx.target
        m = tgt.metric
        test_drop = (float(m.drop(tgt.teacher_metric("test"), e.test_metric))
                     if m is not None and tgt.test is not None else math.nan)
        val_drop = (float(m.drop(tgt.teacher_metric("validation"), e.val_metric))
                    if m is not None else math.nan)
        val_measure = val_drop if self.metric == "metric" else e.val_divergence
        if not val_measure <= self.limit:  # the export decodes to the refined solution exactly
            raise RunError(f"{mcz}: decoded, its validation {self.col} is {val_measure:.6g}, "
                           f"over the budget {self.limit:g} the candidate met")
        result = CompressResult(
            file=mcz, bytes=e.file_bytes, ratio=e.ratio, measure=self._measure_name,
            limit=self.limit, val_drop=val_drop, test_drop=test_drop,
            val_divergence=e.val_divergence, test_divergence=e.test_divergence,
            solution=str(best["key"]), search_id=int(best["search_id"]),
            steps=str(best["steps"]), run=ctx.run.path, out=self.out, candidates=table,
            status=status, val_se=float(best.get("val_se", math.nan)),
            test_se=float(best.get("test_se", math.nan)), confidence=self.confidence)
        teacher = {"val_metric": tgt.teacher_metric("validation"),
                   "test_metric": tgt.teacher_metric("test") if tgt.test is not None
                   else math.nan}
        self.write_status(
            status, started=t0, file=str(mcz), bytes=e.file_bytes, ratio=e.ratio,
            val_drop=_json_value(val_drop), test_drop=_json_value(test_drop),
            val_divergence=e.val_divergence, test_divergence=_json_value(e.test_divergence),
            val_se=_json_value(result.val_se), test_se=_json_value(result.test_se),
            val_bound=_json_value(float(best["val_bound"])), solution=result.solution,
            search_id=result.search_id, steps=result.steps,
            verified="the decoded file reproduces the refined solution's outputs exactly",
            metric=None if m is None else {"name": m.name, "unit": m.unit},
            teacher={k: _json_value(v) for k, v in teacher.items()},
            resumed_candidates=self.resumed)
        return result


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _se(value: float) -> str:
    return f" +- {value:.3f}" if _finite(value) else ""


def summary_lines(result: CompressResult, *, metric_name: str = "metric",
                  unit: str = "") -> Sequence[str]:
    """What the command prints about a result."""
    what = f"{metric_name} drop" if result.measure == "metric_drop" else "divergence"
    val = result.val_drop if result.measure == "metric_drop" else result.val_divergence
    test = result.test_drop if result.measure == "metric_drop" else result.test_divergence
    u = f" {unit}" if unit and result.measure == "metric_drop" else ""
    n_within = int(result.candidates["within"].sum())
    chosen = (f"budget {result.limit:g}{u}, where it was chosen" if result.confidence is None
              else f"budget {result.limit:g}{u} for its {result.confidence:g} upper bound "
                   f"{val + confidence_z(result.confidence) * result.val_se:.3f}{u}, where it "
                   f"was chosen")
    return [
        f"file      {result.file}  ({result.bytes:,} bytes, {result.ratio:.1f}x vs fp32)",
        f"solution  {result.solution} of {result.run} (searched solution {result.search_id}): "
        f"{result.steps}",
        f"{what}  validation {val:.3f}{_se(result.val_se)}{u} ({chosen}), "
        f"test {test:.3f}{_se(result.test_se)}{u} (reported"
        + ("; +- one standard error over the split's samples)" if _finite(result.val_se)
           else ")"),
        "verified  the decoded file reproduces the solution's outputs exactly",
        f"tried     {len(result.candidates)} candidates, {n_within} within the budget; "
        f"{result.out / RESULT_FILE}" + ("" if result.status == "done"
                                         else f" ({result.status})"),
    ]
