"""BatchNorm folding: the folded teacher gives the original's outputs (PyTorch as the oracle),
the BatchNorm's tensors are gone, folds that would not be exact are not made, and a decoded
file loads into a fresh model given the recorded folds."""

from __future__ import annotations

import copy
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from moecomp.codec import read_mcz
from moecomp.config import LayersConfig, problem_from_dict
from moecomp.export import export_solution
from moecomp.fold import FoldedBatchNorm, apply_folds, fold_batchnorm, folds_of
from moecomp.runs import METRICS, RunFolder, atomic_write_csv, solutions_frame
from moecomp.solution import RunContext
from moecomp.target import load_state, make_target

USERPKG = Path(__file__).parent / "userpkg"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(USERPKG))
import userdata  # noqa: E402
import usermodels  # noqa: E402

sys.path.remove(str(USERPKG))


def _trained_stats(model: nn.Module, seed: int) -> nn.Module:
    """BatchNorm statistics and affine parameters as a trained net has them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1, generator=g)
                m.running_var.uniform_(0.3, 3, generator=g)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.uniform_(-0.5, 0.5, generator=g)
    return model.eval()


def _assert_same(a, b, rtol=1e-5):
    ta = a if isinstance(a, torch.Tensor) else a.logits
    tb = b if isinstance(b, torch.Tensor) else b.logits
    assert ta.shape == tb.shape
    assert float((ta - tb).abs().max()) <= rtol * float(ta.abs().max())


def test_bn_net_folds_to_equal_outputs():
    model = usermodels.bn_net()
    x = userdata.image_splits()["calibration"][0]
    folded, folds = fold_batchnorm(model, x)
    assert [f.to_dict() for f in folds] == [{"norm": "bn", "into": "conv", "bias_added": False}]
    assert isinstance(folded.bn, FoldedBatchNorm) and isinstance(model.bn, nn.BatchNorm2d)
    with torch.no_grad():
        a, b = model(x), folded(x)
    _assert_same(a, b)
    _assert_same(a.hidden, b.hidden)
    assert not any(k.startswith("bn.") for k in folded.state_dict())


def test_make_target_folds_by_default_and_not_when_told():
    t = make_target(usermodels.bn_net(), userdata.image_splits(), output="logits")
    assert [r.name for r in t.layers] == ["conv.weight", "fc.weight"]
    assert not any(k.startswith("bn.") for k in t.state_dict())
    kept = make_target(usermodels.bn_net(), userdata.image_splits(), output="logits",
                       layers=LayersConfig(fold_batchnorm=False))
    assert "bn.running_var" in kept.state_dict()
    _assert_same(kept.teacher_out, t.teacher_out)


class _ConvBNBlocks(nn.Module):
    """The examples' conv net shape: conv(no bias)-BN-ReLU-pool blocks, then two Linears,
    plus a Linear-BatchNorm1d pair."""

    def __init__(self) -> None:
        super().__init__()
        blocks = []
        for c_in, c_out in ((1, 6), (6, 8)):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        self.fc1 = nn.Linear(8 * 2 * 2, 12)
        self.bn1 = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn1(self.fc1(self.features(x).flatten(1)))))


def _examples_convbn() -> nn.Module | None:
    path = REPO / "examples" / "convbn" / "net.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("convbn_net", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build()


@pytest.mark.parametrize("which", ["blocks", "examples/convbn"])
def test_conv_bn_nets_fold_to_equal_outputs(which):
    model = _ConvBNBlocks() if which == "blocks" else _examples_convbn()
    if model is None:
        pytest.skip("examples/convbn is not in this checkout")
    model = _trained_stats(model, 0)
    x = torch.rand(16, 1, 28 if which != "blocks" else 8, 28 if which != "blocks" else 8,
                   generator=torch.Generator().manual_seed(1))
    folded, folds = fold_batchnorm(model, x)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(folds) == n_bn and all(f.bias_added == (f.into != "fc1") for f in folds)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        _assert_same(model(x), folded(x))
    # a fresh model given the record loads the folded state and computes the same
    fresh = apply_folds(_ConvBNBlocks() if which == "blocks" else _examples_convbn(),
                        folds_of(folded))
    load_state(fresh, folded.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), folded(x))


class _Shared(nn.Module):
    """BatchNorms that must not be folded: the conv output also read by the residual, a
    view in between, an in-place change in between, a 3-D Linear output, a BN in training
    mode, a tied conv weight."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.c2, self.b2 = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm1d(2 * 4 * 4)
        self.c3, self.b3 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.l4, self.b4 = nn.Linear(16, 16), nn.BatchNorm1d(2)
        self.c5, self.b5 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.c6, self.b6 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.c7 = nn.Conv2d(2, 2, 1)
        self.c7.weight = self.c6.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        h = self.b1(y) + y                                      # y read twice
        h2 = self.b2(self.c2(h).flatten(1)).reshape(h.shape)    # a view in between
        z = self.c3(h2)
        z.add_(1.0)                                             # in place in between
        h3 = self.b3(z)
        h4 = self.b4(self.l4(h3.flatten(2)))                    # (n, 2, 16): channels are dim 1
        h5 = self.b5(self.c5(h4.reshape(h3.shape)))             # b5 stays in training mode
        return self.b6(self.c6(h5)) + self.c7(h5)               # c6's weight is tied


