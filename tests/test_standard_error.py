"""The standard errors a Fidelity carries: the drop's from paired per-sample differences
(checked against McNemar's counts), the divergence's from its per-sample values, and none for a
metric that gives one number per split."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from moecomp.metric import Metric, accuracy_batched
from moecomp.solution import student_model
from moecomp.target import standard_error


def test_standard_error_known_answers():
    assert standard_error([1.0, 3.0]) == pytest.approx(1.0)  # std 1.414.. / sqrt(2)
    assert standard_error(np.full(10, 7.0)) == 0.0
    assert math.isnan(standard_error([5.0]))


def _damaged(target, share: float = 0.6):
    """The teacher with ``share`` of its first layer's weights zeroed (by a fixed seed)."""
    state = {k: v.clone() for k, v in target.state_dict().items()}
    name = target.layer_names[0]
    gen = torch.Generator().manual_seed(0)
    state[name][torch.rand(state[name].shape, generator=gen) < share] = 0.0
    return student_model(target.teacher, state)


def test_drop_standard_error_is_mcnemars(digits_target):
    model = _damaged(digits_target)
    f = digits_target.fidelity(model, "validation")
    split = digits_target.require("validation")
    with torch.no_grad():
        t_right = (digits_target.teacher(split.inputs).argmax(-1) == split.labels).numpy()
        s_right = (model(split.inputs).argmax(-1) == split.labels).numpy()
    n = len(t_right)
    b = int((t_right & ~s_right).sum())  # only the teacher right
    c = int((~t_right & s_right).sum())  # only the student right
    assert b + c > 0, "the damage should change some answers"
    assert f.metric_drop == pytest.approx(100.0 * (b - c) / n)
    # var of the +-100 / 0 differences with ddof=1, over n: McNemar's discordant counts
    oracle = 100.0 * math.sqrt(((b + c) - (b - c) ** 2 / n) / (n - 1) / n)
    assert f.metric_drop_se == pytest.approx(oracle)
    # the teacher against itself: no differences, no error
    assert digits_target.fidelity(digits_target.teacher, "validation").metric_drop_se == 0.0


def test_divergence_standard_error_is_over_its_samples(digits_target):
    model = _damaged(digits_target)
    f = digits_target.fidelity(model, "validation")
    split = digits_target.require("validation")
    with torch.no_grad():
        per = digits_target.divergence(digits_target.teacher(split.inputs),
                                       model(split.inputs)).double()
    assert f.divergence == pytest.approx(float(per.mean()))
    assert f.divergence_se == pytest.approx(float(per.std() / math.sqrt(len(per))))


def test_builtin_accuracy_values_are_its_per_sample_mean(digits_target):
    split = digits_target.require("validation")
    with torch.no_grad():
        out = _damaged(digits_target)(split.inputs)
    value, per = digits_target.metric.evaluate(out, out, split.labels)
    assert value == float(accuracy_batched(out.unsqueeze(0), split.labels)[0])
    assert set(np.unique(per)) <= {0.0, 100.0} and per.mean() == pytest.approx(value)


def _with_metric(target, fn):
    view = copy.copy(target)
    view.metric = Metric("agreement", "tests:agreement", fn, "maximize", "%")
    view._teacher_metric = {}
    return view


def test_a_metric_of_one_number_has_no_standard_error(digits_target):
    def one_number(t, s, labels):
        return float((t.argmax(-1) == s.argmax(-1)).double().mean() * 100)

    def per_sample(t, s, labels):
        return (t.argmax(-1) == s.argmax(-1)).double() * 100

    model = _damaged(digits_target)
    scalar = _with_metric(digits_target, one_number)
    assert not scalar.has_per_sample_metric("validation")
    f = scalar.fidelity(model, "validation")
    assert math.isnan(f.metric_drop_se) and math.isfinite(f.divergence_se)
    samples = _with_metric(digits_target, per_sample)
    assert samples.has_per_sample_metric("validation")
    g = samples.fidelity(model, "validation")
    assert g.metric_drop == pytest.approx(f.metric_drop)
    assert g.metric_drop_se > 0
