"""Train zoo teachers with a fixed seed; store safetensors + a JSON record; reuse them."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from moecomp import inputs as inputs_mod
from moecomp.atomic import replace_atomically
from moecomp.config import ProblemConfig
from moecomp.data import Split, Splits, load_splits
from moecomp.errors import ConfigError
from moecomp.zoo import build_model

ARTIFACTS_ENV = "MOECOMP_ARTIFACTS"


def artifacts_dir() -> Path:
    """Where teachers and caches go: $MOECOMP_ARTIFACTS or ./artifacts (git-ignored)."""
    return Path(os.environ.get(ARTIFACTS_ENV, "artifacts"))


def teacher_key(problem: ProblemConfig) -> str:
    """Hash of everything that determines the trained weights."""
    d = problem.data
    data: list[object] = [d.source, d.seed]
    if d.validation != "holdout" or d.holdout is not None:  # the default keeps old keys
        data += [d.validation, d.holdout]
    model = {k: v for k, v in asdict(problem.model).items() if k in ("zoo", "factory", "weights")}
    blob = json.dumps({"model": model, "data": data, "train": asdict(problem.train)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def teacher_paths(problem: ProblemConfig) -> tuple[Path, Path]:
    # Named by model and hash, not by problem: problems that differ only in what they
    # search share one teacher.
    folder = artifacts_dir() / "teachers" / f"{problem.model.zoo}-{teacher_key(problem)}"
    return folder / "teacher.safetensors", folder / "teacher.json"


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, *, batch: int = 4096) -> float:
    """Top-1 accuracy in percent of a classifier on a labelled split."""
    if split.labels is None:
        raise ConfigError("metric", "accuracy needs labels; this split has none")
    model.eval()
    correct = 0
    for i, x in inputs_mod.batches(split.inputs, batch):
        out = inputs_mod.call(model, x)
        correct += int((out.argmax(-1) == split.labels[i:i + batch]).sum())
    return 100.0 * correct / max(len(split), 1)


def fit(model: nn.Module, data: Splits, problem: ProblemConfig, *,
        progress: bool = True) -> list[float]:
    """Adam on cross-entropy; data order from a seeded generator. Returns per-epoch val acc."""
    cfg = problem.train
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    train = data.calibration  # the zoo's calibration split is its training images
    assert isinstance(train.inputs, torch.Tensor) and train.labels is not None
    n = len(train)
    history = []
    bar = tqdm(range(cfg.epochs), desc=f"train {problem.name}", disable=not progress)
    for _ in bar:
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = nn.functional.cross_entropy(model(train.inputs[idx]), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        history.append(accuracy(model, data.validation))
        bar.set_postfix(val_metric=f"{history[-1]:.2f}%")
    model.eval()
    return history


def init_model(problem: ProblemConfig) -> nn.Module:
    """A zoo model initialised from the training seed (global RNG left untouched)."""
    if problem.model.zoo is None:
        raise ConfigError("model.zoo", "only zoo models are trained by moecomp")
    with torch.random.fork_rng():
        torch.manual_seed(problem.train.seed)
        return build_model(problem.model.zoo)


def train_teacher(problem: ProblemConfig, *, data: Splits | None = None, force: bool = False,
                  progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or reuse) the teacher of a zoo problem; returns the model and its record."""
    weights, record_path = teacher_paths(problem)
    model = init_model(problem)
    if weights.is_file() and record_path.is_file() and not force:
        model.load_state_dict(load_file(weights))
        model.eval()
        return model, json.loads(record_path.read_text())
    if data is None:
        data = load_splits(problem.data, folder=problem.folder)
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(problem.train.seed)  # dropout-free models; kept for user ones
        history = fit(model, data, problem, progress=progress)
    record = {
        "problem": problem.name,
        "model": problem.model.zoo,
        "dataset": data.name,
        "seed": problem.train.seed,
        "epochs": problem.train.epochs,
        "train_seconds": round(time.perf_counter() - t0, 2),
        "val_accuracy": history[-1],
        "test_accuracy": accuracy(model, data.test),
        "n_params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        # the sums of a training step depend on how many threads share them: another count
        # gives a teacher different in the last bits, and every number downstream moves
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    replace_atomically(weights, lambda tmp: save_file(state, str(tmp)))
    text = json.dumps(record, indent=2)
    replace_atomically(record_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return model, record
