"""The state of a running pymoo algorithm as plain data (JSON and numbers), and back.

A checkpoint never stores the algorithm object: the search rebuilds the algorithm from the
problem config (``make_algorithm`` + ``setup``, code of this package) and
:func:`restore_algorithm` puts back what running it changed. What that is was read from
pymoo 0.6's source (``core/algorithm.py``, ``algorithms/base/genetic.py``, NSGA-III's
``HyperplaneNormalization``, ``ParallelMOEAD``) and is checked by
``tests/search/test_checkpoint.py``, which compares every attribute of a restored algorithm
with the one that was saved, for every algorithm moecomp runs:

- the random generator ``random_state`` (its PCG64 state: JSON integers);
- the attributes of :data:`STATE_ATTRS` (counters, flags, NSGA-III's normalisation points,
  MOEA/D's ideal point and pending neighbourhood indices, the directed mutation's current
  sensitivity), each ``None``, a number or a numeric array;
- the populations of :data:`POPULATION_ATTRS`, as one table of individuals (X, F, G, H, CV,
  what was evaluated, per-individual data such as rank and crowding) that the populations
  index, so an individual (or a population) shared by two attributes stays shared.

Numbers and arrays go into one byte buffer (:class:`ValuePacker`) with their dtype and
shape in the JSON; only plain numeric dtypes are accepted, so loading is copying bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from pymoo.core.algorithm import Algorithm
from pymoo.core.individual import Individual
from pymoo.core.population import Population

from moecomp.errors import RunError

# Attribute paths (dotted, from the algorithm) whose value running changes. A path whose
# parent object does not exist on an algorithm (``survival.norm`` outside NSGA-III) is
# skipped for that algorithm.
STATE_ATTRS = (
    "n_iter",
    "n_gen",
    "is_initialized",
    "start_time",
    "evaluator.n_eval",
    "termination.force_termination",
    "termination.perc",
    "callback.is_initialized",
    "display.is_initialized",
    # NSGA-III's ReferenceDirectionSurvival and SPEA2's survival: HyperplaneNormalization
    "survival.norm.ideal_point",
    "survival.norm.worst_point",
    "survival.norm.nadir_point",
    "survival.norm.extreme_points",
    # (Parallel)MOEA/D: the ideal point, the neighbourhoods of the offspring asked for, and
    # the points the decomposition last used
    "ideal",
    "indices",
    "decomposition.ideal_point",
    "decomposition.utopian_point",
    "decomposition.nadir_point",
    # moecomp's DirectedMutation: the sensitivity refreshed every generation
    "mating.mutation.sensitivity",
)
POPULATION_ATTRS = ("pop", "off", "opt", "survival.opt")

# What a pymoo 0.6 Individual holds; anything else means pymoo changed and the format with it.
_IND_FIELDS = ("X", "F", "G", "H", "dF", "dG", "dH", "ddF", "ddG", "ddH", "CV")
_IND_ATTRS = frozenset({f"_{f}" for f in _IND_FIELDS} | {"config", "data", "evaluated"})
# Plain numeric dtypes, little-endian (numpy's ``dtype.str``): nothing that can hold objects.
_DTYPES = frozenset(
    {"|b1", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "<f2", "<f4", "<f8"}
)
_MISSING = object()


class ValuePacker:
    """Packs ``None``, Python and numpy numbers and numeric arrays into one byte buffer;
    :meth:`ref` returns the JSON reference (kind, dtype, shape, offset) that
    :func:`unpack_value` reads back to an equal value of the same type."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def ref(self, value: Any, *, what: str) -> dict[str, Any]:
        if value is None:
            return {"t": "none"}
        arr: np.ndarray
        if isinstance(value, np.generic):  # first: np.float64 is also a float
            kind, arr = "scalar", np.asarray(value)
        elif isinstance(value, bool):
            kind, arr = "bool", np.asarray(value, np.bool_)
        elif isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise RunError(f"cannot checkpoint {what}: integer {value} exceeds 64 bits")
            kind, arr = "int", np.asarray(value, np.int64)
        elif isinstance(value, float):
            kind, arr = "float", np.asarray(value, np.float64)
        elif isinstance(value, np.ndarray) and type(value) is np.ndarray:
            kind, arr = "array", value
        else:
            raise RunError(f"cannot checkpoint {what}: a {type(value).__name__}")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.dtype.str not in _DTYPES:
            raise RunError(f"cannot checkpoint {what}: dtype {arr.dtype} is not a plain number")
        blob = np.ascontiguousarray(arr).tobytes()
        ref = {"t": kind, "dtype": arr.dtype.str, "shape": list(arr.shape), "at": self._size}
        self._parts.append(blob)
        self._size += len(blob)
        return ref

    def buffer(self) -> np.ndarray:
        """All packed bytes, ``(n_bytes,)`` uint8."""
        return np.frombuffer(b"".join(self._parts), dtype=np.uint8).copy()


