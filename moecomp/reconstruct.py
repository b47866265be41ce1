"""Layer-wise reconstruction: re-fit the survivors of a compressed model without training.

Post-training, gradient-free (the OBC / GPTQ family, Frantar & Alistarh 2022). Layers are
taken in the order the forward pass calls them; for each one:

1. the student's inputs to the layer (earlier layers already reconstructed) and the
   teacher's output of the same layer on the same images give a least-squares problem
   ``min ||X_s W^T + b - Y_t||^2`` per output row, over that row's surviving weights and
   the bias (the mask is kept: pruned weights stay exactly zero);
2. the survivors are quantised one at a time onto the layer's codebook, each rounding
   error pushed onto the not-yet-quantised survivors of its row and its bias through the
   inverse Hessian (GPTQ's error feedback), so the row's output error stays least-squares
   optimal given the choices made so far.

Targets are the teacher's outputs on the teacher's own inputs, so errors of earlier layers
are corrected, not copied. Only ``Linear`` and ``Conv2d`` (groups 1) layers are re-fitted;
any other compressed tensor is left as it is.

Devices: the forwards and the float64 sums of ``X^T X`` run where the teacher is (inputs are
moved there batch by batch); the per-row solves and the rounding run on the CPU, so the
returned layers and state are CPU tensors wherever the teacher ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from moecomp import inputs as inputs_mod
from moecomp.apply import QuantizedLayer, student_state_dict
from moecomp.errors import ConfigError
from moecomp.inputs import Inputs
from moecomp.solution import student_model
from moecomp.target import load_state

Grid = Callable[[str, torch.Tensor], torch.Tensor]
"""``grid(name, values (m,)) -> codebook (k,)``: the levels a layer's survivors may take."""


@dataclass(frozen=True)
class LayerFit:
    """How one layer's reconstruction went: output MSE on the calibration images (per
    output element, against the teacher's output) of the compressed layer before and
    after, both on the student's inputs. A layer whose fit is not better is kept as it
    was, so ``mse_after <= mse_before``."""

    name: str
    mse_before: float
    mse_after: float


# --- the maths: one row ------------------------------------------------------------------

def fit_row(h: torch.Tensor, g: torch.Tensor, codebook: torch.Tensor | None, *,
            n_free: int = 0, damp: float = 0.01) -> torch.Tensor:
    """Least-squares weights of one output row, then GPTQ quantisation onto ``codebook``.

    h: (m, m) float64 ``X^T X`` of the row's m inputs (survivors first, then ``n_free``
        unquantised inputs such as the bias's column of ones); g: (m,) ``X^T y``.
    codebook: sorted float (k,) levels, or None to return the unquantised fit.
    damp: share of the mean diagonal added to the diagonal (numerical safety, and it keeps
        dead inputs at zero).
    Returns (m,) float64: the first ``m - n_free`` entries lie on the codebook.
    """
    m = h.shape[0]
    diag = torch.diagonal(h)
    h = h + torch.eye(m, dtype=h.dtype) * (damp * float(diag.mean()) + 1e-12)
    chol = torch.linalg.cholesky(h)
    w = torch.cholesky_solve(g.unsqueeze(1), chol).squeeze(1)
    if codebook is None or m == n_free:
        return w
    # upper Cholesky factor of H^-1: row i holds how the later weights absorb error i
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    cb = codebook.to(torch.float64)
    mids = (cb[1:] + cb[:-1]) / 2
    for i in range(m - n_free):
        q = cb[torch.bucketize(w[i], mids)]
        err = (w[i] - q) / u[i, i]
        w[i + 1:] -= err * u[i, i + 1:]
        w[i] = q
    return w


