"""Structured removal: units and filters nobody reads leave the dense model; its outputs equal
the masked model's (PyTorch as the oracle), shapes shrink (the next layer's inputs too), and a
fresh model resized from the record loads the shrunk weights."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from safetensors.torch import load_file, load_model
from torch import nn

from moecomp.apply import apply_plan
from moecomp.codec import write_mcz
from moecomp.fold import close
from moecomp.plan import CompressionPlan, LayerPlan
from moecomp.relevance.base import scores_to_ranks
from moecomp.solution import dense_tensors, student_model
from moecomp.structured import (
    Coupling,
    coupled_tensors,
    find_couplings,
    repair_masks,
    resize,
    shrink,
    wasted_units,
)
from moecomp.zoo import MLP, LeNet5


def _x(shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _equal_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert close(a(x), b(x), rtol=1e-5)


def _seeded(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def test_mlp_dead_units_leave_with_their_constants_moved():
    m = _seeded(MLP(), 0)
    with torch.no_grad():
        m.hidden[0].weight[:10] = 0            # dead rows: relu(bias) constants ...
        m.hidden[0].bias[:5] = 0.4             # ... positive: moved into hidden.1's bias
        m.hidden[0].bias[5:10] = -0.4          # ... zero after the ReLU: nothing to move
        m.hidden[1].weight[:, 20:50] = 0       # units nobody reads
        m.out.weight[:, :7] = 0                # hidden.1 units nobody reads
    x = _x((32, 64))
    assert find_couplings(m, x) == [Coupling("hidden.0", "hidden.1", 1),
                                    Coupling("hidden.1", "out", 1)]
    s, rec = shrink(m, x)
    _equal_outputs(m, s, _x((200, 64), 1))
    assert s.hidden[0].weight.shape == (128 - 40, 64) and s.hidden[0].out_features == 88
    assert s.hidden[1].weight.shape == (57, 88) and s.hidden[1].in_features == 88
    assert s.out.weight.shape == (10, 57)
    assert rec.kept["hidden.0"] == list(range(10, 20)) + list(range(50, 128))
    assert rec.params_after == sum(p.numel() for p in s.parameters()) < rec.params_before
    assert not torch.equal(s.hidden[1].bias, m.hidden[1].bias[7:])  # constants moved in
    # a fresh model resized from the record loads the shrunk state
    fresh = resize(MLP(), json.loads(json.dumps(rec.to_dict()))["shapes"])
    fresh.load_state_dict(s.state_dict())
    _equal_outputs(s, fresh.eval(), x)


def test_lenet5_filters_and_units_leave():
    m = _seeded(LeNet5(), 1)
    with torch.no_grad():
        m.conv1.weight[:4] = 0
        m.conv1.bias[:4] = 0.5          # constant maps into conv2 (no padding): bias moves
        m.conv2.weight[:12] = 0         # constant channels into fc1 (16 columns each)
        m.conv2.weight[:, 10:13] = 0    # conv1 filters 10..12 nobody reads
        m.fc2.weight[:, :300] = 0       # fc1 units nobody reads
    x = _x((16, 1, 28, 28))
    assert find_couplings(m, x) == [Coupling("conv1", "conv2", 1), Coupling("conv2", "fc1", 16),
                                    Coupling("fc1", "fc2", 1)]
    s, rec = shrink(m, x)
    _equal_outputs(m, s, _x((64, 1, 28, 28), 2))
    assert s.conv1.weight.shape == (13, 1, 5, 5) and s.conv2.weight.shape == (38, 13, 5, 5)
    assert s.fc1.weight.shape == (200, 38 * 16) and s.fc2.weight.shape == (10, 200)
    assert rec.shapes["conv2.bias"] == [38]


@pytest.mark.parametrize("seed", range(6))
def test_repair_masks_spends_no_survivor_on_a_unit_that_cannot_matter(seed):
    """Random sparse masks of LeNet-5 (conv -> conv -> flattened fc -> fc): after the repair
    every tensor keeps its count, no survivor sits on a wasted unit (where there was room),
    every survivor that ends on a useful unit was kept, and those added are the best free
    positions by score."""
    m = LeNet5()
    x = _x((4, 1, 28, 28))
    names = [f"{c}.weight" for c in ("conv1", "conv2", "fc1", "fc2")]
    pairs = coupled_tensors(m, x, names)
    assert pairs == [("conv1.weight", "conv2.weight"), ("conv2.weight", "fc1.weight"),
                     ("fc1.weight", "fc2.weight")]
    g = torch.Generator().manual_seed(seed)
    params = dict(m.named_parameters())
    density = {"conv1.weight": 0.5, "conv2.weight": 0.05, "fc1.weight": 0.01,
               "fc2.weight": 0.3}
    masks = {n: torch.rand(params[n].shape, generator=g) < density[n] for n in names}
    masks["conv2.weight"][:, :2] = False    # conv1 filters 0, 1 nobody reads
    masks["fc1.weight"][:5] = False         # fc1 units 0..4 compute nothing
    scores = {n: torch.rand(params[n].shape, generator=g) for n in names}
    before = sum(int(w.sum()) for w in wasted_units(masks, pairs).values())
    out, moved = repair_masks(masks, pairs, scores)
    assert moved > 0 and before > 0
    wasted = wasted_units(out, pairs)
    for n in names:
        assert int(out[n].sum()) == int(masks[n].sum())
        assert not (out[n] & ~masks[n] & (scores[n] < 0)).any()
    allowed = {n: torch.ones_like(out[n]) for n in names}
    for (a, b), w in wasted.items():
        assert not out[a][w].any() and not out[b].reshape(
            out[b].shape[0], w.numel(), -1)[:, w].any()
        allowed[a].view(w.numel(), -1)[w] = False
        allowed[b].view(out[b].shape[0], w.numel(), -1)[:, w] = False
    for n in names:
        assert bool((out[n] | ~(masks[n] & allowed[n])).all())  # useful survivors kept
        added, free = out[n] & ~masks[n], allowed[n] & ~out[n]
        if added.any() and free.any():
            assert float(scores[n][added].min()) >= float(scores[n][free].max())


def test_repair_masks_leaves_a_tensor_without_room():
    """fc2 is so dense that the units fc1 still computes cannot hold its survivors: it keeps
    its mask; fc1's rows nobody would read are not emptied toward it."""
    w1 = torch.zeros(6, 4, dtype=torch.bool)
    w1[:3] = True                                  # units 3..5 compute nothing
    w2 = torch.ones(5, 6, dtype=torch.bool)        # 30 survivors, room for 15 only
    out, moved = repair_masks({"a": w1, "b": w2}, [("a", "b")],
                              {"a": torch.rand(6, 4), "b": torch.rand(5, 6)})
    assert moved == 0 and torch.equal(out["b"], w2) and torch.equal(out["a"], w1)


