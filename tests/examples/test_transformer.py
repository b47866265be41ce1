"""examples/transformer: encoder factories, corpus, data factory, metrics and training."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F


@pytest.fixture(scope="module")
def ex(example):
    return {m: example("transformer", m)
            for m in ("corpus", "encoder", "data", "metrics", "train")}


@pytest.fixture(scope="module")
def parts(ex):
    return ex["data"].splits()


def seeded(factory, seed: int = 0) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().eval()


# --- encoder -------------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "at_least"), [("small", 5_000_000), ("base", 20_000_000)])
def test_factories_reach_their_parameter_counts(ex, size, at_least):
    model = ex["encoder"].FACTORIES[size]()
    assert ex["encoder"].n_params(model) >= at_least
    kinds = {type(m) for m in model.modules()}
    assert nn.MultiheadAttention not in kinds and {nn.Linear, nn.Embedding} <= kinds
    attn = model.blocks[0].attn
    assert all(isinstance(getattr(attn, p), nn.Linear) for p in "qkvo")


@pytest.mark.parametrize(("size", "rows"), [("small", 64), ("base", 8)])
def test_forward_on_data_returns_pooled_embeddings(ex, parts, size, rows):
    model = seeded(ex["encoder"].FACTORIES[size])
    inputs, labels = parts["calibration"]
    assert labels is None
    with torch.no_grad():
        out = model(**{k: v[:rows] for k, v in inputs.items()})
    assert out.shape == (rows, model.cfg.d_model) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_padding_does_not_change_the_embedding(ex, parts):
    model = seeded(ex["encoder"].small)
    inputs, _ = parts["test"]
    lengths = inputs["attention_mask"].sum(1)
    row = int(torch.argmin(lengths))  # the shortest sequence: the most padding
    n = int(lengths[row])
    with torch.no_grad():
        padded = model(inputs["input_ids"][row:row + 1], inputs["attention_mask"][row:row + 1])
        trimmed = model(inputs["input_ids"][row:row + 1, :n],
                        inputs["attention_mask"][row:row + 1, :n])
    torch.testing.assert_close(padded, trimmed, atol=1e-5, rtol=1e-5)


# --- corpus and tokenizer -------------------------------------------------------------------

def test_tokenize_known_answer(ex):
    assert ex["corpus"].tokenize("Return x**2, (maybe)!") == [
        "return", "x", "*", "*", "2", ",", "(", "maybe", ")", "!"]


def test_build_vocab_orders_by_frequency_then_alphabet(ex):
    c = ex["corpus"]
    v = c.build_vocab(["b a b c", "c b d"], size=len(c.SPECIALS) + 3)
    assert v == c.SPECIALS + ("b", "c", "a")
    assert c.encode("b z", v) == [4, c.UNK]


def test_vocabulary_is_deterministic_and_full(ex):
    c = ex["corpus"]
    v = c.vocab()
    assert len(v) == c.VOCAB_SIZE == len(set(v))
    assert v[:4] == c.SPECIALS and (c.PAD, c.UNK, c.CLS, c.MASK) == (0, 1, 2, 3)
    assert c.build_vocab(c.documents(), c.VOCAB_SIZE) == v


def test_pad_known_answer(ex):
    c = ex["corpus"]
    ids, mask = c.pad([(7, 8), (9,)], length=4)
    assert ids.tolist() == [[c.CLS, 7, 8, c.PAD], [c.CLS, 9, c.PAD, c.PAD]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match="shorter"):
        c.pad([(1, 2, 3)], length=3)


# --- data factory -----------------------------------------------------------------------------

def test_splits_structure(ex, parts):
    c, d = ex["corpus"], ex["data"]
    assert set(parts) == {"calibration", "validation", "test"}
    sizes = {"calibration": d.N_CALIBRATION, "validation": d.N_VALIDATION, "test": d.N_TEST}
    for name, (inputs, labels) in parts.items():
        assert labels is None and set(inputs) == {"input_ids", "attention_mask"}
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        assert ids.shape == mask.shape == (sizes[name], c.MAX_LEN)
        assert ids.dtype == mask.dtype == torch.int64
        assert set(mask.unique().tolist()) == {0, 1}
        lengths = mask.sum(1)
        # the mask is a prefix of ones; padding is [PAD] exactly where the mask is 0
        assert torch.equal(mask, (torch.arange(c.MAX_LEN) < lengths[:, None]).long())
        assert torch.equal(ids == c.PAD, mask == 0)
        assert (ids[:, 0] == c.CLS).all() and not (ids[:, 1:] == c.CLS).any()
        assert int(lengths.min()) >= 1 + c.MIN_TOKENS and int(lengths.max()) <= c.MAX_LEN
        assert len(lengths.unique()) > 20  # real, variable lengths
        assert float(lengths.float().mean()) < 0.75 * c.MAX_LEN  # real padding


def test_splits_are_disjoint_and_calibration_is_training_text(ex, parts):
    def rows(name):
        return {tuple(r) for r in parts[name][0]["input_ids"].tolist()}

    cal, val, test = rows("calibration"), rows("validation"), rows("test")
    assert len(cal) == ex["data"].N_CALIBRATION  # no repeated sequence within a split
    assert not (cal & val) and not (cal & test) and not (val & test)
    train = {tuple(r) for r in ex["corpus"].pad(ex["data"].training_segments(),
                                                length=ex["corpus"].MAX_LEN)[0].tolist()}
    assert cal <= train and not (val & train) and not (test & train)


# --- metrics ----------------------------------------------------------------------------------

def test_one_minus_cosine_matches_torch(ex):
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(50, 16, generator=g), torch.randn(50, 16, generator=g)
    d = ex["metrics"].one_minus_cosine(t, s)
    assert d.shape == (50,)
    torch.testing.assert_close(d, 1 - F.cosine_similarity(t, s, dim=-1))
    torch.testing.assert_close(ex["metrics"].one_minus_cosine(t, 3 * t), torch.zeros(50),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(ex["metrics"].one_minus_cosine(t, -t), torch.full((50,), 2.0))


def test_neighbour_agreement_of_the_teacher_with_itself_is_100(ex):
    t = torch.randn(300, 32, generator=torch.Generator().manual_seed(1))
    assert ex["metrics"].neighbour_agreement(t, t, None) == 100.0
    assert ex["metrics"].neighbour_agreement(t, 2 * t + 0, torch.zeros(300)) == 100.0


def test_neighbour_agreement_known_answers(ex):
    m = ex["metrics"]
    # Teacher: two tight pairs on two axes; 0 <-> 1 and 2 <-> 3 are each other's neighbours.
    t = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert m.nearest_neighbours(t).tolist() == [1, 0, 3, 2]
    # Student swaps the roles of samples 1 and 2: 0 <-> 2 and 1 <-> 3 now pair up.
    s = t[[0, 2, 1, 3]]
    assert m.nearest_neighbours(s).tolist() == [2, 3, 0, 1]
    assert m.neighbour_agreement(t, s) == 0.0
    # Moving only sample 3 onto sample 0's axis: 0 and 1 pick 3, 2 picks 1, 3 picks 0.
    s = t.clone()
    s[3] = torch.tensor([1.0, 0.01])
    assert m.nearest_neighbours(s).tolist() == [3, 3, 1, 0]
    assert m.neighbour_agreement(t, s) == 0.0
    # Moving sample 2 between the pairs: its neighbour becomes 1 (was 3); 0, 1 and 3 keep
    # theirs (1, 0 and 2): 3 of 4 agree.
    s = t.clone()
    s[2] = torch.tensor([0.6, 0.4])
    assert m.nearest_neighbours(s).tolist() == [1, 0, 1, 2]
    assert m.neighbour_agreement(t, s) == 75.0


def test_neighbour_agreement_is_chunk_invariant_and_checks_inputs(ex, monkeypatch):
    m = ex["metrics"]
    g = torch.Generator().manual_seed(2)
    t = torch.randn(101, 8, generator=g)
    s = t + 0.5 * torch.randn(101, 8, generator=g)
    whole = m.neighbour_agreement(t, s)
    assert 0.0 < whole < 100.0
    monkeypatch.setattr(m, "CHUNK", 7)
    assert m.neighbour_agreement(t, s) == whole
    with pytest.raises(ValueError, match="samples"):
        m.neighbour_agreement(t, s[:50])
    with pytest.raises(ValueError, match="at least 2"):
        m.nearest_neighbours(t[:1])


# --- training ---------------------------------------------------------------------------------

def test_a_few_steps_reduce_the_loss(ex):
    tr, enc = ex["train"], ex["encoder"]
    cfg = tr.TrainConfig(steps=6)
    encoder = seeded(enc.small)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = tr.MLMHead(encoder)
    ids, mask = ex["corpus"].pad(ex["data"].training_segments()[:16])

    def measured() -> tuple[float, float]:
        encoder.eval()
        head.eval()
        with torch.no_grad():
            mlm, con = tr.losses(encoder, head, ids, mask, cfg, torch.Generator().manual_seed(5))
        return float(mlm), float(con)

    before = measured()
    opt = torch.optim.AdamW(list(encoder.parameters()) + [head.dense.weight, head.bias], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(cfg.steps):
            encoder.train()
            head.train()
            mlm, con = tr.losses(encoder, head, ids, mask, cfg, gen)
            opt.zero_grad()
            (mlm + con).backward()
            opt.step()
    after = measured()
    # MLM falls; SimCSE's task (find the clean view of a masked sequence) is nearly solved by
    # any encoder, trained or not, so its loss only has to stay far below chance (ln 16).
    assert after[0] < before[0] - 0.5, (before, after)
    assert sum(after) < sum(before) - 0.5 and after[1] < 1.0, (before, after)


def test_masking_follows_bert(ex):
    tr, c = ex["train"], ex["corpus"]
    ids, mask = c.pad([tuple(range(10, 50))] * 200)
    out, targets = tr.mask_tokens(ids, mask, prob=0.15, vocab_size=c.VOCAB_SIZE,
                                  generator=torch.Generator().manual_seed(0))
    chosen = targets != tr.IGNORE
    assert not chosen[:, 0].any() and not chosen[mask == 0].any()
    assert torch.equal(targets[chosen], ids[chosen])
    assert torch.equal(out[~chosen], ids[~chosen])
    share = float(chosen[mask == 1].float().mean())
    assert 0.12 < share < 0.18
    masked = float((out[chosen] == c.MASK).float().mean())
    assert 0.75 < masked < 0.85


def test_halves_known_answer(ex):
    c = ex["corpus"]
    ids, mask = c.pad([tuple(range(10, 22)), (5, 6, 7)])
    first, second = ex["train"].halves({"input_ids": ids, "attention_mask": mask})
    # the 3-token sequence is too short (< 10 tokens) and left out
    assert first["input_ids"].tolist() == [[c.CLS, *range(10, 16)]]
    assert second["input_ids"].tolist() == [[c.CLS, *range(16, 22)]]
    assert first["attention_mask"].tolist() == [[1] * 7]


def test_ensure_teacher_writes_a_loadable_encoder_without_the_head(ex, tmp_path, monkeypatch):
    tr, d = ex["train"], ex["data"]
    # A smaller test split keeps the held-out evaluation of the record quick.
    monkeypatch.setattr(d, "N_TEST", 64)
    path = tr.ensure_teacher(tmp_path / "small" / "teacher.safetensors", steps=2)
    stamp = path.stat().st_mtime_ns
    assert tr.ensure_teacher(path, steps=2).stat().st_mtime_ns == stamp
    state = load_file(str(path))
    assert not any("head" in k or k.startswith("dense") for k in state)
    model = ex["encoder"].small()
    model.load_state_dict(state, strict=True)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    c = ex["corpus"]
    assert meta["vocab_sha256"] == c.vocab_sha256(c.vocab()) and meta["size"] == "small"
    assert (path.parent / "vocab.json").is_file() and (path.parent / "train.json").is_file()
    d.check_teacher(path)
    # A teacher of another vocabulary (another CPython) is refused, and retrained on demand.
    other = tmp_path / "other" / "teacher.safetensors"
    other.parent.mkdir()
    save_file(state, str(other), metadata={"vocab_sha256": "0" * 64})
    with pytest.raises(ValueError, match="retrain"):
        d.check_teacher(other)
    tr.ensure_teacher(other, steps=1)
    d.check_teacher(other)
