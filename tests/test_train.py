import dataclasses

import torch

from moecomp.train import accuracy, teacher_paths, train_teacher


def _short(problem):
    return dataclasses.replace(problem, train=dataclasses.replace(problem.train, epochs=3))


def test_same_seed_same_weights(digits_problem, tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMP_ARTIFACTS", str(tmp_path / "a"))
    p = _short(digits_problem)
    m1, r1 = train_teacher(p, progress=False)
    monkeypatch.setenv("MOECOMP_ARTIFACTS", str(tmp_path / "b"))
    m2, _ = train_teacher(p, progress=False)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert r1["seed"] == p.train.seed and r1["epochs"] == 3


def test_other_seed_other_weights(digits_problem, tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMP_ARTIFACTS", str(tmp_path))
    p = _short(digits_problem)
    q = dataclasses.replace(p, train=dataclasses.replace(p.train, seed=1))
    a, _ = train_teacher(p, progress=False)
    b, _ = train_teacher(q, progress=False)
    assert not torch.equal(a.out.weight, b.out.weight)


def test_reused_when_present_and_record_written(digits_problem, tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMP_ARTIFACTS", str(tmp_path))
    p = _short(digits_problem)
    m1, r1 = train_teacher(p, progress=False)
    weights, record = teacher_paths(p)
    assert weights.is_file() and record.is_file()
    mtime = weights.stat().st_mtime_ns
    m2, r2 = train_teacher(p, progress=False)
    assert weights.stat().st_mtime_ns == mtime and r2 == r1
    assert torch.equal(m1.out.weight, m2.out.weight)
    assert r1["threads"] == torch.get_num_threads()  # what the teacher's bits depend on


def test_global_rng_untouched(digits_problem, tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMP_ARTIFACTS", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_teacher(_short(digits_problem), progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_digits_teacher_is_accurate(digits_target):
    assert accuracy(digits_target.teacher, digits_target.test) > 93.0
