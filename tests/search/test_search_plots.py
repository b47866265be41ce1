"""The front figure's info object (what is drawn), and that drawing writes a PNG."""

from __future__ import annotations

import numpy as np

from moecomp.search.plots import draw_front, draw_hv, front_info, hv_info

LABELS = ("density (kept share)", "mean bits per kept weight", "KL divergence (nats)")


def test_front_info_has_every_pair_of_objectives_with_units(tmp_path):
    F = np.random.default_rng(0).random((20, 3))
    info = front_info(F, np.array([2, 5, 7]), LABELS)
    assert info.panels == ((0, 1), (0, 2), (1, 2))
    assert np.flatnonzero(info.on_front).tolist() == [2, 5, 7]
    assert info.labels == LABELS
    draw_front(info, tmp_path / "front.png", title="t")
    draw_hv(np.arange(5), np.linspace(0, 0.5, 5), tmp_path / "hv.png")
    for name in ("front.png", "hv.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_objectives_give_one_panel():
    info = front_info(np.ones((3, 2)), np.array([0]), ("size (share of fp32 bits)", "x"))
    assert info.panels == ((0, 1),)


def test_hv_figure_leaves_out_only_leading_zero_generations():
    x, y, left = hv_info(np.array([44, 84, 104, 145]), np.array([0.0, 0.79, 0.80, 0.80]))
    assert x.tolist() == [84, 104, 145] and y.tolist() == [0.79, 0.80, 0.80] and left == 44
    # nothing left out when the first point has HV, nor when every HV is 0
    x, _, left = hv_info(np.array([10, 20]), np.array([0.5, 0.0]))
    assert x.tolist() == [10, 20] and left == 0
    x, _, left = hv_info(np.array([10, 20]), np.zeros(2))
    assert x.tolist() == [10, 20] and left == 0
