"""Registry of merge methods by name (mergekit's names, plus merge_engine's own)."""
from merge_engine.methods import fisher, interpolation, regression, spectral, task_arithmetic
from merge_engine.methods.base import MergeMethod, TensorGroup

REGISTRY: dict[str, MergeMethod] = {m.name: m for m in interpolation.METHODS + task_arithmetic.METHODS + fisher.METHODS + spectral.METHODS
                                  + regression.METHODS}

__all__ = ["MergeMethod", "REGISTRY", "TensorGroup"]
