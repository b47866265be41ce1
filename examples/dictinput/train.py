"""Train the dict-input example's teacher on scikit-learn's digits (seconds).

    python examples/dictinput/train.py [--epochs N] [--out PATH] [--seed S]

Adam on cross-entropy over the training images of :mod:`data`, fed as keyword inputs.
Writes ``teacher.safetensors`` and ``train.json`` into ``artifacts/examples/dictinput/`` of
the repository by default and prints test accuracy and time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

import data
from model import build

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "artifacts" / "examples" / "dictinput" / "teacher.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


@torch.no_grad()
def accuracy(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent of ``model`` (eval mode) on keyword ``inputs``."""
    model.eval()
    return 100.0 * float((model(**inputs).argmax(1) == labels).float().mean())


def train(cfg: TrainConfig, *, log: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Train a teacher; returns it (eval mode) and a JSON-able record (per-epoch training loss
    in nats, validation / test accuracy in percent). The global torch RNG is left as it was."""
    inputs, labels = data.part("train")
    parts = data.splits()
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build()
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    losses = []
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(labels), generator=gen)
        total = 0.0
        for i in range(0, len(labels), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(model(**{k: v[idx] for k, v in inputs.items()}), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        losses.append(total / len(labels))
    model.eval()
    record = {"config": asdict(cfg), "train_loss_per_epoch": losses,
              "validation_accuracy": accuracy(model, *parts["validation"]),
              "test_accuracy": accuracy(model, *parts["test"]),
              "train_seconds": round(time.perf_counter() - t0, 2),
              "parameters": sum(p.numel() for p in model.parameters())}
    if log:
        print(f"  train loss: epoch 1 {losses[0]:.4f}, epoch {len(losses)} {losses[-1]:.4f}")
    return model, record


def save(model: nn.Module, record: dict[str, Any], out: Path) -> None:
    """Write ``out`` (safetensors state dict) and ``train.json`` next to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata={"example": "dictinput",
                                         "epochs": str(record["config"]["epochs"]),
                                         "seed": str(record["config"]["seed"])})
    (out.parent / "train.json").write_text(json.dumps(record, indent=1) + "\n")


def ensure_teacher(path: Path | str | None = None, *, epochs: int = TrainConfig.epochs,
                   seed: int = 0) -> Path:
    """A teacher at ``path`` (default: the repository's artifacts folder), trained only when
    the file is missing (the full 60 epochs take a few seconds). Returns the path."""
    path = Path(path) if path is not None else DEFAULT_OUT
    if not path.is_file():
        model, record = train(TrainConfig(epochs=epochs, seed=seed), log=False)
        save(model, record, path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    # Batches of 64 x 64 features: threads only add synchronisation (and on a shared machine,
    # spinning); one thread trains several times faster than two.
    torch.set_num_threads(1)
    model, record = train(TrainConfig(epochs=args.epochs, seed=args.seed))
    save(model, record, args.out)
    print(f"test accuracy {record['test_accuracy']:.2f} % (validation "
          f"{record['validation_accuracy']:.2f} %), {args.epochs} epochs in "
          f"{record['train_seconds']:.1f} s, {record['parameters']:,} parameters -> {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