def test_folds_that_would_not_be_exact_are_not_made():
    model = _trained_stats(_Shared(), 2)
    model.b5.train()
    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x)
    folded, folds = fold_batchnorm(model, x)
    assert folds == [] and folded is model
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_a_fold_the_check_refuses_is_dropped_alone():
    """Structure allows both folds, but the forward reads bn2's statistics elsewhere: the
    numerical check keeps the first fold only."""

    class Peek(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.n1 = nn.Linear(4, 4), nn.BatchNorm1d(4)
            self.l2, self.n2 = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.n2(self.l2(torch.relu(self.n1(self.l1(x)))))
            return h + getattr(self.n2, "running_mean", torch.zeros(4)).sum()

    model = _trained_stats(Peek(), 4)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(5))
    folded, folds = fold_batchnorm(model, x)
    assert [f.norm for f in folds] == ["n1"]
    with torch.no_grad():
        _assert_same(model(x), folded(x))


def test_export_of_a_folded_target_records_the_folds(tmp_path):
    """The whole path: problem file -> folded target -> exported .mcz with meta.folded ->
    a fresh user model with apply_folds loads the decoded state and gives the export's
    outputs."""
    for f in USERPKG.glob("*.py"):
        shutil.copy(f, tmp_path)
    problem = problem_from_dict({
        "name": "bn", "model": {"factory": "usermodels:bn_net"},
        "data": {"factory": "userdata:image_splits"}, "objectives": {"output": "logits"},
        "folder": str(tmp_path)})
    run = RunFolder(tmp_path / "run")
    run.write_problem(problem)
    names = ["conv.weight", "fc.weight"]
    df = solutions_frame(np.arange(1), 0, names, np.array([[0.3, 0.5]]), np.array([[4, 3]]),
                         {m: np.zeros(1) for m in METRICS})
    atomic_write_csv(run.file("evaluated.csv"), df)
    atomic_write_csv(run.file("front.csv"), df)
    ctx = RunContext(run)
    r = export_solution(ctx, 0, out=tmp_path / "s0.mcz", safetensors=True)
    decoded = read_mcz(r.mcz)
    assert decoded.meta["folded"] == [{"norm": "bn", "into": "conv", "bias_added": False}]
    assert not any(k.startswith("bn.") for k in decoded.state_dict)
    fresh = apply_folds(usermodels.bn_net(), decoded.meta["folded"])
    load_state(fresh, {k: v.float() for k, v in decoded.state_dict.items()})
    exported = copy.deepcopy(ctx.target.teacher)
    load_state(exported, ctx.solution(0).state)
    x = userdata.image_splits()["test"][0]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x).logits, exported(x).logits)
