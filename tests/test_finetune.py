"""Fine-tuning with masks that move: the plan's survivor counts and bits hold exactly at the
end, masks move, pruned weights are exactly zero, and the student gets closer to the teacher."""

import pytest
import torch

from moecomp.apply import apply_plan, student_state_dict
from moecomp.errors import ConfigError
from moecomp.finetune import (
    OPTIMIZERS,
    Diverged,
    MaskSchedule,
    _rigl_update,
    cubic_count,
    distil,
    finetune_settings,
    resolve_optimizer,
    top_mask,
)
from moecomp.plan import CompressionPlan, LayerPlan
from moecomp.solution import student_model


@pytest.fixture(scope="module")
def plan_layers(digits_target):
    """A 90 %-sparse 3-bit plan of the digits MLP (magnitude masks) and its student."""
    t = digits_target
    w = t.weights()
    ranks = {n: torch.argsort(torch.argsort(v.abs().reshape(-1))).reshape(v.shape)
             for n, v in w.items()}
    plan = CompressionPlan({n: LayerPlan(0.9 if i < 2 else 0.7, 3)
                            for i, n in enumerate(t.layer_names)})
    layers = apply_plan(plan, w, ranks)
    state = student_state_dict(t.student_base(), layers)
    return plan, layers, state


def _train(t, n=256):
    return t.pool.take(slice(0, n))