def unpack_value(ref: Any, buf: np.ndarray, *, what: str) -> Any:
    """The value a :meth:`ValuePacker.ref` describes, read from ``buf``; RunError naming
    ``what`` when the reference is malformed or points outside the buffer."""
    if not isinstance(ref, dict) or ref.get("t") not in ("none", "bool", "int", "float",
                                                          "scalar", "array"):
        raise RunError(f"checkpoint: malformed value for {what}")
    kind = ref["t"]
    if kind == "none":
        return None
    dtype, shape, at = ref.get("dtype"), ref.get("shape"), ref.get("at")
    if (
        dtype not in _DTYPES
        or not isinstance(shape, list)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        or not isinstance(at, int)
        or at < 0
    ):
        raise RunError(f"checkpoint: malformed value for {what}")
    dt = np.dtype(dtype)
    count = math.prod(shape)
    if at + count * dt.itemsize > buf.size:
        raise RunError(f"checkpoint: value for {what} lies outside the stored bytes")
    arr = np.frombuffer(buf, dtype=dt, count=count, offset=at).reshape(shape).copy()
    if kind == "array":
        return arr
    if arr.shape != ():
        raise RunError(f"checkpoint: value for {what} is not a scalar")
    return arr[()] if kind == "scalar" else arr.item()


def _create_lazy_parents(algorithm: Algorithm, paths: Any) -> None:
    """SPEA2's survival creates its ``norm`` at its first call; a state that has it needs it
    created before it is filled."""
    survival = getattr(algorithm, "survival", None)
    if (
        any(isinstance(p, str) and p.startswith("survival.norm.") for p in paths)
        and survival is not None
        and getattr(survival, "norm", _MISSING) is None
    ):
        from pymoo.algorithms.moo.nsga3 import HyperplaneNormalization

        assert algorithm.problem is not None
        survival.norm = HyperplaneNormalization(algorithm.problem.n_obj)


def _resolve(obj: Any, path: str) -> tuple[Any, str]:
    """``(parent, name)`` of a dotted path, or ``(_MISSING, name)`` when a parent is absent."""
    *parents, name = path.split(".")
    for p in parents:
        obj = getattr(obj, p, None)
        if obj is None:
            return _MISSING, name
    return obj, name


def _individual(ind: Any, values: ValuePacker) -> dict[str, Any]:
    if type(ind) is not Individual or set(vars(ind)) != _IND_ATTRS:
        raise RunError(
            f"cannot checkpoint a pymoo individual of type {type(ind).__name__} with "
            f"attributes {sorted(vars(ind))}: this pymoo is not the one moecomp was written for"
        )
    if ind.config != Individual.default_config():
        raise RunError("cannot checkpoint a pymoo individual with a non-default config")
    if not all(isinstance(k, str) for k in ind.data):
        raise RunError("cannot checkpoint a pymoo individual with non-string data keys")
    return {
        "fields": {
            f: values.ref(getattr(ind, f"_{f}"), what=f"individual.{f}") for f in _IND_FIELDS
        },
        "evaluated": sorted(map(str, ind.evaluated or ())),
        "data": {k: values.ref(v, what=f"individual data {k!r}") for k, v in ind.data.items()},
    }


def _restore_individual(rec: Any, buf: np.ndarray) -> Individual:
    if not isinstance(rec, dict) or not isinstance(rec.get("fields"), dict):
        raise RunError("checkpoint: malformed individual")
    fields, evaluated, data = rec["fields"], rec.get("evaluated"), rec.get("data")
    if set(fields) != set(_IND_FIELDS):
        raise RunError(f"checkpoint: an individual lacks {sorted(set(_IND_FIELDS) - set(fields))}")
    if not isinstance(evaluated, list) or not all(isinstance(e, str) for e in evaluated):
        raise RunError("checkpoint: malformed individual (evaluated)")
    if not isinstance(data, dict):
        raise RunError("checkpoint: malformed individual (data)")
    ind = Individual()
    for f in _IND_FIELDS:
        setattr(ind, f"_{f}", unpack_value(fields[f], buf, what=f"individual.{f}"))
    ind.evaluated = set(evaluated)
    ind.data = {
        str(k): unpack_value(v, buf, what=f"individual data {k!r}") for k, v in data.items()
    }
    return ind


