"""The automatic chain split (prefix cache stages) against the model's own forward, with
PyTorch as the oracle: every split found must give the model's outputs for any student."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from moecomp import inputs as inputs_mod
from moecomp.evaluate.chain import Stage, check_chain, find_chain
from moecomp.target import select_layers
from moecomp.zoo import MLP, LeNet5, LeNet300

USERPKG = Path(__file__).parent / "userpkg"
sys.path.insert(0, str(USERPKG))  # only while importing: later problems import their own
import usermodels  # noqa: E402

sys.path.remove(str(USERPKG))

TYPES = ("Linear", "Conv2d", "Embedding")


def setup(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tensors = {n: p.detach() for n, p in model.named_parameters()}
    tensors.update(dict(model.named_buffers()))
    return tensors, [r.name for r in select_layers(model, types=TYPES)]


def run_chain(stages: list[Stage], tensors: dict[str, torch.Tensor],
              student: dict[str, torch.Tensor], x: inputs_mod.Inputs) -> torch.Tensor:
    """The stages one after the other, each given the student's weights of its reads."""
    y = x
    for st in stages:
        reads = set(st.reads or ())
        y = st.fn(y, {n: student[n] if n in reads else tensors[n] for n in st.params})
    return y


def random_student(tensors: dict[str, torch.Tensor], layers: list[str], seed: int
                   ) -> dict[str, torch.Tensor]:
    """Each compressible weight pruned at a random share and rounded to 3 bits."""
    g = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for n in layers:
        w = tensors[n]
        keep = torch.rand(w.shape, generator=g) < float(torch.rand(1, generator=g))
        step = float(w.abs().max()) / 4 or 1.0
        out[n] = torch.where(keep, torch.round(w / step) * step, torch.zeros(()))
    return out


def assert_chain_is_the_model(model: nn.Module, x: inputs_mod.Inputs, *, output=None,
                              batch_size: int = 7) -> list[Stage]:
    tensors, layers = setup(model)
    found = find_chain(model, x, tensors, layers, output=output, batch_size=batch_size)
    assert found.stages is not None, found.reason
    assert check_chain(found.stages, model, x, tensors, layers, output) is None
    # every compressible layer is read by some stage
    assert set(layers) <= {n for st in found.stages for n in st.reads or ()}
    from moecomp import outputs as outputs_mod
    for seed in range(3):
        student = random_student(tensors, layers, seed)
        with torch.no_grad():
            ref = outputs_mod.select(inputs_mod.functional(model, student, x), output)
            got = run_chain(found.stages, tensors, student, x)
        for a, b in zip(outputs_mod.tensors(got), outputs_mod.tensors(ref), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    return found.stages


@pytest.mark.parametrize(("cls", "shape", "bounds"), [
    (MLP, (20, 64), "hidden.1, out"),
    (LeNet300, (20, 1, 28, 28), "fc2, fc3"),
    (LeNet5, (20, 1, 28, 28), "conv2, fc1, fc2"),
])
def test_zoo_models_split_before_every_layer(cls, shape, bounds):
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(*shape)
    stages = assert_chain_is_the_model(model, x)
    tensors, layers = setup(model)
    found = find_chain(model, x, tensors, layers, output=None, batch_size=7)
    assert found.reason.endswith(f"boundaries before {bounds}")
    assert [st.reads for st in stages] == [(n,) for n in layers]


def test_encoder_splits_at_its_blocks_with_keyword_inputs():
    """Embeddings, then the block (an attention mask read by every stage is not part of the
    chain), a structured (dict) output narrowed to one part."""
    model = usermodels.encoder()
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(0, usermodels.VOCAB, (20, usermodels.SEQ), generator=g),
         "attention_mask": (torch.rand(20, usermodels.SEQ, generator=g) > 0.2).long()}
    stages = assert_chain_is_the_model(model, x, output="pooled")
    assert len(stages) >= 2


