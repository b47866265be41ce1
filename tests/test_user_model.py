"""A user's own model, data and fidelity measures: keyword inputs and dict outputs, tied
weights, dataclass outputs, user divergences and label-free metrics, factories named by
problem files, tensor files, and the errors a user meets. The oracle is the naive loop:
copy the teacher, load the student's state, call it on the inputs, measure."""

from __future__ import annotations

import copy
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file, save_model

from moecomp import inputs as inputs_mod
from moecomp import outputs
from moecomp.apply import apply_plan, student_state_dict
from moecomp.config import LayersConfig, load_problem
from moecomp.data import splits_from_dict
from moecomp.divergence import Divergence
from moecomp.errors import ConfigError, DataError, TargetError
from moecomp.evaluate import EvalOptions, Evaluator
from moecomp.relevance.base import scores_to_ranks
from moecomp.runs import plans_from_genes
from moecomp.target import build_target, load_state, make_target

USERPKG = Path(__file__).parent / "userpkg"
sys.path.insert(0, str(USERPKG))  # only while importing: later problems import their own
import userdata  # noqa: E402
import usermodels  # noqa: E402

sys.path.remove(str(USERPKG))

BOTH = LayersConfig(types=("Linear", "Embedding"))


def magnitude_ranks(target):
    return {n: scores_to_ranks(w.abs()) for n, w in target.weights().items()}


def naive(target, ranks, plans):
    """Divergence and metric of each plan, one student at a time, on the calibration set."""
    div, met = [], []
    base = target.student_base()
    for plan in plans:
        student = copy.deepcopy(target.teacher)
        load_state(student, student_state_dict(base, apply_plan(plan, target.weights(), ranks)))
        with torch.no_grad():
            out = outputs.select(inputs_mod.call(student, target.calib.inputs), target.output)
        div.append(float(target.divergence(target.teacher_out, out).double().mean()))
        met.append(np.nan if target.metric is None else
                   target.metric(target.teacher_out, out, target.calib.labels))
    return np.array(div), np.array(met)


def random_plans(target, n, seed):
    rng = np.random.default_rng(seed)
    L = len(target.layers)
    s = np.round(rng.uniform(0, 0.9, (n, L)), 2)
    b = rng.integers(1, 9, (n, L))
    return s, b, plans_from_genes(target.layer_names, s, b)


# --- keyword inputs, dict outputs, user divergence and label-free metric ---------------------
@pytest.fixture(scope="module")
def encoder_target():
    return make_target(usermodels.encoder(), userdata.token_splits(),
                       divergence=userdata.one_minus_cos, output="pooled",
                       metric=userdata.neighbour_agreement, metric_name="neighbour agreement",
                       metric_unit="%", layers=BOTH, batch_size=16)


def test_encoder_target_reads_keyword_inputs_and_selects_embeddings(encoder_target):
    t = encoder_target
    assert isinstance(t.calib.inputs, dict) and set(t.calib.inputs) == {"input_ids",
                                                                        "attention_mask"}
    assert t.layer_names[:2] == ["tok.weight", "pos.weight"]
    assert {r.kind for r in t.layers} == {"Embedding", "Linear"}
    assert t.teacher_out.shape == (len(t.calib), usermodels.DIM)
    assert t.metric is not None and t.metric.name == "neighbour agreement"
    assert t.teacher_metric("calibration") == pytest.approx(100.0)
    assert t.calib.labels is None


def test_standard_errors_on_keyword_inputs_without_labels(encoder_target):
    """Two inputs, no labels, a pooled output and a metric of one number per split: the
    divergence has its standard error over the samples, the drop has none (NaN) and says
    so (compress refuses --confidence on it)."""
    t = encoder_target
    plans = random_plans(t, 1, seed=5)[2]
    student = copy.deepcopy(t.teacher)
    load_state(student, student_state_dict(t.student_base(),
                                           apply_plan(plans[0], t.weights(), magnitude_ranks(t))))
    f = t.fidelity(student, "validation")
    with torch.no_grad():
        out = outputs.select(inputs_mod.call(student, t.val.inputs), t.output)
    per = t.divergence(t.teacher_outputs("validation"), out).double()
    assert f.divergence_se == pytest.approx(float(per.std() / len(per) ** 0.5))
    assert f.divergence_se > 0
    assert np.isnan(f.metric_drop_se) and not t.has_per_sample_metric("validation")