def capture_algorithm(algorithm: Algorithm) -> tuple[dict[str, Any], np.ndarray]:
    """``(doc, buffer)``: the JSON-able state of a set-up algorithm and the bytes its numbers
    live in (``(n,)`` uint8). RunError if the algorithm holds something this format does not
    know (a history, an archive, data, or a changed pymoo)."""
    if algorithm.history or algorithm.archive is not None or algorithm.data:
        raise RunError("cannot checkpoint a pymoo algorithm with a history, archive or data")
    values = ValuePacker()
    rng = algorithm.random_state
    if not isinstance(rng, np.random.Generator):
        raise RunError("cannot checkpoint an algorithm that is not set up")
    attrs: dict[str, Any] = {}
    for path in STATE_ATTRS:
        parent, name = _resolve(algorithm, path)
        if parent is not _MISSING and hasattr(parent, name):
            attrs[path] = values.ref(getattr(parent, name), what=path)

    individuals: list[dict[str, Any]] = []
    ind_index: dict[int, int] = {}
    pops: list[list[int]] = []
    pop_index: dict[int, int] = {}

    def ind_id(ind: Any) -> int:
        if id(ind) not in ind_index:
            ind_index[id(ind)] = len(individuals)
            individuals.append(_individual(ind, values))
        return ind_index[id(ind)]

    populations: dict[str, Any] = {}
    for path in POPULATION_ATTRS:
        parent, name = _resolve(algorithm, path)
        if parent is _MISSING or not hasattr(parent, name):
            continue
        v = getattr(parent, name)
        if v is None:
            populations[path] = None
        elif isinstance(v, Individual):
            populations[path] = {"individual": ind_id(v)}
        elif isinstance(v, Population):
            if id(v) not in pop_index:
                pop_index[id(v)] = len(pops)
                pops.append([ind_id(ind) for ind in v])
            populations[path] = {"population": pop_index[id(v)]}
        else:
            raise RunError(f"cannot checkpoint {path}: a {type(v).__name__}")
    doc = {
        "class": type(algorithm).__name__,
        "random_state": rng.bit_generator.state,
        "attrs": attrs,
        "individuals": individuals,
        "populations": pops,
        "population_attrs": populations,
    }
    return doc, values.buffer()


def restore_algorithm(algorithm: Algorithm, doc: Any, buf: np.ndarray) -> None:
    """Put the state captured by :func:`capture_algorithm` into ``algorithm``, freshly built
    from the same config and set up on the same problem. RunError (naming the key) when the
    state is malformed or does not fit this algorithm."""
    if not isinstance(doc, Mapping):
        raise RunError("checkpoint: malformed algorithm state")
    for key in ("class", "random_state", "attrs", "individuals", "populations",
                "population_attrs"):
        if key not in doc:
            raise RunError(f"checkpoint: the algorithm state lacks {key!r}")
    if doc["class"] != type(algorithm).__name__:
        raise RunError(
            f"checkpoint: state of a {doc['class']!r}, this search runs "
            f"{type(algorithm).__name__!r}"
        )
    rng = algorithm.random_state
    assert isinstance(rng, np.random.Generator), "restore into a set-up algorithm"
    state = doc["random_state"]
    kind = type(rng.bit_generator).__name__
    if not isinstance(state, dict) or state.get("bit_generator") != kind:
        raise RunError("checkpoint: malformed random state")
    try:
        rng.bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise RunError(f"checkpoint: malformed random state ({e})") from None

    attrs = doc["attrs"]
    if not isinstance(attrs, dict):
        raise RunError("checkpoint: malformed algorithm attributes")
    _create_lazy_parents(algorithm, attrs)
    for path in attrs:
        if path not in STATE_ATTRS or _resolve(algorithm, path)[0] is _MISSING:
            raise RunError(f"checkpoint: unknown algorithm attribute {path!r}")
    for path in STATE_ATTRS:
        parent, name = _resolve(algorithm, path)
        if path in attrs:
            setattr(parent, name, unpack_value(attrs[path], buf, what=path))
        elif parent is not _MISSING and hasattr(parent, name):
            raise RunError(f"checkpoint: the algorithm state lacks {path!r}")

    recs, pops_doc, pattrs = doc["individuals"], doc["populations"], doc["population_attrs"]
    if not isinstance(recs, list) or not isinstance(pops_doc, list) or not isinstance(
        pattrs, dict
    ):
        raise RunError("checkpoint: malformed populations")
    individuals = [_restore_individual(r, buf) for r in recs]

    def ind_at(i: Any) -> Individual:
        if not isinstance(i, int) or not 0 <= i < len(individuals):
            raise RunError("checkpoint: a population refers to a missing individual")
        return individuals[i]

    pops: list[Population] = []
    for members in pops_doc:
        if not isinstance(members, list):
            raise RunError("checkpoint: malformed population")
        pops.append(
            Population([ind_at(i) for i in members]) if members else Population.empty(0)
        )
    for path in pattrs:
        if path not in POPULATION_ATTRS or _resolve(algorithm, path)[0] is _MISSING:
            raise RunError(f"checkpoint: unknown population attribute {path!r}")
    for path in POPULATION_ATTRS:
        parent, name = _resolve(algorithm, path)
        if path not in pattrs:
            if parent is not _MISSING and hasattr(parent, name):
                raise RunError(f"checkpoint: the algorithm state lacks {path!r}")
            continue
        ref = pattrs[path]
        value: Any
        if ref is None:
            value = None
        elif isinstance(ref, dict) and "individual" in ref:
            value = ind_at(ref["individual"])
        elif isinstance(ref, dict) and "population" in ref:
            j = ref["population"]
            if not isinstance(j, int) or not 0 <= j < len(pops):
                raise RunError(f"checkpoint: {path} refers to a missing population")
            value = pops[j]
        else:
            raise RunError(f"checkpoint: malformed {path}")
        setattr(parent, name, value)