def test_tied_output_layer_reads_the_embedding_in_the_last_stage():
    model = usermodels.tied_lm()
    x = torch.randint(0, usermodels.VOCAB, (20, usermodels.SEQ))
    stages = assert_chain_is_the_model(model, x)
    assert stages[0].reads == ("embed.weight",)
    assert "embed.weight" in (stages[-1].reads or ())


def test_a_stage_missing_a_weight_it_reads_is_caught():
    model = usermodels.tied_lm()
    x = torch.randint(0, usermodels.VOCAB, (20, usermodels.SEQ))
    tensors, layers = setup(model)
    found = find_chain(model, x, tensors, layers, output=None, batch_size=7)
    assert found.stages is not None
    last = found.stages[-1]
    broken = [*found.stages[:-1], Stage(last.params, last.fn, ("mix.weight",))]
    problem = check_chain(broken, model, x, tensors, layers, None)
    assert problem is not None and "perturbed student" in problem


class Fork(nn.Module):
    """Two heads read one hidden state: no call is a boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h) * self.c(h)


def test_a_fork_is_no_chain():
    model = Fork()
    tensors, layers = setup(model)
    found = find_chain(model, torch.randn(20, 6), tensors, layers, output=None, batch_size=7)
    assert found.stages is None and "no module call is a chain boundary" in found.reason


class Block(nn.Module):
    """A pre-norm residual block: the skip connection inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.f(h)


class Residual(nn.Module):
    """Residual blocks in a ModuleList, a module called twice (shared), a ``try``/``except
    Exception`` around a block, and a head after mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for blk in self.blocks:
            try:
                h = blk(h)
            except Exception:  # a model's own error handling must not catch the halt
                raise
        h = h + self.shared(torch.tanh(self.shared(h)))
        return self.head(h.mean(1))


class OuterSkip(Residual):
    """The skip connection written around each block in the parent's forward: the block's
    input is still needed after it, so no block call is a boundary (and ``shared`` is never
    read)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for blk in self.blocks:
            h = h + blk.f(h)
        return self.head(h.mean(1))


def test_skip_connections_shared_modules_and_except_blocks():
    torch.manual_seed(1)
    model = Residual()
    stages = assert_chain_is_the_model(model, torch.randn(20, 4, 5), batch_size=6)
    reads = [st.reads for st in stages]
    # a stage per block; the module called twice stays inside one stage
    # a stage per block; the module called twice is no boundary: the last block's stage
    # holds it
    assert reads == [("inp.weight",), ("blocks.0.f.1.weight",), ("blocks.1.f.1.weight",),
                     ("blocks.2.f.1.weight", "shared.weight"), ("head.weight",)]


def test_a_skip_connection_around_a_block_call_is_no_boundary():
    torch.manual_seed(1)
    model = OuterSkip()
    tensors, layers = setup(model)
    found = find_chain(model, torch.randn(20, 4, 5), tensors, layers, output=None,
                       batch_size=6)
    # only the head (after pooling, where nothing else is live) splits off
    assert found.stages is not None, found.reason
    assert found.reason.endswith("boundaries before head")


def test_too_few_samples_or_no_chain_give_a_reason():
    model = LeNet300()
    tensors, layers = setup(model)
    few = find_chain(model, torch.randn(3, 784), tensors, layers, output=None, batch_size=7)
    assert few.stages is None and "fewer than 4" in few.reason
    single = nn.Sequential(nn.Linear(4, 2))
    t1, l1 = setup(single)
    one = find_chain(single, torch.randn(8, 4), t1, l1, output=None, batch_size=7)
    assert one.stages is None


class MaskFirst(nn.Module):
    """A weight-free module builds a per-sample scale from the inputs before the layers;
    every layer reads it: it must run as it is in every stage, never as a zero stand-in."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Softplus()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale(x[:, :1])
        h = torch.relu(self.a(x)) * s
        h = torch.relu(self.b(h)) * s
        return self.c(h) * s


def test_weight_free_calls_before_a_boundary_run_as_they_are():
    torch.manual_seed(2)
    stages = assert_chain_is_the_model(MaskFirst(), torch.randn(20, 6))
    assert [st.reads for st in stages] == [("a.weight",), ("b.weight",), ("c.weight",)]
