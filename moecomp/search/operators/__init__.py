"""DE-style operators for the compression genes: sampling seeded from layer sensitivity,
directed mutation, layer-wise crossover, repair to bounds. Each is a plain function on arrays
plus a pymoo operator class that binds its parameters and uses the ``random_state`` pymoo
gives it."""

from moecomp.search.operators.crossover import LayerwiseCrossover, layerwise_crossover
from moecomp.search.operators.mutation import DirectedMutation, directed_mutation
from moecomp.search.operators.repair import BoundsRepair, repair_genes
from moecomp.search.operators.sampling import SensitivitySampling, sensitivity_sampling

__all__ = [
    "BoundsRepair",
    "DirectedMutation",
    "LayerwiseCrossover",
    "SensitivitySampling",
    "directed_mutation",
    "layerwise_crossover",
    "repair_genes",
    "sensitivity_sampling",
]