@pytest.mark.parametrize("options", [EvalOptions(), EvalOptions(batched=False)])
def test_evaluator_matches_the_naive_loop_on_keyword_inputs(encoder_target, options):
    t = encoder_target
    ranks = magnitude_ranks(t)
    s, b, plans = random_plans(t, 10, seed=0)
    m = Evaluator(t, ranks, chunk_size=4, options=options).evaluate(s, b)
    div, met = naive(t, ranks, plans)
    np.testing.assert_allclose(m.divergence, div, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m.metric, met)
    np.testing.assert_allclose(m.metric_drop, 100.0 - met)


def test_looped_stages_on_keyword_inputs_and_dict_outputs_match_the_naive_loop(encoder_target):
    """A stage that loops over several students (what "auto" does for convolutions on the
    CPU) stacks structured outputs and reads keyword inputs: every other stage looped here."""
    t = encoder_target
    ranks = magnitude_ranks(t)
    s, b, plans = random_plans(t, 10, seed=1)
    ev = Evaluator(t, ranks, chunk_size=5, options=EvalOptions(batched=True))
    for plan in (ev._students._chain, ev._students._whole):
        if plan is not None:
            plan.batch = [k % 2 == 0 for k in range(len(plan.stages))]
    m = ev.evaluate(s, b)
    div, met = naive(t, ranks, plans)
    np.testing.assert_allclose(m.divergence, div, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m.metric, met)


