"""Checkpoints are data only: a pymoo algorithm's state goes through JSON and a byte buffer
and comes back into a freshly built algorithm with every attribute equal; hostile or broken
checkpoints are refused without running anything."""

from __future__ import annotations

import ast
import json
import math
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pymoo.core.individual import Individual
from pymoo.core.population import Population
from pymoo.core.termination import NoTermination

import moecomp
from moecomp.errors import RunError
from moecomp.search.algorithms import make_algorithm
from moecomp.search.checkpoint import load_checkpoint, save_checkpoint
from moecomp.search.pymoo_state import (
    ValuePacker,
    capture_algorithm,
    restore_algorithm,
    unpack_value,
)

CASES = [
    # (algorithm, operators, objectives changes, problem kind)
    ("nsga2", "de", {}, "layerwise"),
    ("nsga2", "default", {}, "layerwise"),
    ("nsga2", "de", {"max_divergence": 0.02}, "layerwise"),  # constraints: G, infeasible
    ("nsga3", "de", {}, "layerwise"),
    ("nsga3", "de", {"max_divergence": 0.02}, "layerwise"),
    ("spea2", "de", {}, "layerwise"),
    ("spea2", "de", {"max_divergence": 0.001}, "layerwise"),  # opt: the least infeasible
    ("moead", "de", {}, "layerwise"),
    ("nsga2", "de", {}, "shared"),
]


def _built(make_problem, algorithm, operators, objectives, kind):
    genes = {"shared_k_max": 64} if kind == "shared" else {}
    problem = make_problem(
        search={
            "algorithm": algorithm,
            "operators": operators,
            "pop_size": 10,
            "seed": 5,
            "problem": kind,
        },
        objectives=objectives,
        genes=genes,
    )

    # a probe sensitivity as the search measures it (``(n_var,)``, positive)
    sensitivity = np.linspace(0.1, 1.0, problem.n_var) if kind == "layerwise" else None

    def build():
        alg = make_algorithm(problem.config.search, problem, sensitivity)
        alg.setup(problem, termination=NoTermination(), verbose=False, progress=False)
        return alg

    return problem, build


def _step(alg, problem) -> np.ndarray:
    pop = alg.ask()
    alg.evaluator.eval(problem, pop)
    problem.take_records()
    alg.tell(infills=pop)
    return pop.get("X")


def assert_same_state(a: Any, b: Any, path: str = "algorithm", pairs: dict | None = None):
    """Every attribute reachable from ``a`` equals the one of ``b``: types, numbers (bit
    for bit), arrays (dtype, shape, values), random states; objects shared in ``a`` are
    shared the same way in ``b``. The pymoo ``problem`` (the live one) is skipped."""
    pairs = {} if pairs is None else pairs
    if isinstance(a, Individual | Population | list | dict) or hasattr(a, "__dict__"):
        if id(a) in pairs:
            assert pairs[id(a)] is b, f"{path}: sharing differs"
            return
        pairs[id(a)] = b
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if a is None or isinstance(a, str | bool | int | type):
        assert a == b, f"{path}: {a!r} != {b!r}"
    elif isinstance(a, float | np.floating):
        assert (math.isnan(a) and math.isnan(b)) or a == b, f"{path}: {a!r} != {b!r}"
    elif isinstance(a, np.generic):
        assert a == b, f"{path}: {a!r} != {b!r}"
    elif isinstance(a, np.random.Generator):
        assert a.bit_generator.state == b.bit_generator.state, f"{path}: random state"
    elif isinstance(a, np.ndarray) and a.dtype != object:
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape}"
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), f"{path}: values"
    elif isinstance(a, list | tuple | np.ndarray):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{path}[{i}]", pairs)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same_state(a[k], b[k], f"{path}{{{k!r}}}", pairs)
    elif isinstance(a, set | frozenset):
        assert a == b, f"{path}: {a} != {b}"
    elif callable(a) and not hasattr(a, "__dict__") or isinstance(a, types.FunctionType):
        assert getattr(a, "__qualname__", a) == getattr(b, "__qualname__", b), path
    else:
        va, vb = vars(a), vars(b)
        assert va.keys() == vb.keys(), f"{path}: attributes {sorted(va)} != {sorted(vb)}"
        for k in va:
            if k != "problem":
                assert_same_state(va[k], vb[k], f"{path}.{k}", pairs)


