"""Layer-wise reconstruction: least-squares oracle, GPTQ rounding, masks and codebooks kept."""

import re

import pytest
import torch
from torch import nn

from moecomp.apply import apply_layer, student_state_dict
from moecomp.errors import ConfigError
from moecomp.quantize import uniform_quantize
from moecomp.reconstruct import _fit_layer, _statistics, fit_row, reconstruct
from moecomp.refine import refine
from moecomp.solution import student_model


def _problem(seed: int = 0, n: int = 400, m: int = 12):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs: the case where rounding one weight should move the others
    x = torch.randn(n, m, generator=g, dtype=torch.float64) @ torch.randn(
        m, m, generator=g, dtype=torch.float64)
    y = x @ torch.randn(m, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        n, generator=g, dtype=torch.float64)
    return x, y


def test_unquantised_fit_is_least_squares():
    x, y = _problem()
    w = fit_row(x.T @ x, x.T @ y, None, damp=0.0)
    oracle = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(w, oracle, rtol=1e-6, atol=1e-8)


def _relu_features(seed: int, n: int = 1000, m: int = 64):
    """Inputs like a hidden layer's: non-negative, correlated through a few shared factors."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    z = torch.randn(n, m, generator=g, dtype=f64) + torch.randn(
        n, 4, generator=g, dtype=f64) @ torch.randn(4, m, generator=g, dtype=f64)
    x = torch.relu(z)
    y = x @ (0.3 * torch.randn(m, generator=g, dtype=f64)) + 0.1 * torch.randn(
        n, generator=g, dtype=f64)
    return x, y


@pytest.mark.parametrize("seed", range(4))
def test_gptq_rounding_lands_on_the_codebook_and_beats_plain_rounding(seed):
    x, y = _relu_features(seed)
    h, g = x.T @ x, x.T @ y
    ls = fit_row(h, g, None, damp=0.0)
    codebook = uniform_quantize(ls.float(), 2)[1].to(torch.float64)
    w = fit_row(h, g, codebook)
    assert torch.isin(w, codebook).all()
    plain = codebook[(ls.unsqueeze(1) - codebook).abs().argmin(1)]
    assert ((x @ w - y) ** 2).sum() < 0.8 * ((x @ plain - y) ** 2).sum()


def test_free_inputs_are_not_rounded():
    x, y = _problem()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    codebook = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    w = fit_row(x.T @ x, x.T @ y, codebook, n_free=1)
    assert torch.isin(w[:-1], codebook).all()
    assert not torch.isin(w[-1:], codebook).any()


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1, stride=2)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    teacher = Tiny().eval()
    # smooth images: neighbouring pixels correlate, so kept weights can stand in for pruned
    # ones (with white noise inputs there is nothing to compensate with)
    coarse = torch.randn(256, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    return teacher, nn.functional.interpolate(coarse, size=8, mode="bilinear")


def test_conv_statistics_recover_the_teacher(tiny):
    """With the teacher's own inputs and every weight kept, the least-squares fit is the
    teacher: checks the unfold layout against torch's conv2d."""
    teacher, x = tiny
    mod = teacher.conv
    h, g, _, _ = _statistics(teacher, teacher, mod, mod, x, 100, "conv.bias")
    w = mod.weight.detach()
    full = apply_layer(w, torch.zeros(w.shape, dtype=torch.int64), sparsity=0.0, bits=8)
    fitted = _fit_layer(h, g, full, None, True, 0.0)
    torch.testing.assert_close(fitted[:, :-1].float(), w.reshape(6, -1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fitted[:, -1].float(), mod.bias.detach(), atol=1e-4, rtol=1e-4)


def _compressed(teacher: nn.Module, sparsity: float, bits: int):
    state = teacher.state_dict()
    layers = {}
    for name in ("conv.weight", "fc.weight"):
        w = state[name]
        rank = torch.argsort(torch.argsort(w.abs().reshape(-1))).reshape(w.shape)
        layers[name] = apply_layer(w, rank, sparsity=sparsity, bits=bits)
    return layers, student_state_dict(state, layers)


def test_reconstruction_keeps_masks_and_codebooks_and_lowers_the_error(tiny):
    teacher, x = tiny
    layers, state = _compressed(teacher, 0.7, 2)
    new_layers, new_state, fits = reconstruct(
        teacher, state, layers, lambda _n, v: uniform_quantize(v, 2)[1], x)
    assert torch.is_grad_enabled()  # the caller's grad mode survives
    assert [f.name for f in fits] == ["conv.weight", "fc.weight"]
    for f in fits:
        assert f.mse_after <= f.mse_before
    assert fits[0].mse_after < 0.8 * fits[0].mse_before
    assert fits[1].mse_after < 0.5 * fits[1].mse_before
    for name, ql in new_layers.items():
        assert torch.equal(ql.mask, layers[name].mask)
        assert ql.n_levels <= 4
        w = new_state[name]
        assert torch.count_nonzero(w[~ql.mask]) == 0
        assert torch.isin(w[ql.mask], ql.codebook).all()
    assert not torch.equal(new_state["conv.bias"], state["conv.bias"])
    with torch.no_grad():
        ref = teacher(x)
        before = ((student_model(teacher, state)(x) - ref) ** 2).mean()
        after = ((student_model(teacher, new_state)(x) - ref) ** 2).mean()
    assert after < before


def test_refine_with_reconstruction_lowers_calibration_divergence(run_ctx):
    ctx = run_ctx
    plain = refine(ctx, 2, merge=False, metric="divergence", progress=False)
    rebuilt = refine(ctx, 2, merge=False, reconstruct=True, calibration=512,
                     metric="divergence", progress=False)
    assert rebuilt.reconstructed and not plain.reconstructed
    assert rebuilt.fidelity_before < plain.fidelity_before
    child, parent = ctx.solution(rebuilt.key), ctx.solution(2)
    for n, ql in parent.layers.items():
        assert torch.equal(ql.mask, child.layers[n].mask)
        assert child.layers[n].n_levels <= 2 ** parent.plan.layers[n].bits


def test_cli_refine_reconstructs_and_names_a_bad_calibration(run_ctx):
    from typer.testing import CliRunner

    from moecomp.cli import app

    run = str(run_ctx.run.path)
    ok = CliRunner().invoke(app, ["refine", run, "--solution", "1", "--reconstruct",
                                  "--calibration", "256", "--no-merge-bins"])
    assert ok.exit_code == 0, ok.output
    key = re.search(r"(r\d+) \(from solution 1\)", ok.output).group(1)
    assert run_ctx.solution(key).parent == "1"
    bad = CliRunner().invoke(app, ["refine", run, "--solution", "1", "--reconstruct",
                                   "--calibration", "0"])
    # main() prints a MoecompError as one line; the runner hands back the exception itself
    assert isinstance(bad.exception, ConfigError) and "calibration" in str(bad.exception)
