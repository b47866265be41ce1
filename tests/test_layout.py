"""Convolutions run channels-last on the CPU (moecomp.inputs.channels_last): the same outputs
and gradients as the model's own layout, the layout really used, tied weights and vmap left
working."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from moecomp import inputs as inputs_mod
from moecomp.zoo import LeNet5


def _conv_output_layouts(model: nn.Module, run) -> list[bool]:  # noqa: ANN001
    """Per Conv2d call of ``run()``: whether its output came out channels-last."""
    seen: list[bool] = []
    hooks = [m.register_forward_hook(
        lambda _m, _a, out: seen.append(out.stride(1) == 1 and out.shape[1] > 1))
        for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_call_and_functional_match_the_models_own_layout() -> None:
    torch.manual_seed(0)
    model = LeNet5().eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        assert _conv_output_layouts(model, lambda: model(x)) == [False, False]
        # conv1's weight has one input channel: NCHW and channels-last are the same bytes,
        # and the strides must still be set for the convolution to run channels-last
        assert _conv_output_layouts(model, lambda: inputs_mod.call(model, x)) == [True, True]
        assert torch.allclose(inputs_mod.call(model, x), ref, atol=1e-5, rtol=1e-4)
        student = {k: v * 0.5 for k, v in model.named_parameters()}
        assert torch.allclose(inputs_mod.functional(model, student, x),
                              functional_call(model, student, (x,)), atol=1e-5, rtol=1e-4)
        with inputs_mod.own_layout():
            assert _conv_output_layouts(model, lambda: inputs_mod.call(model, x)) == \
                [False, False]
            assert torch.equal(inputs_mod.call(model, x), ref)


def test_gradients_reach_the_given_weights() -> None:
    """Fine-tuning differentiates through the channels-last copy: the gradients of the
    given tensors are those of a plain functional_call."""
    torch.manual_seed(0)
    model = LeNet5()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    grads = []
    for fn in (inputs_mod.functional, lambda m, p, xs: functional_call(m, p, (xs,))):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
        nn.functional.cross_entropy(fn(model, p, x), y).backward()
        grads.append(p)
    for k in grads[0]:
        g0, g1 = grads[0][k].grad, grads[1][k].grad
        assert g0 is not None and g1 is not None
        assert torch.allclose(g0, g1, atol=1e-5, rtol=1e-3), k


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_tied_weights_get_one_copy() -> None:
    """A weight two convolutions share is one tensor under both names, given under one name
    or neither; functional_call would refuse two different values."""
    torch.manual_seed(0)
    model = _Tied()
    x = torch.randn(2, 3, 6, 6)
    w = torch.randn_like(model.a.weight)
    with torch.no_grad():
        assert torch.allclose(inputs_mod.call(model, x), model(x), atol=1e-5)
        got = inputs_mod.functional(model, {"a.weight": w}, x)
        assert torch.allclose(got, functional_call(model, {"a.weight": w}, (x,)), atol=1e-5)
    copies = inputs_mod.channels_last(model, {"a.weight": w})
    assert set(copies) == {"a.weight", "b.weight"} and copies["a.weight"] is copies["b.weight"]


def test_vmap_is_left_alone() -> None:
    """Under vmap the weights are batched tensors: no copy, the batched result is the loop's."""
    torch.manual_seed(0)
    model = LeNet5().eval()
    x = torch.randn(4, 1, 28, 28)
    ws = torch.randn(3, *model.conv2.weight.shape) * 0.1
    with torch.no_grad():
        batched = torch.vmap(
            lambda w: inputs_mod.functional(model, {"conv2.weight": w}, x))(ws)
        loop = torch.stack([functional_call(model, {"conv2.weight": w}, (x,)) for w in ws])
    assert torch.allclose(batched, loop, atol=1e-5, rtol=1e-4)