@pytest.mark.parametrize("mode", ["gradual", "rigl"])
def test_moving_masks_end_at_the_plans_counts_and_bits(digits_target, plan_layers, mode):
    t = digits_target
    plan, layers, state = plan_layers
    bits = {n: lp.bits for n, lp in plan.layers.items()}
    kinds = dict.fromkeys(bits, "uniform")
    model = student_model(t.teacher, state)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = distil(model, t, layers, bits, _train(t), epochs=2, batch_size=32, seed=0,
                 masks=MaskSchedule(mode, update_every=2), quantizers=kinds, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    q = res.quantized(bits, kinds)
    moved = 0
    for n, ql in layers.items():
        assert int(res.masks[n].sum()) == ql.n_kept  # exactly the plan's survivors
        assert torch.count_nonzero(res.weights[n][~res.masks[n]]) == 0
        assert q[n].n_kept == ql.n_kept and q[n].n_levels <= 2 ** bits[n]
        assert torch.equal(q[n].mask, res.masks[n])
        moved += int((res.masks[n] != ql.mask).sum())
    assert moved > 0


def test_fixed_masks_stay_and_the_student_improves(digits_target, plan_layers):
    t = digits_target
    plan, layers, state = plan_layers
    bits = {n: lp.bits for n, lp in plan.layers.items()}
    kinds = dict.fromkeys(bits, "uniform")
    model = student_model(t.teacher, state)
    res = distil(model, t, layers, bits, _train(t, 512), epochs=2, batch_size=32,
                 quantizers=kinds, progress=False)  # masks fixed by default
    w, q = res.weights, res.quantized(bits, kinds)
    for n, ql in layers.items():
        assert torch.equal(q[n].mask, ql.mask)
        assert torch.count_nonzero(w[n][~ql.mask]) == 0
    tuned = student_model(t.teacher, t.round_dense(student_state_dict(
        {k: w.get(k, v) for k, v in state.items()}, q)))
    assert t.fidelity(tuned, "validation").divergence < \
        t.fidelity(model, "validation").divergence


def test_sgd_fine_tunes_at_its_default_rate_and_differs_from_adam(digits_target, plan_layers):
    """optimizer = sgd: the student gets closer to the teacher with the masks fixed; no lr is
    the table's default (bit-identical to passing it), and Adam's weights differ."""
    t = digits_target
    plan, layers, state = plan_layers
    bits = {n: lp.bits for n, lp in plan.layers.items()}
    kinds = dict.fromkeys(bits, "uniform")
    model = student_model(t.teacher, state)
    kw = dict(epochs=2, batch_size=32, quantizers=kinds, progress=False)
    sgd = distil(model, t, layers, bits, _train(t, 512), optimizer="sgd", **kw)
    same = distil(model, t, layers, bits, _train(t, 512), optimizer="sgd",
                  lr=OPTIMIZERS["sgd"], **kw)
    adam = distil(model, t, layers, bits, _train(t, 512), **kw)
    assert all(torch.equal(sgd.weights[k], same.weights[k]) for k in sgd.weights)
    assert any(not torch.equal(sgd.weights[k], adam.weights[k]) for k in layers)
    q = sgd.quantized(bits, kinds)
    for n, ql in layers.items():
        assert torch.equal(q[n].mask, ql.mask)
        assert torch.count_nonzero(sgd.weights[n][~ql.mask]) == 0
    tuned = student_model(t.teacher, t.round_dense(student_state_dict(
        {k: sgd.weights.get(k, v) for k, v in state.items()}, q)))
    assert t.fidelity(tuned, "validation").divergence < \
        t.fidelity(model, "validation").divergence


def test_a_diverging_run_stops_at_the_first_weight_not_finite(digits_target, plan_layers):
    t = digits_target
    plan, layers, state = plan_layers
    bits = {n: lp.bits for n, lp in plan.layers.items()}
    with pytest.raises(Diverged, match="diverged at step") as err:
        distil(student_model(t.teacher, state), t, layers, bits, _train(t, 512), epochs=2,
               batch_size=32, optimizer="sgd", lr=1e6, progress=False)
    assert 1 <= err.value.step < err.value.steps == 32


@pytest.mark.parametrize("optimizer,lr,field,says", [
    ("rmsprop", None, "optimizer", "adam, sgd"),
    ("sgd", 0.0, "lr", "> 0"),
    ("adam", float("nan"), "lr", "> 0"),
    ("adam", -1e-3, "lr", "> 0"),
])
def test_optimizer_and_rate_are_validated(optimizer, lr, field, says):
    with pytest.raises(ConfigError, match=says) as err:
        resolve_optimizer(optimizer, lr)
    assert err.value.field == field
    assert resolve_optimizer("adam", None) == 2e-3 and resolve_optimizer("sgd", 0.1) == 0.1


@pytest.mark.parametrize("kw,field", [
    ({"finetune_epochs": -1}, "finetune_epochs"),
    ({"finetune_epochs": 0, "masks": "gradual"}, "masks"),
    ({"finetune_epochs": 0, "repair_masks": True}, "repair_masks"),
    ({"finetune_epochs": 0, "optimizer": "sgd"}, "optimizer"),
    ({"finetune_epochs": 2, "lr": -1.0}, "lr"),
])
def test_finetune_settings_refuse_what_would_be_ignored_or_wrong(kw, field):
    with pytest.raises(ConfigError) as err:
        finetune_settings(**kw)
    assert err.value.field == field


def test_finetune_settings_resolve_the_schedule_and_rate():
    schedule, lr = finetune_settings(3, masks="gradual", repair_masks=True, optimizer="sgd")
    assert (schedule.mode, schedule.repair, lr) == ("gradual", True, OPTIMIZERS["sgd"])
    assert finetune_settings(0) == (MaskSchedule(), OPTIMIZERS["adam"])


def test_gradual_start_keeps_the_plans_survivors(digits_target, plan_layers):
    """start = 0.5: the first masks hold every plan survivor plus the largest others, half
    the plan's sparsity; zero epochs then prune straight to the plan's counts."""
    from moecomp.finetune import _start_masks

    t = digits_target
    _, layers, state = plan_layers
    params = {k: v.clone() for k, v in state.items() if k in layers}
    masks = _start_masks(params, {n: ql.mask for n, ql in layers.items()}, t.weights(), 0.5,
                         {})
    for n, ql in layers.items():
        assert bool(masks[n][ql.mask].all())
        assert int(masks[n].sum()) == ql.numel - round(0.5 * (ql.numel - ql.n_kept))
        assert torch.equal(params[n][masks[n] & ~ql.mask], t.weights()[n][masks[n] & ~ql.mask])


def test_schedule_helpers():
    assert [cubic_count(100, 10, s, 10) for s in (0, 5, 10, 20)] == [100, 21, 10, 10]
    assert cubic_count(100, 10, 0, 0) == 10
    s = torch.tensor([[3.0, 1.0], [2.0, 5.0]])
    assert torch.equal(top_mask(s, 2), torch.tensor([[True, False], [False, True]]))
    assert not top_mask(s, 0).any()
    w = torch.tensor([0.0, 0.1, 2.0, 0.0, -3.0, 0.0])
    m = w != 0
    g = torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0, -1.0])
    new = _rigl_update(w, m, g, 0.34)  # one of three swapped: 0.1 out, |g| = 5 in
    assert new.tolist() == [False, False, True, True, True, False]


