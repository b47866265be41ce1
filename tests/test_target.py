import pytest
import torch
from torch import nn

from moecomp.config import problem_from_dict
from moecomp.divergence import Divergence
from moecomp.errors import ConfigError
from moecomp.target import build_target, load_weights, select_layers
from moecomp.zoo import LeNet5, LeNet300


def divergence(t, s, kind):
    """Mean divergence over the samples (per student when ``s`` has a leading axis)."""
    d = kind if isinstance(kind, Divergence) else Divergence(kind)
    return d.batched(t, s).mean(-1) if s.dim() > t.dim() else d(t, s).mean()


def test_default_selection_is_linear_and_conv_weights():
    refs = select_layers(LeNet5())
    assert [r.name for r in refs] == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    assert refs[0].shape == (20, 1, 5, 5) and refs[0].numel == 500


@pytest.mark.parametrize(
    ("kw", "names"),
    [
        ({"include": ["fc1.weight"]}, ["fc1.weight"]),
        ({"include": ["fc2"]}, ["fc2.weight"]),
        ({"include": [r"fc[12]\.weight"]}, ["fc1.weight", "fc2.weight"]),
        ({"exclude": ["fc3"]}, ["fc1.weight", "fc2.weight"]),
        ({"types": [nn.Conv2d]}, None),
    ],
)
def test_include_exclude_types(kw, names):
    if names is None:
        with pytest.raises(ConfigError, match="no compressible tensor"):
            select_layers(LeNet300(), **kw)
        return
    assert [r.name for r in select_layers(LeNet300(), **kw)] == names


def test_entry_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match="matches no weight"):
        select_layers(LeNet300(), include=["fc9"])


def test_divergences_are_zero_on_identity_and_positive_otherwise():
    t = torch.randn(50, 10)
    s = t + 0.5 * torch.randn(50, 10)
    for kind in ("kl", "nmse", "cosine"):
        assert float(divergence(t, t, kind)) == pytest.approx(0.0, abs=1e-6)
        assert float(divergence(t, s, kind)) > 0
    batch = torch.stack([t, s])
    assert torch.allclose(divergence(t, batch, "kl"),
                          torch.stack([divergence(t, t, "kl"), divergence(t, s, "kl")]))
    oracle = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1),
                                        log_target=True, reduction="batchmean")
    assert float(divergence(t, s, "kl")) == pytest.approx(float(oracle), rel=1e-5)


def test_user_model_target_from_factory_and_torch_file(tmp_path, monkeypatch):
    mod = tmp_path / "mymodels.py"
    mod.write_text("from torch import nn\n"
                   "def tiny():\n"
                   "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),"
                   " nn.Linear(16, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    model = importlib.import_module("mymodels").tiny()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    p = problem_from_dict({"name": "user", "model": {"factory": "mymodels:tiny",
                                                      "weights": str(tmp_path / "w.pt")},
                           "data": {"calibration": 32}})
    t = build_target(p, progress=False)
    assert t.layer_names == ["1.weight", "3.weight"]
    assert t.teacher_out.shape == (32, 10)
    assert torch.equal(t.weights()["1.weight"], model[1].weight)


def test_weights_file_that_is_not_a_state_dict_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"a": [1, 2, 3]}, bad)
    with pytest.raises(ConfigError, match="state dict of tensors"):
        load_weights(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="weights-only"):
        load_weights(junk)


def test_round_dense_rounds_only_uncompressed_floats(digits_target):
    assert digits_target.dense_dtype == "float16"  # problems/digits-mlp.toml
    base = digits_target.student_base()
    for k, v in digits_target.state_dict().items():
        assert base[k].dtype == v.dtype
        if k in digits_target.layer_names:
            assert base[k] is v or torch.equal(base[k], v)
        else:
            assert torch.equal(base[k], v.half().float())
    assert any(not torch.equal(base[k], v) for k, v in digits_target.state_dict().items())


def test_dense_dtype_names_its_choices():
    with pytest.raises(ConfigError, match=r"layers\.dense_dtype.*float16"):
        problem_from_dict({"name": "x", "model": {"zoo": "mlp-digits"},
                           "data": {"dataset": "digits"}, "layers": {"dense_dtype": "float8"}})
