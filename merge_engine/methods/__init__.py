"""Registry of merge methods by their mergekit names."""
from merge_engine.methods import interpolation, task_arithmetic
from merge_engine.methods.base import MergeMethod, TensorGroup

REGISTRY: dict[str, MergeMethod] = {m.name: m for m in interpolation.METHODS + task_arithmetic.METHODS}

__all__ = ["MergeMethod", "REGISTRY", "TensorGroup"]
