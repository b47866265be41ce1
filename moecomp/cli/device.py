"""The ``--device`` option shared by the commands that run models (search, study, refine,
compress): a run-time setting, never part of a problem's identity."""

from __future__ import annotations

from typing import Any

import typer

DEVICE_HELP = ("Where models run (relevance, evaluation, reconstruction, fine-tuning): auto "
               "(CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N.")


def device_option() -> Any:
    return typer.Option("auto", "--device", help=DEVICE_HELP)


def checked_device(device: str) -> str:
    """``device`` when it is a setting this machine can honour, else a one-line ConfigError
    naming ``--device`` (checked before anything slow starts)."""
    from moecomp.evaluate.options import resolve_device

    resolve_device(device, field="--device")
    return device