@pytest.mark.parametrize(("algorithm", "operators", "objectives", "kind"), CASES)
def test_restored_algorithm_equals_the_saved_one_in_every_attribute(
    make_problem, algorithm, operators, objectives, kind
):
    problem, build = _built(make_problem, algorithm, operators, objectives, kind)
    alg = build()
    for _ in range(3):
        _step(alg, problem)
    mutation = alg.mating.mutation
    if getattr(mutation, "sensitivity", None) is not None:  # as the search refreshes it
        mutation.sensitivity = np.random.default_rng(0).random(problem.n_var)
    doc, buf = capture_algorithm(alg)
    doc = json.loads(json.dumps(doc))  # it is JSON, nothing else
    restored = build()
    restore_algorithm(restored, doc, buf)
    assert_same_state(alg, restored)
    # and it goes on exactly as the original would
    for _ in range(2):
        np.testing.assert_array_equal(_step(alg, problem), _step(restored, problem))
    assert_same_state(alg, restored)


def _reachable(obj: Any, seen: dict[int, Any]) -> None:
    """Every object with state (attributes, arrays, containers) reachable from ``obj``,
    by id, the pymoo problem left out."""
    if id(obj) in seen or obj is None or isinstance(obj, str | int | float | type):
        return
    if isinstance(obj, np.ndarray | list | dict | set) or hasattr(obj, "__dict__"):
        seen[id(obj)] = obj
    if isinstance(obj, dict):
        for v in obj.values():
            _reachable(v, seen)
    elif isinstance(obj, list | tuple) or (isinstance(obj, np.ndarray) and obj.dtype == object):
        for v in obj:
            _reachable(v, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, types.FunctionType):
        for k, v in vars(obj).items():
            if k != "problem":
                _reachable(v, seen)


@pytest.mark.parametrize(("algorithm", "operators", "objectives", "kind"), CASES)
def test_running_one_algorithm_changes_nothing_another_one_holds(
    make_problem, algorithm, operators, objectives, kind
):
    """pymoo's default arguments are shared instances (SPEA2's survival keeps state): what two
    algorithms of one process share must not change when one of them runs, or a rebuilt
    algorithm would not be the one that was saved, and searches would disturb each other."""
    import copy

    problem, build = _built(make_problem, algorithm, operators, objectives, kind)
    a, b = build(), build()
    in_a: dict[int, Any] = {}
    in_b: dict[int, Any] = {}
    _reachable(a, in_a)
    _reachable(b, in_b)
    shared = {i: copy.deepcopy(in_a[i]) for i in in_a.keys() & in_b.keys()}
    for _ in range(3):
        _step(a, problem)
    for i, before in shared.items():
        assert_same_state(before, in_b[i], f"shared {type(before).__name__}")


def test_state_before_the_first_generation_round_trips(make_problem):
    problem, build = _built(make_problem, "moead", "de", {}, "layerwise")
    alg = build()
    doc, buf = capture_algorithm(alg)
    restored = build()
    restore_algorithm(restored, json.loads(json.dumps(doc)), buf)
    assert_same_state(alg, restored)
    np.testing.assert_array_equal(_step(alg, problem), _step(restored, problem))


def test_value_packer_round_trips_types_exactly():
    values = [None, True, 3, -2.5, float("inf"), np.float32(1.5), np.int64(7), np.bool_(False),
              np.arange(6, dtype=np.int16).reshape(2, 3), np.zeros((0, 4)), np.array(np.nan)]
    p = ValuePacker()
    refs = [p.ref(v, what="v") for v in values]
    buf = p.buffer()
    for v, r in zip(values, json.loads(json.dumps(refs)), strict=True):
        assert_same_state(v, unpack_value(r, buf, what="v"))


@pytest.mark.parametrize(
    "value", [object(), "text", np.array(["a"]), np.array([object()]), 2**70, [1, 2]]
)
def test_value_packer_refuses_what_is_not_a_plain_number(value):
    with pytest.raises(RunError, match="cannot checkpoint"):
        ValuePacker().ref(value, what="v")


