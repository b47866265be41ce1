"""The fine-tuning optimizer options shared by `refine` and `compress` (``--optimizer``,
``--lr``) and their check, done before anything slow starts."""

from __future__ import annotations

from typing import Any

import typer

from moecomp.errors import ConfigError
from moecomp.finetune import OPTIMIZERS, resolve_optimizer

_DEFAULTS = ", ".join(f"{name} {lr:g}" for name, lr in OPTIMIZERS.items())


def optimizer_option() -> Any:
    return typer.Option(
        "adam", "--optimizer",
        help=f"Fine-tuning optimizer: {' or '.join(OPTIMIZERS)} (Nesterov momentum 0.9); the "
             "learning rate decays on a cosine to 0.")


def lr_option() -> Any:
    return typer.Option(None, "--lr", help=f"Fine-tuning learning rate (default: {_DEFAULTS}).")


def checked_optimizer(optimizer: str, lr: float | None, finetune_epochs: int) -> None:
    """A one-line ConfigError naming ``--optimizer`` or ``--lr`` for a value refused, or for
    another optimizer than Adam without fine-tuning (it would be ignored)."""
    try:
        resolve_optimizer(optimizer, lr)
    except ConfigError as e:
        raise ConfigError(f"--{e.field}", e.problem) from None
    if optimizer != "adam" and finetune_epochs == 0:
        raise ConfigError("--optimizer", f"{optimizer!r} is the fine-tuning optimizer: give "
                          "--finetune-epochs > 0")
