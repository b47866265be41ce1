"""CompressionPlan: the human-readable, JSON-serialisable configuration of one solution.

A plan says, for each compressible tensor (by parameter name, e.g. ``fc1.weight``), which
share of its weights is pruned (the least relevant first) and how many bits index the
levels of the survivors. It is what users export and what the codec stores in its header.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from moecomp.errors import ConfigError

QuantizerKind = Literal["uniform", "kmeans", "shared"]
QUANTIZERS: tuple[str, ...] = get_args(QuantizerKind)
BITS_RANGE = (1, 8)
PLAN_FORMAT = 1


@dataclass(frozen=True)
class LayerPlan:
    """Compression of one tensor.

    sparsity: share of weights set to zero, in [0, 1).
    bits: levels for survivors are ``2**bits`` (1..8); ignored by the ``shared`` quantizer,
        whose levels come from the plan's global ``shared_k``.
    quantizer: ``uniform`` (equal-width bins, bin-mean values), ``kmeans`` (1-D Lloyd-Max
        seeded from uniform) or ``shared`` (one codebook of K bins pooled across layers).
    """

    sparsity: float
    bits: int = 8
    quantizer: str = "uniform"

    def __post_init__(self) -> None:
        validate_layer(self, "layer")


def validate_layer(layer: LayerPlan, where: str) -> None:
    s = layer.sparsity
    if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
        raise ConfigError(f"{where}.sparsity", f"must be a finite number in [0, 1), got {s!r}")
    if not 0.0 <= float(s) < 1.0:
        raise ConfigError(f"{where}.sparsity", f"must be in [0, 1), got {s!r}")
    b = layer.bits
    if isinstance(b, bool) or not isinstance(b, int) or not BITS_RANGE[0] <= b <= BITS_RANGE[1]:
        raise ConfigError(f"{where}.bits", f"must be an integer in 1..8, got {b!r}")
    if layer.quantizer not in QUANTIZERS:
        raise ConfigError(
            f"{where}.quantizer", f"must be one of {', '.join(QUANTIZERS)}; got {layer.quantizer!r}"
        )


@dataclass(frozen=True)
class CompressionPlan:
    """Per-tensor plans, in the model's parameter order, plus the optional global K.

    shared_k: number of bins of the pooled codebook (weight-sharing mode); required when any
        layer uses the ``shared`` quantizer, and then in 2..256.
    """

    layers: dict[str, LayerPlan]
    shared_k: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("plan.layers", "must name at least one tensor")
        for name, lp in self.layers.items():
            if not isinstance(lp, LayerPlan):
                raise ConfigError(f"plan.layers.{name}", "must be a LayerPlan")
        uses_shared = any(lp.quantizer == "shared" for lp in self.layers.values())
        k = self.shared_k
        if uses_shared and k is None:
            raise ConfigError("plan.shared_k", "required when a layer uses the shared quantizer")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 256):
            raise ConfigError("plan.shared_k", f"must be an integer in 2..256, got {k!r}")

    # --- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "shared_k": self.shared_k,
            "layers": {
                n: {"sparsity": lp.sparsity, "bits": lp.bits, "quantizer": lp.quantizer}
                for n, lp in self.layers.items()
            },
            "meta": self.meta,
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Any) -> CompressionPlan:
        if not isinstance(d, dict):
            raise ConfigError("plan", f"must be a JSON object, got {type(d).__name__}")
        allowed = {"format", "shared_k", "layers", "meta"}
        unknown = set(d) - allowed
        if unknown:
            raise ConfigError(
                f"plan.{sorted(unknown)[0]}", f"unknown key; allowed: {', '.join(sorted(allowed))}"
            )
        fmt = d.get("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise ConfigError("plan.format",
                              f"unsupported plan format {fmt!r}; this is {PLAN_FORMAT}")
        raw_layers = d.get("layers")
        if not isinstance(raw_layers, dict):
            raise ConfigError("plan.layers", "must be an object mapping tensor names to plans")
        layers: dict[str, LayerPlan] = {}
        for name, lp in raw_layers.items():
            where = f"plan.layers.{name}"
            if not isinstance(lp, dict):
                raise ConfigError(where, "must be an object with sparsity, bits, quantizer")
            extra = set(lp) - {"sparsity", "bits", "quantizer"}
            if extra:
                raise ConfigError(
                    f"{where}.{sorted(extra)[0]}", "unknown key; allowed: sparsity, bits, quantizer"
                )
            if "sparsity" not in lp:
                raise ConfigError(f"{where}.sparsity", "missing")
            try:
                layers[name] = LayerPlan(
                    sparsity=lp["sparsity"],
                    bits=lp.get("bits", 8),
                    quantizer=lp.get("quantizer", "uniform"),
                )
            except ConfigError as e:
                raise ConfigError(where + e.field.removeprefix("layer"), e.problem) from None
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise ConfigError("plan.meta", "must be an object")
        return cls(layers=layers, shared_k=d.get("shared_k"), meta=meta)

    @classmethod
    def from_json(cls, text: str) -> CompressionPlan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError("plan", f"not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def uniform(
        cls, names: list[str], *, sparsity: float, bits: int, quantizer: str = "uniform"
    ) -> CompressionPlan:
        """The same sparsity and bits for every named tensor."""
        lp = LayerPlan(sparsity=sparsity, bits=bits, quantizer=quantizer)
        return cls(layers={n: lp for n in names})