@pytest.mark.parametrize(
    "ref",
    [
        {"t": "array", "dtype": "|O", "shape": [1], "at": 0},  # objects
        {"t": "array", "dtype": "<f8", "shape": [10**12], "at": 0},  # beyond the buffer
        {"t": "array", "dtype": "<f8", "shape": [-1], "at": 0},
        {"t": "int", "dtype": "<i8", "shape": [2], "at": 0},  # not a scalar
        {"t": "code", "dtype": "<i8", "shape": [], "at": 0},
        {"t": "array", "dtype": "<f8", "shape": [1], "at": -8},
        ["not", "a", "dict"],
    ],
)
def test_malformed_value_references_are_refused(ref):
    buf = np.zeros(16, np.uint8)
    with pytest.raises(RunError, match="checkpoint"):
        unpack_value(ref, buf, what="v")


def _captured(make_problem):
    problem, build = _built(make_problem, "nsga3", "de", {}, "layerwise")
    alg = build()
    for _ in range(2):
        _step(alg, problem)
    doc, buf = capture_algorithm(alg)
    return json.loads(json.dumps(doc)), buf, build


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: d.pop("random_state"), "lacks 'random_state'"),
        (lambda d: d["attrs"].pop("survival.norm.ideal_point"), "lacks 'survival.norm.ideal"),
        (lambda d: d["attrs"].__setitem__("os.system", {"t": "none"}), "unknown algorithm"),
        (lambda d: d["population_attrs"].pop("pop"), "lacks 'pop'"),
        (lambda d: d["populations"][0].append(10**6), "missing individual"),
        (lambda d: d["individuals"][0]["fields"].pop("F"), "lacks \\['F'\\]"),
        (lambda d: d["random_state"]["state"].__setitem__("state", "x"), "random state"),
        (lambda d: d.__setitem__("class", "NSGA2"), "state of a 'NSGA2'"),
    ],
)
def test_broken_algorithm_state_is_refused_with_the_key_named(make_problem, breakage, message):
    doc, buf, build = _captured(make_problem)
    breakage(doc)
    with pytest.raises(RunError, match=message):
        restore_algorithm(build(), doc, buf)


def test_checkpoint_file_round_trip_and_refusals(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    arrays = {"a": np.arange(4), "b": np.zeros((0, 3))}
    save_checkpoint(path, {"gen": 3, "x": None}, arrays, fp="abc")
    ck = load_checkpoint(path, fp="abc")
    assert ck.value("gen", int) == 3
    np.testing.assert_array_equal(ck.array("a", kinds="i", shape=(4,)), arrays["a"])
    assert ck.array("b", kinds="f", shape=(None, 3)).shape == (0, 3)
    with pytest.raises(RunError, match="lacks 'missing'"):
        ck.value("missing", int)
    with pytest.raises(RunError, match="lacks array 'c'"):
        ck.array("c", kinds="f", shape=(None,))
    with pytest.raises(RunError, match="array 'a' is int64\\[4\\], expected"):
        ck.array("a", kinds="f", shape=(4,))
    with pytest.raises(RunError, match="another problem config"):
        load_checkpoint(path, fp="other")


class _Payload:
    """A pickle that, if ever unpickled, creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_is_never_loaded(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(RunError, match="not a moecomp search checkpoint"):
        load_checkpoint(path, fp="abc")
    assert not marker.exists()


FORBIDDEN_MODULES = {"pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "_pickle"}


def test_the_package_imports_no_unpickler_and_loads_torch_files_weights_only():
    root = Path(moecomp.__file__).parent
    for file in sorted(root.rglob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                names = set()
            assert not names & FORBIDDEN_MODULES, f"{file}:{node.lineno} imports {names}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                f = node.func
                if f.attr == "load" and isinstance(f.value, ast.Name):
                    if f.value.id == "torch":
                        kw = {k.arg: k.value for k in node.keywords}
                        ok = isinstance(kw.get("weights_only"), ast.Constant) and (
                            kw["weights_only"].value is True
                        )
                        assert ok, f"{file}:{node.lineno} torch.load without weights_only=True"
                    if f.value.id in ("np", "numpy"):
                        kw = {k.arg: k.value for k in node.keywords}
                        ok = isinstance(kw.get("allow_pickle"), ast.Constant) and (
                            kw["allow_pickle"].value is False
                        )
                        assert ok, f"{file}:{node.lineno} numpy.load without allow_pickle=False"
