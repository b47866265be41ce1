"""The fine-tuning options shared by `refine` and `compress` (``--optimizer``, ``--lr``) and
the check of every fine-tuning option, done before anything slow starts."""

from __future__ import annotations

import re
from typing import Any

import typer

from moecomp.errors import ConfigError
from moecomp.finetune import OPTIMIZERS, finetune_settings

_DEFAULTS = ", ".join(f"{name} {lr:g}" for name, lr in OPTIMIZERS.items())


def optimizer_option() -> Any:
    return typer.Option(
        "adam", "--optimizer",
        help=f"Fine-tuning optimizer: {' or '.join(OPTIMIZERS)} (Nesterov momentum 0.9); the "
             "learning rate decays on a cosine to 0.")


def lr_option() -> Any:
    return typer.Option(None, "--lr", help=f"Fine-tuning learning rate (default: {_DEFAULTS}).")


FINETUNE_OPTIONS = {
    "finetune_epochs": "--finetune-epochs",
    "masks": "--masks",
    "repair_masks": "--repair-masks",
    "optimizer": "--optimizer",
    "lr": "--lr",
}
"""The fine-tuning parameters of ``refine`` and ``compress`` and their options."""


def said_as_options(message: str, options: dict[str, str]) -> str:
    """``message`` with every parameter name of ``options`` that stands as a word of its own
    (not inside another name or option) said as its option."""
    names = "|".join(sorted(options, key=len, reverse=True))
    return re.sub(rf"(?<![\w-])({names})(?![\w-])", lambda m: options[m.group(1)], message)


def checked_finetune(finetune_epochs: int, masks: str, repair_masks: bool, optimizer: str,
                     lr: float | None) -> None:
    """``finetune.finetune_settings``'s check, its one-line ConfigError said with options."""
    try:
        finetune_settings(finetune_epochs, masks=masks, repair_masks=repair_masks,
                          optimizer=optimizer, lr=lr)
    except ConfigError as e:
        field = FINETUNE_OPTIONS.get(e.field.split(".")[0], e.field)
        raise ConfigError(field, said_as_options(e.problem, FINETUNE_OPTIONS)) from None