@pytest.mark.parametrize("field,kw", [("masks", {"mode": "random"}),
                                      ("masks.prune_end", {"prune_end": 0.0}),
                                      ("masks.start", {"start": 1.5}),
                                      ("masks.update_every", {"update_every": -1}),
                                      ("masks.regrow", {"regrow": 2.0}),
                                      ("masks.repair", {"repair": "yes"})])
def test_schedule_is_validated(field, kw):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        MaskSchedule(**kw)


def test_repair_moves_survivors_off_dead_units_before_training(digits_target, plan_layers):
    """A plan whose first hidden layer computes nothing for 16 units while the next layer
    still reads them: the repair moves those readers (and nothing else is lost), each tensor
    keeps its count, and the moved positions start from the teacher's weights."""
    from moecomp.structured import coupled_tensors, wasted_units

    t = digits_target
    plan, layers, state = plan_layers
    a, b = t.layer_names[0], t.layer_names[1]
    dead = torch.arange(16)
    masks = {n: ql.mask.reshape(ql.shape).clone() for n, ql in layers.items()}
    kept_a = masks[a].clone()
    kept_a[dead] = False
    # the dead rows' survivors go to other rows of A, so A keeps its count
    free = (~kept_a).clone()
    free[dead] = False
    extra = int(masks[a].sum()) - int(kept_a.sum())
    kept_a.view(-1)[free.reshape(-1).nonzero().flatten()[:extra]] = True
    masks[a] = kept_a
    assert int(masks[b][:, dead].sum()) > 0  # B still reads the dead units
    broken = {n: type(ql)(ql.shape, masks[n].reshape(ql.mask.shape), ql.indices[:0], ql.codebook)
              for n, ql in layers.items()}
    bits = {n: lp.bits for n, lp in plan.layers.items()}
    kinds = dict.fromkeys(bits, "uniform")
    model = student_model(t.teacher, state)
    res = distil(model, t, broken, bits, _train(t), epochs=0, batch_size=32,
                 masks=MaskSchedule("fixed", repair=True), quantizers=kinds, progress=False)
    pairs = coupled_tensors(t.teacher, t.calib.inputs[:2], list(masks))
    assert (a, b) in pairs
    assert res.repaired >= int(masks[b][:, dead].sum())
    for n in masks:
        m = res.masks[n].reshape(masks[n].shape)
        assert int(m.sum()) == int(masks[n].sum())
        assert torch.count_nonzero(res.weights[n][~m]) == 0
        gained = m & ~masks[n]
        assert torch.equal(res.weights[n][gained], t.weights()[n][gained])
    after = {n: res.masks[n].reshape(masks[n].shape) for n in masks}
    for (x, y), w in wasted_units(after, pairs).items():  # no survivor on them
        assert not after[x][w].any() and not after[y][:, w].any()
    assert not after[b][:, dead].any()
    # units nobody reads have their biases zeroed, and any value there changes no output
    from moecomp.structured import read_units

    bias = a.removesuffix("weight") + "bias"
    unread = ~read_units(after[b], after[a].shape[0])
    assert unread.any() and not res.weights[bias][unread].any()
    other = dict(res.weights)
    other[bias] = res.weights[bias].clone()
    other[bias][unread] = torch.randn(int(unread.sum()))
    x = t.val.inputs[:64]
    with torch.no_grad():
        assert torch.equal(student_model(t.teacher, res.weights)(x),
                           student_model(t.teacher, other)(x))