def nearest(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of sorted ``codebook`` (k,) for each of ``values`` (m,)."""
    mids = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(values.to(codebook.dtype), mids)


# --- statistics of one layer -------------------------------------------------------------

def _columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of a matrix whose columns match ``weight.reshape(out, -1)``."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    assert isinstance(module, nn.Conv2d) and not isinstance(module.padding, str)
    cols = nn.functional.unfold(x, module.kernel_size, dilation=module.dilation,
                                padding=module.padding, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _outputs(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The layer's output as rows (one per sample and position), columns = output units."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def _captured(model: nn.Module, module: nn.Module, x: Inputs, batch_size: int
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of ``module`` for each batch of ``x`` run through ``model``."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.append((inputs[0].detach(), out.detach()))

    # no grad-mode switch in here: two of these generators interleave, and a context
    # manager across a yield would leave the caller's grad mode wrong; the caller holds it
    handle = module.register_forward_hook(hook)
    device = _device(model)
    try:
        for _, xb in inputs_mod.batches(x, batch_size):
            seen.clear()
            inputs_mod.call(model, inputs_mod.to(xb, device))
            if len(seen) != 1:
                raise ConfigError("reconstruct", f"{type(module).__name__} is called "
                                  f"{len(seen)} times per forward; only layers called "
                                  "once can be reconstructed")
            yield seen[0]
    finally:
        handle.remove()


def _call_order(model: nn.Module, names: list[str], x: Inputs) -> list[str]:
    """``names`` (module names) in the order one forward pass calls them."""
    order: list[str] = []
    handles = [model.get_submodule(n).register_forward_hook(
        lambda *_a, n=n: order.append(n)) for n in names]
    try:
        with torch.no_grad():
            inputs_mod.call(model, inputs_mod.to(inputs_mod.head(x, 1), _device(model)))
    finally:
        for h in handles:
            h.remove()
    return [n for i, n in enumerate(order) if n not in order[:i]]


def _device(model: nn.Module) -> torch.device:
    """Where ``model`` runs: its first parameter's device (the CPU without parameters)."""
    return next(iter(model.parameters()), torch.empty(0)).device


def _fittable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Conv2d) and module.groups == 1
        and module.padding_mode == "zeros" and isinstance(module.padding, tuple))


# --- the whole model ---------------------------------------------------------------------

def reconstruct(teacher: nn.Module, state: dict[str, torch.Tensor],
                layers: dict[str, QuantizedLayer], grid: Grid, x: Inputs, *,
                batch_size: int = 1024, damp: float = 0.01, progress: bool = False
                ) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor], list[LayerFit]]:
    """Re-fit every compressed Linear / Conv2d weight (and its bias) of a student.

    teacher: the fp32 model (not modified), on the device the forwards run on; state: the
    student's state_dict (CPU tensors); layers: its
    compressed tensors (masks are kept); grid: the levels each layer may use, computed from
    its least-squares survivors (e.g. the plan's quantizer with the plan's bits);
    x: calibration inputs (any structure, ``moecomp.inputs``), never the validation or test
    split.
    Returns the new layers, the new state_dict (biases re-fitted) and one ``LayerFit`` per
    re-fitted layer.
    """
    if inputs_mod.n_samples(x) == 0:
        raise ConfigError("reconstruct", "needs at least one calibration input")
    student = student_model(teacher, state)
    modules = {n.rsplit(".", 1)[0]: n for n in layers if n.endswith(".weight")}
    modules = {m: n for m, n in modules.items() if _fittable(teacher.get_submodule(m))
               and teacher.get_submodule(m).weight is dict(teacher.named_parameters())[n]}
    new_layers = dict(layers)
    new_state = dict(state)
    fits = []
    order = _call_order(teacher, list(modules), x)
    for mod_name in tqdm(order, desc="reconstruct", disable=not progress):
        name = modules[mod_name]
        t_mod, s_mod = teacher.get_submodule(mod_name), student.get_submodule(mod_name)
        bias = f"{mod_name}.bias" if getattr(t_mod, "bias", None) is not None else None
        h, g, yy, n_rows = _statistics(teacher, student, t_mod, s_mod, x, batch_size, bias)
        h, g, yy = h.cpu(), g.cpu(), yy.cpu()  # the solves run on the CPU (see the module doc)
        ql = layers[name]
        mask = ql.mask.reshape(ql.shape[0], -1)
        w_old = state[name].reshape(ql.shape[0], -1).to(torch.float64)
        b_old = state[bias].to(torch.float64) if bias else None
        mse_before = _mse(h, g, yy, n_rows, w_old, b_old)
        # the grid comes from the unrounded fit, as the plan's quantizer would place it
        ls = _fit_layer(h, g, ql, None, bias is not None, damp)
        codebook = torch.sort(grid(name, (ls[:, :-1] if bias else ls)[mask].float())).values
        fitted = _fit_layer(h, g, ql, codebook, bias is not None, damp)
        w_new = fitted[:, :-1] if bias else fitted
        idx = nearest(w_new[mask], codebook.to(torch.float64))
        layer = QuantizedLayer(ql.shape, ql.mask, idx, codebook)
        w_q = layer.dequantize().reshape(ql.shape[0], -1).to(torch.float64)
        b_q = fitted[:, -1] if bias else None
        mse_after = _mse(h, g, yy, n_rows, w_q, b_q)
        # never worse than where it started, layer by layer (a mildly compressed layer can
        # already sit closer to the teacher than the rounded least-squares fit)
        if mse_after < mse_before:
            new_layers[name] = layer
            if bias:
                assert b_q is not None
                new_state[bias] = b_q.to(state[bias].dtype)
            new_state = student_state_dict(new_state, {name: layer})
            load_state(student, new_state)
        fits.append(LayerFit(name, mse_before, min(mse_after, mse_before)))
    return new_layers, new_state, fits