def test_constants_into_a_padded_conv_stay():
    """A dead filter with a nonzero constant feeding a padded conv: the border positions read
    zeros, so the constant cannot move into the bias; that filter stays, the one whose
    constant is zero goes."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    m = _seeded(Net(), 2)
    with torch.no_grad():
        m.a.weight[:2] = 0
        m.a.bias[0], m.a.bias[1] = 0.7, -0.7
    x = _x((8, 1, 10, 10))
    s, rec = shrink(m, x)
    assert rec.kept == {"a": [0, 2, 3]}
    _equal_outputs(m, s, x)


def test_units_read_elsewhere_or_sized_by_hand_stay():
    class Residual(nn.Module):
        """fc1's output is read by fc2 and by the skip connection: no coupling. fc3 -> fc4
        is coupled but the forward hard-codes fc3's size: its removal fails the check."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)
            self.fc3, self.fc4 = nn.Linear(6, 8), nn.Linear(8, 3)
            self.act = nn.PReLU(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc1(x)
            h = self.act(self.fc2(torch.relu(h))) + h
            z = torch.relu(self.fc3(h)).reshape(-1, 8)
            return self.fc4(z)

    m = _seeded(Residual(), 3)
    with torch.no_grad():
        m.fc2.weight[:, :3] = 0   # fc1 units 0..2 not read by fc2 (but by the skip)
        m.fc4.weight[:, :4] = 0   # fc3 units 0..3 not read by fc4
    x = _x((8, 6))
    assert find_couplings(m, x) == [Coupling("fc3", "fc4", 1)]
    s, rec = shrink(m, x)
    assert rec.kept == {} and s.fc3.weight.shape == (8, 6)
    _equal_outputs(m, s, x)


@pytest.fixture(scope="module")
def dead_unit_solution(run_ctx):
    """A refined solution of the digits run whose hidden.0 units 0..39 nobody reads."""
    t = run_ctx.target
    w = {k: v.clone() for k, v in t.weights().items()}
    w["hidden.1.weight"][:, :40] = 0
    ranks = {n: scores_to_ranks(v.abs()) for n, v in w.items()}
    plan = CompressionPlan({"hidden.0.weight": LayerPlan(0.8, 4),
                            "hidden.1.weight": LayerPlan(0.8, 4), "out.weight": LayerPlan(0.3, 5)})
    layers = apply_plan(plan, w, ranks)
    from moecomp.apply import student_state_dict

    state = student_state_dict(t.student_base(), layers)
    folder = run_ctx.run.path / "refined"
    folder.mkdir(exist_ok=True)
    write_mcz(folder / "r90.mcz", layers, dense_tensors(state, layers, dtype=torch.float16),
              plan=plan.to_dict(), meta={"parent": "hand"}, order=list(state))
    return "r90"


def test_structured_export_shrinks_safetensors_and_onnx(run_ctx, dead_unit_solution, cli,
                                                        tmp_path):
    code, out, err = cli("export", str(run_ctx.run.path), "--solution", dead_unit_solution,
                         "--out", str(tmp_path / "d.mcz"), "--structured", "--onnx")
    assert code == 0, err
    assert "structured" in out
    rec = json.loads((tmp_path / "d.structured.json").read_text())
    kept = rec["kept"]["hidden.0"]  # 0..39 and the units 80 % sparsity left unread
    assert min(kept) >= 40 and len(kept) <= 88
    n = len(kept)
    st = load_file(tmp_path / "d.structured.safetensors")
    assert st["hidden.0.weight"].shape == (n, 64) and st["hidden.1.weight"].shape[1] == n
    graph = onnx.load(str(tmp_path / "d.structured.onnx")).graph
    dims = {tuple(i.dims) for i in graph.initializer}
    assert (n, 64) in dims and (128, 64) not in dims
    # what the JSON says a user does: a fresh model, resized, loads it and computes the same
    fresh = resize(MLP(), rec["shapes"])
    load_model(fresh, str(tmp_path / "d.structured.safetensors"))
    decoded = student_model(run_ctx.target.teacher, run_ctx.solution(dead_unit_solution).state)
    _equal_outputs(decoded, fresh.eval(), run_ctx.target.test.inputs)
