"""What a merge method is: its parameters, the inputs it accepts, and its per-tensor function."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from merge_engine.parameters import ParamSpec, Scope


@dataclass
class TensorGroup:
    """The inputs of one output tensor, in config model order, with resolved parameters."""

    name: str  # output tensor name (random methods key their generator on it)
    tensors: list[torch.Tensor]
    base_index: int | None
    shared: dict[str, Any]
    per_model: list[dict[str, Any]]  # aligned with tensors; the base has only INPUT-scope values
    seed: int = 0
    # side-input kind -> one tensor per input (None where that input has none), in its stored dtype
    side: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)
    side_folders: dict[str, list[str | None]] = field(default_factory=dict)  # where each came from
    # the engine's recycled host buffers (shape, dtype) -> tensor, for the ops that take `out`
    take_output: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None
    input_names: list[str] = field(default_factory=list)  # each input's name in its model (slices renumber layers)
    in_out: bool = False  # a 2-D weight stored [in, out] (transformers' Conv1D), not [out, in] as nn.Linear

    @property
    def base(self) -> torch.Tensor | None:
        return None if self.base_index is None else self.tensors[self.base_index]

    @property
    def non_base(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base_index]

    @property
    def experts(self) -> list[torch.Tensor]:
        """The non-base inputs' tensors, in order."""
        return [self.tensors[i] for i in self.non_base]

    def output_like(self, x: torch.Tensor) -> torch.Tensor | None:
        """A recycled buffer of x's shape and dtype for an op's out, or None (the op allocates): on the
        CPU, fresh memory costs a zeroed page per first touch, for every tensor of the model."""
        return None if self.take_output is None or x.device.type != "cpu" else self.take_output(tuple(x.shape), x.dtype)

    def values(self, param: str) -> list[Any]:
        """A per-model parameter's values for the non-base inputs, in order."""
        return [self.per_model[i][param] for i in self.non_base]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: Callable[[TensorGroup], torch.Tensor]
    params: tuple[ParamSpec, ...] = ()
    base: str = "ignored"  # "required", "optional" or "ignored" (a listed base is just another input)
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    side_inputs: tuple[str, ...] = ()  # per-model statistics the method reads (config.SIDE_INPUT_KEYS)
    reference: str = ""
    notes: str = field(default="", compare=False)
    # methods that wrap another one: (global parameters, registry) -> the bound method (ValueError if unusable)
    specialize: Callable[[dict, dict], MergeMethod] | None = field(default=None, compare=False)
    wrapped: Callable[[TensorGroup], torch.Tensor] | None = field(default=None, compare=False)  # its inner merge
    inner: MergeMethod | None = field(default=None, compare=False)  # the method it wraps, whose input contract holds too
    # compute dtype -> the dtype the merge returns, where it differs (mergekit writes that when out_dtype is unset)
    result_dtype: Callable[[torch.dtype], torch.dtype] | None = field(default=None, compare=False)
    # (shared, per-model parameters, compute dtype) of one tensor -> why its result would be meaningless
    # (refused when planning), or None
    tensor_problem: Callable[[dict, list[dict], torch.dtype], str | None] | None = field(default=None, compare=False)

    def output_dtype(self, compute: torch.dtype) -> torch.dtype:
        """The dtype written for a tensor merged in `compute` when the config sets no out_dtype."""
        return compute if self.result_dtype is None else self.result_dtype(compute)

    @property
    def shared_params(self) -> list[ParamSpec]:
        return [p for p in self.params if p.scope == Scope.SHARED]

    @property
    def model_params(self) -> list[ParamSpec]:
        return [p for p in self.params if p.scope != Scope.SHARED]

    def input_problems(self, models: list[str], base: str | None, where: str) -> list[str]:
        """Structural problems with the inputs of one tensor group (mergekit's input contract)."""
        problems = []
        if self.base == "required" and base is None:
            problems.append(f"{where}: merge method '{self.name}' requires a base_model")
        has_base = self.base != "ignored" and base is not None and base in models
        if self.base != "ignored" and base is not None and base not in models:
            problems.append(f"{where}: base model {base} is not among the inputs")
        count, non_base = len(models), len(models) - int(has_base)
        for what, n, lo, hi in (("inputs", count, self.min_inputs, self.max_inputs),
                                ("non-base inputs", non_base, self.min_non_base, self.max_non_base)):
            if n < lo or (hi is not None and n > hi):
                want = f"exactly {lo}" if lo == hi else (f"{lo} to {hi}" if hi is not None else f"at least {lo}")
                problems.append(f"{where}: merge method '{self.name}' needs {want} {what}, got {n}")
        if self.inner and not problems:  # it merges the same inputs, less the base where it takes none (without_base)
            inputs = [m for m in models if m != base] if self.inner.base == "ignored" else models
            problems += self.inner.input_problems(inputs, base, f"{where} ({self.notes})")
        return problems