@torch.no_grad()
def _statistics(teacher: nn.Module, student: nn.Module, t_mod: nn.Module, s_mod: nn.Module,
                x: Inputs, batch_size: int, bias: str | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``H = X^T X`` (d, d), ``G = X^T Y`` (d, out) and ``diag(Y^T Y)`` (out,) in float64,
    with X the student's layer inputs (plus a column of ones if the layer has a bias) and
    Y the teacher's layer outputs; also the number of rows summed."""
    h = g = yy = None
    n = 0
    for (xs, _), (_, yt) in zip(_captured(student, s_mod, x, batch_size),
                                _captured(teacher, t_mod, x, batch_size), strict=True):
        cols = _columns(s_mod, xs).to(torch.float64)
        if bias:
            cols = torch.cat([cols, torch.ones(len(cols), 1, dtype=torch.float64,
                                               device=cols.device)], dim=1)
        y = _outputs(t_mod, yt).to(torch.float64)
        h = cols.T @ cols if h is None else h.addmm_(cols.T, cols)
        g = cols.T @ y if g is None else g.addmm_(cols.T, y)
        yy = (y * y).sum(0) if yy is None else yy.add_((y * y).sum(0))
        n += len(cols)
    assert h is not None and g is not None and yy is not None
    return h, g, yy, n


def _fit_layer(h: torch.Tensor, g: torch.Tensor, ql: QuantizedLayer,
               codebook: torch.Tensor | None, has_bias: bool, damp: float) -> torch.Tensor:
    """(out, d) fitted weights (+ bias column) of one layer, zero outside the mask."""
    out_dim = ql.shape[0]
    mask = ql.mask.reshape(out_dim, -1)
    d = h.shape[0]
    w = torch.zeros(out_dim, d, dtype=torch.float64)
    for j in range(out_dim):
        support = torch.nonzero(mask[j]).squeeze(1)
        # largest input energy first (GPTQ's "act order"): the inputs that matter most are
        # rounded while the most freedom is left to absorb their error
        support = support[torch.argsort(torch.diagonal(h)[support], descending=True)]
        if has_bias:
            support = torch.cat([support, torch.tensor([d - 1])])
        if len(support) == 0:
            continue
        w[j, support] = fit_row(h[support][:, support], g[support, j], codebook,
                                n_free=int(has_bias), damp=damp)
    return w


def _mse(h: torch.Tensor, g: torch.Tensor, yy: torch.Tensor, n: int, w: torch.Tensor,
         b: torch.Tensor | None) -> float:
    """Mean squared output error ``||X W^T - Y||^2 / (n * out)`` from the statistics."""
    wa = torch.cat([w, b.unsqueeze(1)], dim=1) if b is not None else w
    sse = (wa @ h * wa).sum() - 2 * (wa * g.T).sum() + yy.sum()
    return float(sse) / (n * len(yy))
