"""moecomp from Python, without a problem file: a model, its splits and the search settings as
Python objects, then search -> pick -> export -> decode.

    python examples/python_api.py [--out runs/python-api] [--budget 400] [--pop-size 24]

The model is a small MLP with BatchNorm trained here on scikit-learn's digits (seconds); put
your own trained model and data in its place. ``moecomp.target.make_target`` takes the model
and the splits directly (``divergence`` and ``metric`` may be built-in names or functions);
``run_search(..., target=t)`` searches it; ``RunContext(run, target=t)`` hands the same target
to ``pick`` and ``export_solution`` (a run searched from Python objects has no factory to
rebuild its model from). The exported ``.mcz`` is decoded and loaded into a fresh model, as a
user of the file would, and compared with the teacher.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moecomp.codec import read_mcz
from moecomp.config import LayersConfig, ModelConfig, ObjectivesConfig, ProblemConfig
from moecomp.export import export_solution
from moecomp.fold import apply_folds
from moecomp.pick import pick
from moecomp.search.run import run_search
from moecomp.solution import RunContext
from moecomp.target import load_state, make_target
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F


def build() -> nn.Module:
    """The model's architecture: 64 -> 128 (BatchNorm, ReLU) -> 64 (ReLU) -> 10 logits."""
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
                         nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def digits_splits(seed: int = 0) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                          tuple[torch.Tensor, torch.Tensor]]:
    """moecomp's splits ``{"calibration", "validation", "test"} -> (inputs (n, 64), labels
    (n,))`` and the teacher's training set. Test 360 and validation 360 images are held out;
    calibration is 512 of the training images."""
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    xs = torch.tensor(x[perm] / 16.0, dtype=torch.float32)
    ys = torch.tensor(y[perm], dtype=torch.int64)
    test, val, train = slice(0, 360), slice(360, 720), slice(720, None)
    splits = {"calibration": (xs[train][:512], ys[train][:512]),
              "validation": (xs[val], ys[val]), "test": (xs[test], ys[test])}
    return splits, (xs[train], ys[train])


def train_teacher(x: torch.Tensor, y: torch.Tensor, *, epochs: int = 40,
                  seed: int = 0) -> nn.Module:
    """A trained teacher (eval mode), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def main(out: Path | str = "runs/python-api", *, budget: int = 400, pop_size: int = 24,
         seed: int = 0) -> dict[str, Any]:
    """Compress the digits teacher into ``out`` (a run folder; must not hold a run yet).
    Returns the export's result, the decoded model and the teacher/student test numbers."""
    splits, train = digits_splits(seed)
    teacher = train_teacher(*train, seed=seed)

    # 1. The target: the teacher, its splits, the fidelity measure. BatchNorm is folded into
    #    the Linear before it (exact, checked), so only the three Linear weights are searched.
    target = make_target(teacher, splits, divergence="kl", metric="accuracy",
                         layers=LayersConfig(types=("Linear",)), calibration=256, seed=seed)

    # 2. The search settings (no model or data fields: the target carries them).
    cfg = ProblemConfig(name="python-api", model=ModelConfig(),
                        layers=LayersConfig(types=("Linear",)),
                        objectives=ObjectivesConfig(divergence="kl"))
    cfg = cfg.replace("search", pop_size=pop_size, budget=budget, seed=seed)
    run_search(cfg, out, target=target, progress=False, plots=False)

    # 3. Pick on the validation split and export: the same target, handed over.
    ctx = RunContext(out, target=target)
    picks = pick(ctx, max_drop=1.0)  # within 1 point of the teacher's validation accuracy
    if picks.empty:
        picks = pick(ctx, knee=True, max_knees=1)
    best = picks.sort_values("ratio").iloc[-1]
    result = export_solution(ctx, int(best["id"]), out=Path(out) / "model.mcz",
                             safetensors=True)

    # 4. Decode the file as its user would: a fresh model with the file's folds, then the
    #    decoded state.
    decoded = read_mcz(result.mcz)
    student = apply_folds(build(), decoded.meta["folded"])
    load_state(student, decoded.state_dict)
    student.eval()
    x, y = splits["test"]
    with torch.no_grad():
        t, s = teacher(x), student(x)
    return {
        "result": result,
        "student": student,
        "teacher_accuracy": 100.0 * float((t.argmax(1) == y).float().mean()),
        "student_accuracy": 100.0 * float((s.argmax(1) == y).float().mean()),
        "kl": float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True,
                             reduction="batchmean")),
    }


def cli(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/python-api"))
    parser.add_argument("--budget", type=int, default=400)
    parser.add_argument("--pop-size", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    r = main(args.out, budget=args.budget, pop_size=args.pop_size, seed=args.seed)
    res = r["result"]
    print(f"solution {res.key}: {res.mcz} ({res.file_bytes:,} bytes, {res.ratio:.1f}x vs fp32)")
    print(f"test accuracy: teacher {r['teacher_accuracy']:.2f} %, decoded student "
          f"{r['student_accuracy']:.2f} %; KL {r['kl']:.4f} nats")


if __name__ == "__main__":
    cli()