def test_fused_attention_is_batched_quietly_and_matches_the_naive_loop():
    """An encoder written with F.scaled_dot_product_attention (no vmap batching rule on the
    CPU): the batched evaluator gives the naive loop's numbers, and torch's "performance
    drop ... please file us an issue" warning does not reach the user."""
    t = make_target(usermodels.sdpa_encoder(), userdata.token_splits(),
                    divergence=userdata.one_minus_cos, output="pooled", layers=BOTH,
                    batch_size=16)
    ranks = magnitude_ranks(t)
    s, b, plans = random_plans(t, 6, seed=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m = Evaluator(t, ranks, chunk_size=3, options=EvalOptions(batched=True)).evaluate(s, b)
    assert not [w for w in seen if "performance drop" in str(w.message)]
    div, _ = naive(t, ranks, plans)
    np.testing.assert_allclose(m.divergence, div, rtol=1e-4, atol=1e-6)
    # the warning is torch's, and this model does raise it under vmap (so the test can fail)
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        q = torch.randn(2, 3, 2, 5, 4)  # students, sequences, heads, tokens, head width
        torch.vmap(lambda x: torch.nn.functional.scaled_dot_product_attention(x, x, x))(q)
    assert [w for w in raw if "performance drop" in str(w.message)]


def test_batch_size_never_changes_the_outputs(encoder_target):
    t = encoder_target
    whole = t.run(t.teacher, t.calib.inputs, batch_size=10_000)
    assert torch.allclose(t.run(t.teacher, t.calib.inputs, batch_size=7), whole, atol=1e-6)


def test_builtins_read_the_default_part_of_a_dict_output():
    model = usermodels.encoder()
    x = userdata.token_splits()["calibration"][0]
    out = inputs_mod.call(model, x)
    noisy = {k: v + 0.1 * torch.randn_like(v) for k, v in out.items()}
    got = Divergence("cosine")(out, noisy)
    want = userdata.one_minus_cos(out["pooled"], noisy["pooled"])
    assert torch.allclose(got, want, atol=1e-6)


# --- tied weights --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_target():
    return make_target(usermodels.tied_lm(), userdata.lm_splits(), layers=BOTH)


def test_tied_weights_are_one_compressed_tensor(lm_target):
    t = lm_target
    assert t.layer_names == ["embed.weight", "mix.weight"]
    assert t.tied == {"head.weight": "embed.weight"}
    assert "head.weight" not in t.state_dict()
    # token labels (n, T) and logits (n, T, V): accuracy applies, per token
    assert t.metric is not None and t.metric.name == "accuracy"


def test_tied_student_matches_the_naive_loop_and_stays_tied(lm_target):
    t = lm_target
    ranks = magnitude_ranks(t)
    s, b, plans = random_plans(t, 6, seed=1)
    m = Evaluator(t, ranks).evaluate(s, b)
    div, met = naive(t, ranks, plans)
    np.testing.assert_allclose(m.divergence, div, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m.metric, met)
    student = copy.deepcopy(t.teacher)
    layers = apply_plan(plans[0], t.weights(), ranks)
    load_state(student, student_state_dict(t.student_base(), layers))
    assert student.head.weight is student.embed.weight
    assert torch.equal(student.head.weight, layers["embed.weight"].dequantize())


# --- dataclass outputs, BatchNorm ------------------------------------------------------------
@pytest.mark.parametrize(("output", "fold"), [(None, True), ("logits", True), (None, False)])
def test_dataclass_output_and_batchnorm(output, fold):
    layers = LayersConfig(fold_batchnorm=fold)
    with pytest.warns(RuntimeWarning, match="vmap") if output is None else _no_warning():
        t = make_target(usermodels.bn_net(), userdata.image_splits(), output=output,
                        layers=layers)
        ev = Evaluator(t, magnitude_ranks(t))
    assert t.metric is not None and t.metric.name == "accuracy"  # the "logits" part
    assert [r.name for r in t.layers] == ["conv.weight", "fc.weight"]
    # folded by default (no BatchNorm tensor left to store), kept as they are when asked
    assert ("bn.running_var" in t.state_dict()) is not fold
    s, b, plans = random_plans(t, 5, seed=2)
    m = ev.evaluate(s, b)
    div, met = naive(t, magnitude_ranks(t), plans)
    np.testing.assert_allclose(m.divergence, div, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m.metric, met)


class _no_warning:
    def __enter__(self) -> None:
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._w.__exit__(*exc)


# --- the errors a user meets ------------------------------------------------------------------
def test_a_teacher_that_rejects_the_inputs_is_named_with_split_and_shapes():
    with pytest.raises(TargetError, match=r"calibration inputs \(input \(4, 1, 6, 6\) float32\)"
                       r".*TypeError"):
        make_target(usermodels.encoder(), userdata.image_splits())


def test_splits_with_mismatched_sample_counts_are_refused():
    with pytest.raises(DataError, match=r"split 'validation'.*do not share the leading"):
        make_target(usermodels.encoder(), userdata.mismatched())


def test_a_divergence_of_the_wrong_shape_is_refused():
    with pytest.raises(TargetError, match=r"must return a tensor of shape \(n,\)"):
        make_target(usermodels.encoder(), userdata.token_splits(), output="pooled",
                    divergence=userdata.scalar_divergence)


def test_accuracy_without_labels_and_unknown_outputs_are_config_errors():
    with pytest.raises(ConfigError, match="objectives.metric: accuracy needs integer labels"):
        make_target(usermodels.encoder(), userdata.token_splits(), output="pooled",
                    metric="accuracy")
    with pytest.raises(ConfigError, match=r"objectives.output: 'pooler'.*pooled \(4, 16\)"):
        make_target(usermodels.encoder(), userdata.token_splits(), output="pooler")


def test_no_labels_and_no_metric_means_divergence_alone():
    t = make_target(usermodels.encoder(), userdata.token_splits(), divergence="cosine")
    assert t.metric is None and t.metric_name == "none"
    m = Evaluator(t, magnitude_ranks(t)).evaluate(*random_plans(t, 3, seed=3)[:2])
    assert np.isnan(m.metric).all() and np.isfinite(m.divergence).all()


def test_splits_dict_is_checked():
    good = userdata.token_splits()
    with pytest.raises(DataError, match="missing test"):
        splits_from_dict({k: v for k, v in good.items() if k != "test"}, "f")
    with pytest.raises(DataError, match="pair"):
        splits_from_dict(good | {"test": good["test"][0]}, "f")
    bad = good | {"test": ({"input_ids": good["test"][0]["input_ids"]}, None)}
    with pytest.raises(DataError, match="attention_mask, input_ids; every split must call"):
        splits_from_dict(bad, "f")
    x = torch.zeros(4, 3)
    with pytest.raises(DataError, match=r"\(3,\) labels for 4 samples"):
        splits_from_dict({k: (x, torch.zeros(3)) for k in ("calibration", "validation",
                                                            "test")}, "f")


# --- problem files: factories from the problem's folder, data files -----------------------------
def write_problem(folder: Path, body: str) -> Path:
    f = folder / "problem.toml"
    f.write_text('name = "user"\n' + body)
    return f


@pytest.fixture
def user_folder(tmp_path):
    dst = tmp_path / "proj"
    shutil.copytree(USERPKG, dst)
    return dst


ENCODER_TOML = """
[model]
factory = "usermodels:encoder"
[data]
factory = "userdata:token_splits"
batch_size = 16
[layers]
types = ["Linear", "Embedding"]
[objectives]
divergence = "userdata:one_minus_cos"
output = "pooled"
metric = "userdata:neighbour_agreement"
metric_name = "neighbour agreement"
metric_unit = "%"
"""


def test_problem_file_factories_are_imported_from_its_folder(user_folder):
    p = load_problem(write_problem(user_folder, ENCODER_TOML))
    t = build_target(p, progress=False)
    assert t.metric is not None and t.metric.name == "neighbour agreement"
    assert t.divergence.name == "userdata:one_minus_cos"
    assert len(t.calib) == 48 and t.val is not None and len(t.val) == 56


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (("usermodels:encoder", "usermodels:broken"), "model.factory",
         "usermodels:broken\\(\\) failed: RuntimeError: checkpoint folder is missing"),
        (("usermodels:encoder", "usermodels:not_a_model"), "model.factory",
         "must return a torch.nn.Module; it returned dict"),
        (("usermodels:encoder", "nowhere:encoder"), "model.factory",
         "no such module in .*PYTHONPATH"),
        (("usermodels:encoder", "usermodels:absent"), "model.factory", "has no 'absent'"),
        (("userdata:token_splits", "userdata:mismatched"), None, "do not share the leading"),
    ],
)
def test_factory_errors_name_the_field(user_folder, change, field, message):
    body = ENCODER_TOML.replace(*change)
    p = load_problem(write_problem(user_folder, body))
    with pytest.raises((ConfigError, DataError), match=message) as err:
        build_target(p, progress=False)
    if field is not None:
        assert isinstance(err.value, ConfigError) and err.value.field == field


