"""moecomp.atomic: whole-file writes through a temporary of one's own."""

from __future__ import annotations

import pytest

from moecomp.atomic import replace_atomically, temp_beside
from moecomp.runs import atomic_write_text


def test_two_writers_of_one_file_each_rename_their_own(tmp_path):
    """Study workers write the same study.json at once. Here a second writer runs to the end
    while the first is half-way through its temporary: neither fails, the file is one writer's
    whole text (the last renamed), and no temporary is left."""
    path = tmp_path / "study.json"
    first = "A" * 10_000

    def slow_write(tmp):
        with open(tmp, "w") as f:
            f.write(first[:5_000])
            atomic_write_text(path, "B" * 7_000)  # the other worker, start to finish
            assert path.read_text() == "B" * 7_000
            f.write(first[5_000:])

    replace_atomically(path, slow_write)
    assert path.read_text() == first
    assert [p.name for p in tmp_path.iterdir()] == ["study.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "front.csv"
    path.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_atomically(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["front.csv"]


def test_temporaries_are_hidden_siblings_with_the_suffix_asked_for(tmp_path):
    path = tmp_path / "front.png"
    a, b = temp_beside(path, ".tmp.png"), temp_beside(path, ".tmp.png")
    assert a != b
    for t in (a, b):
        assert t.parent == tmp_path and t.name.startswith(".front.png.")
        assert t.name.endswith(".tmp.png")
