from pathlib import Path

import pytest

from moecomp.config import load_problem, problem_from_dict
from moecomp.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def base(**sections):
    raw = {"name": "t", "model": {"zoo": "lenet300"}}
    raw.update(sections)
    return raw


SHIPPED = sorted((REPO / "problems").glob("*.toml")) + \
    sorted((REPO / "bench" / "problems").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_problem_files_load(path):
    p = load_problem(path)
    assert p.name == path.stem  # runs/<name> and caches are keyed by it
    assert p.genes.bits_min <= p.genes.bits_max


def test_every_problem_is_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"digits-mlp", "fashion-lenet300", "fashion-lenet300-ft", "fashion-lenet5"} <= names


@pytest.mark.parametrize(
    ("raw", "field", "allowed"),
    [
        (base(genes={"bitz": 3}), "genes.bitz", "allowed: sparsity_step"),
        (base(colour="red"), "colour", "allowed: name, model"),
        (base(genes={"bits_max": "8"}), "genes.bits_max", "integer"),
        (base(genes={"bits_max": 9}), "genes.bits_max", r"\[1, 8\]"),
        (base(genes={"sparsity_max": 1.0}), "genes.sparsity_max", r"\[0, 1\)"),
        (base(genes={"bits_min": 6, "bits_max": 4}), "genes.bits_min", "<= genes.bits_max"),
        (base(data={"dataset": "cifar"}), "data.dataset", "'digits', 'fashion-mnist'"),
        (base(search={"algorithm": "cmaes"}), "search.algorithm", "'nsga2'"),
        (base(search={"pop_size": 2}), "search.pop_size", r"\[4, 10000\]"),
        (base(objectives={"ref_point": [1.0, 2.0]}), "objectives.ref_point", "needs 3"),
        (base(layers={"include": "fc1"}), "layers.include", "a list of a string"),
        (base(data={"calibration": True}), "data.calibration", "integer"),
        ({"name": "t", "model": {"zoo": "lenet5", "factory": "m:f"}}, "model",
         "exactly one of zoo"),
        ({"name": "t", "model": {"factory": "x"}}, "model.factory", "module:function"),
        ({"name": "t", "model": {"factory": "a b:c"}}, "model.factory", "module:function"),
        (base(data={"factory": "m:f", "dataset": "digits"}), "data.factory", "not several"),
        (base(objectives={"divergence": "js"}), "objectives.divergence", "'kl'"),
        (base(objectives={"metric": "f1"}), "objectives.metric", "'auto'"),
        (base(data={"validation": "half"}), "data.validation", "'holdout', 'test-half'"),
        ({"model": {"zoo": "lenet5"}}, "name", "missing"),
    ],
)
def test_bad_fields_are_named(raw, field, allowed):
    with pytest.raises(ConfigError, match=allowed) as err:
        problem_from_dict(raw)
    assert err.value.field == field


def test_invalid_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_problem(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_problem(tmp_path / "absent.toml")


def test_int_accepted_where_float_expected():
    p = problem_from_dict(base(train={"lr": 1}))
    assert p.train.lr == 1.0 and isinstance(p.train.lr, float)


def test_replace_revalidates():
    p = problem_from_dict(base())
    assert p.replace("search", pop_size=12).search.pop_size == 12
    with pytest.raises(ConfigError, match="search.pop_size"):
        p.replace("search", pop_size=1)


def test_problem_file_must_name_a_model_and_records_its_folder(tmp_path):
    f = tmp_path / "sub" / "p.toml"
    f.parent.mkdir()
    f.write_text('name = "t"\n[model]\n')
    with pytest.raises(ConfigError, match="model: give exactly one of zoo"):
        load_problem(f)
    f.write_text('name = "t"\n[model]\nzoo = "lenet300"\n')
    assert load_problem(f).folder == str(f.parent.resolve())
    f.write_text('name = "t"\nfolder = ".."\n[model]\nzoo = "lenet300"\n')
    assert load_problem(f).folder == str(tmp_path.resolve())


def test_relative_paths_resolve_against_the_problem_file(tmp_path):
    from moecomp.config import resolve_path

    f = tmp_path / "p.toml"
    f.write_text('name = "t"\n[model]\nfactory = "net:build"\nweights = "w/t.safetensors"\n')
    p = load_problem(f)
    assert resolve_path(p, p.model.weights or "") == tmp_path.resolve() / "w" / "t.safetensors"
    assert resolve_path(p, "/abs/x") == Path("/abs/x")


def test_data_source_is_the_one_given():
    assert problem_from_dict(base()).data.source == "digits"
    assert problem_from_dict(base(data={"dataset": "fashion-mnist"})).data.source == \
        "fashion-mnist"
    assert problem_from_dict(base(data={"factory": "d:splits"})).data.source == "factory"
    assert problem_from_dict(base(data={"path": "splits.pt"})).data.source == "file"


def test_config_errors_cross_process_boundaries():
    """Raised in a worker (a process pool, Dask), a ConfigError must arrive whole."""
    import pickle

    from moecomp.errors import ConfigError

    err = pickle.loads(pickle.dumps(ConfigError("genes.bits_max", "must be <= 8")))
    assert isinstance(err, ConfigError)
    assert (err.field, err.problem, str(err)) == ("genes.bits_max", "must be <= 8",
                                                  "genes.bits_max: must be <= 8")