def test_same_module_name_in_two_problem_folders_stays_apart(tmp_path):
    targets = []
    for k, dim in enumerate((3, 5)):
        d = tmp_path / f"p{k}"
        d.mkdir()
        (d / "net.py").write_text(
            "import torch\n"
            f"def build():\n    return torch.nn.Linear({dim}, 2)\n"
            f"def data():\n    x = torch.randn(8, {dim})\n"
            "    return {s: (x, None) for s in ('calibration', 'validation', 'test')}\n")
        f = write_problem(d, '[model]\nfactory = "net:build"\n[data]\nfactory = "net:data"\n')
        targets.append(build_target(load_problem(f), progress=False))
    assert [t.layers[0].shape for t in targets] == [(2, 3), (2, 5)]


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_data_and_weights_from_files(user_folder, kind):
    splits = userdata.lm_splits()
    if kind == "safetensors":
        flat = {}
        for name, ((ids,), y) in splits.items():
            flat[f"{name}.inputs.0"] = ids
            flat[f"{name}.labels"] = y
        save_file(flat, str(user_folder / "data.safetensors"))
    else:
        torch.save(splits, user_folder / "data.pt")
    teacher = usermodels.tied_lm()
    save_model(teacher, str(user_folder / "lm.safetensors"))  # the tied tensor once
    body = f"""
[model]
factory = "usermodels:TiedLM"
weights = "lm.safetensors"
[data]
path = "data.{kind}"
[layers]
types = ["Linear", "Embedding"]
"""
    t = build_target(load_problem(write_problem(user_folder, body)), progress=False)
    assert isinstance(t.calib.inputs, tuple) and t.calib.labels is not None
    assert torch.equal(t.teacher.embed.weight, teacher.embed.weight)
    assert t.teacher.head.weight is t.teacher.embed.weight


def test_weights_that_do_not_fit_name_the_field(user_folder):
    save_file({"nope": torch.zeros(2)}, str(user_folder / "w.safetensors"))
    body = ENCODER_TOML.replace('factory = "usermodels:encoder"',
                                'factory = "usermodels:TinyEncoder"\nweights = "w.safetensors"')
    with pytest.raises(ConfigError, match="model.weights: .*w.safetensors does not fit"):
        build_target(load_problem(write_problem(user_folder, body)), progress=False)
