"""compute_ranks: cached on disk, keyed by weights, data and settings; corrupt files redone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moecomp.config import RelevanceConfig
from moecomp.relevance import SCORERS, Magnitude, cache_path, compute_ranks, is_permutation
from moecomp.target import LayerRef, Target

CALLS: list[str] = []


@dataclass(frozen=True)
class CountingMagnitude(Magnitude):
    """Magnitude that records every layer it scores."""

    def __call__(self, target: Target, layer: LayerRef, *, seed: int) -> torch.Tensor:
        CALLS.append(layer.name)
        return super().__call__(target, layer, seed=seed)

    @classmethod
    def from_config(cls, cfg: RelevanceConfig, *, progress: bool = False) -> CountingMagnitude:
        return cls()


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    monkeypatch.setenv("MOECOMP_ARTIFACTS", str(tmp_path))
    monkeypatch.setitem(SCORERS, "magnitude", CountingMagnitude)
    CALLS.clear()
    return CALLS


def test_second_call_hits_the_cache(counting: list[str], tiny: Target, tmp_path: Path) -> None:
    cfg = RelevanceConfig(scorer="magnitude")
    first = compute_ranks(tiny, cfg, progress=False)
    assert counting == tiny.layer_names
    path = cache_path(tiny, cfg)
    assert path.is_file() and path.parent == tmp_path / "ranks"
    second = compute_ranks(tiny, cfg, progress=False)
    assert counting == tiny.layer_names, "recomputed although cached"
    assert list(second) == tiny.layer_names
    for name in tiny.layer_names:
        assert torch.equal(first[name], second[name]) and is_permutation(second[name])


def test_changed_settings_or_weights_miss(counting: list[str], tiny: Target) -> None:
    cfg = RelevanceConfig(scorer="magnitude")
    compute_ranks(tiny, cfg, progress=False)
    n = len(tiny.layers)
    compute_ranks(tiny, RelevanceConfig(scorer="magnitude", seed=1), progress=False)
    assert len(counting) == 2 * n
    compute_ranks(tiny, RelevanceConfig(scorer="magnitude", calibration=10), progress=False)
    assert len(counting) == 3 * n
    with torch.no_grad():
        tiny.teacher.get_parameter("0.bias")[0] += 1.0  # not a ranked tensor, still part of the key
    compute_ranks(tiny, cfg, progress=False)
    assert len(counting) == 4 * n
    with torch.no_grad():
        tiny.teacher.get_parameter("2.weight")[0, 0] *= 3.0
    ranks = compute_ranks(tiny, cfg, progress=False)
    assert len(counting) == 5 * n
    assert torch.equal(
        ranks[tiny.layers[1].name], compute_ranks(tiny, cfg, progress=False)[tiny.layers[1].name]
    )
    assert len(counting) == 5 * n


def test_explicit_cache_dir(counting: list[str], tiny: Target, tmp_path: Path) -> None:
    cfg = RelevanceConfig(scorer="magnitude")
    compute_ranks(tiny, cfg, cache_dir=tmp_path / "elsewhere", progress=False)
    assert cache_path(tiny, cfg, tmp_path / "elsewhere").is_file()
    assert not (tmp_path / "ranks").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not-a-permutation", "missing-layer"])
def test_corrupt_cache_is_recomputed(damage: str, counting: list[str], tiny: Target) -> None:
    from safetensors.torch import save_file

    cfg = RelevanceConfig(scorer="magnitude")
    good = compute_ranks(tiny, cfg, progress=False)
    path = cache_path(tiny, cfg)
    if damage == "garbage":
        path.write_bytes(b"\x00\xffnot safetensors at all" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "not-a-permutation":
        save_file({k: torch.zeros_like(v) for k, v in good.items()}, str(path))
    else:
        save_file({tiny.layer_names[0]: good[tiny.layer_names[0]]}, str(path))
    with pytest.warns(UserWarning, match="recomputing"):
        again = compute_ranks(tiny, cfg, progress=False)
    assert len(counting) == 2 * len(tiny.layers)
    assert all(torch.equal(good[k], again[k]) for k in good)
    compute_ranks(tiny, cfg, progress=False)  # the file was repaired
    assert len(counting) == 2 * len(tiny.layers)


def test_directed_through_compute_ranks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny: Target
) -> None:
    monkeypatch.setenv("MOECOMP_ARTIFACTS", str(tmp_path))
    cfg = RelevanceConfig(scorer="directed", generations=2, population=4, set_fraction=0.2)
    ranks = compute_ranks(tiny, cfg, progress=False)
    assert all(
        is_permutation(r) and tuple(r.shape) == ref.shape
        for r, ref in zip(ranks.values(), tiny.layers, strict=True)
    )
