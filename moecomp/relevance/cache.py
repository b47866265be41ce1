"""Ranks of every compressible tensor of a target, computed once and cached on disk.

A cache file is ``<cache_dir>/<scorer>-<key>.safetensors`` holding one int64 rank tensor per
layer; ``key`` is a sha256 of everything the ranks depend on: the teacher's whole state dict
(names, dtypes, shapes and bytes), the calibration inputs and labels a scorer reads (the first
``cfg.calibration``), the selected layers, the divergence and task, and all relevance
settings. A file that is unreadable or does not hold a valid ranking of exactly these layers
is recomputed (with a warning) and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from moecomp import inputs as inputs_mod
from moecomp.atomic import replace_atomically
from moecomp.config import RelevanceConfig
from moecomp.relevance.base import is_permutation, scores_to_ranks
from moecomp.relevance.registry import SCORERS
from moecomp.relevance.units import structure_ranks
from moecomp.target import Target
from moecomp.train import artifacts_dir

CACHE_FORMAT = 1  # bump when the meaning of cached ranks changes


def _tensor_bytes(h: hashlib._Hash, name: str, t: torch.Tensor) -> None:
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def scoring_device(cfg: RelevanceConfig, device: str = "auto") -> torch.device:
    """Where the scorer of ``cfg`` runs for a device setting (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``): magnitude needs no forward and stays on the CPU."""
    from moecomp.evaluate.options import resolve_device

    dev = resolve_device(device, field="device")
    return torch.device("cpu") if cfg.scorer == "magnitude" else dev


def cache_key(target: Target, cfg: RelevanceConfig, *, device: str = "auto") -> str:
    """sha256 (hex) of the weights, calibration data and settings the ranks depend on, and
    of the device type when the scorer runs off the CPU (its sums round differently, which
    can reorder near ties; CPU keys are those of caches written before devices existed)."""
    h = hashlib.sha256()
    meta: dict[str, object] = {
        "format": CACHE_FORMAT,
        # unit structuring is applied to the cached ranks, not part of them
        "relevance": {k: v for k, v in asdict(cfg).items() if k != "units"},
        "layers": [[r.name, list(r.shape)] for r in target.layers],
        "divergence": target.divergence.name,
        "output": target.output,
        "task": target.task,
    }
    dev = scoring_device(cfg, device)
    if dev.type != "cpu":
        meta["device"] = dev.type
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name, t in sorted(target.state_dict().items()):
        _tensor_bytes(h, f"param:{name}", t)
    part = target.calib.take(slice(0, cfg.calibration))
    for name, t in inputs_mod.leaves(part.inputs):
        # a single tensor keeps the key of caches written before inputs had structure
        _tensor_bytes(h, f"calib_x{'.' + name if name else ''}", t)
    if part.labels is not None:
        _tensor_bytes(h, "calib_y", part.labels)
    return h.hexdigest()


def cache_path(target: Target, cfg: RelevanceConfig, cache_dir: Path | None = None, *,
               device: str = "auto") -> Path:
    """Where the ranks of ``target`` under ``cfg`` computed on ``device`` are cached
    (default ``artifacts_dir()/ranks``)."""
    folder = artifacts_dir() / "ranks" if cache_dir is None else Path(cache_dir)
    return folder / f"{cfg.scorer}-{cache_key(target, cfg, device=device)}.safetensors"


def _check(ranks: dict[str, torch.Tensor], target: Target) -> str | None:
    """Why ``ranks`` is not a valid ranking of the target's layers (None if it is)."""
    want = set(target.layer_names)
    if set(ranks) != want:
        return f"holds layers {sorted(ranks)}, expected {sorted(want)}"
    for ref in target.layers:
        r = ranks[ref.name]
        if tuple(r.shape) != ref.shape:
            return f"{ref.name} has shape {tuple(r.shape)}, expected {ref.shape}"
        if not is_permutation(r):
            return f"{ref.name} is not an int64 permutation of 0..{ref.numel - 1}"
    return None


def load_ranks(path: Path, target: Target) -> dict[str, torch.Tensor] | None:
    """Cached ranks from ``path``, or None (with a warning) when the file is corrupt or does
    not fit ``target``. A missing file is None without a warning."""
    if not path.is_file():
        return None
    try:
        ranks = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        warnings.warn(f"rank cache {path} is unreadable ({e}); recomputing", stacklevel=3)
        return None
    problem = _check(ranks, target)
    if problem is not None:
        warnings.warn(f"rank cache {path} is invalid ({problem}); recomputing", stacklevel=3)
        return None
    return ranks


def compute_ranks(
    target: Target, cfg: RelevanceConfig, *, cache_dir: Path | None = None, progress: bool = True,
    device: str = "auto",
) -> dict[str, torch.Tensor]:
    """Ranks (``int64``, weight's shape, 0 = least relevant, on the CPU) of every layer in
    ``target.layers`` by the scorer ``cfg.scorer``; read from the cache when there.
    device: where the scorer's forwards run (``auto``: CUDA when present; see
    :func:`scoring_device`)."""
    path = cache_path(target, cfg, cache_dir, device=device)
    cached = load_ranks(path, target)
    if cached is not None:
        ordered = {name: cached[name] for name in target.layer_names}
        return structure_ranks(ordered, target.layers, cfg.units)
    scorer = SCORERS[cfg.scorer].from_config(cfg, progress=progress)
    scored = target.on_device(scoring_device(cfg, device))
    ranks: dict[str, torch.Tensor] = {}
    for ref in tqdm(
        target.layers, desc=f"relevance ({cfg.scorer})", unit="layer", disable=not progress
    ):
        scores = scorer(scored, ref, seed=cfg.seed).cpu()  # ranked on the CPU: same ties
        if tuple(scores.shape) != ref.shape:
            raise RuntimeError(
                f"scorer {cfg.scorer!r} returned shape {tuple(scores.shape)} "
                f"for {ref.name}, expected {ref.shape}"
            )
        ranks[ref.name] = scores_to_ranks(scores).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "scorer": cfg.scorer,
        "settings": json.dumps(asdict(cfg), sort_keys=True),
        "format": str(CACHE_FORMAT),
    }
    # atomic: a reader never sees half a file
    replace_atomically(path, lambda tmp: save_file(ranks, str(tmp), metadata=meta))
    return structure_ranks(ranks, target.layers, cfg.units)
