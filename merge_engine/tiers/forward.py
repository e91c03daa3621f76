"""Keyed forward passes from one copy of the weights: a model runs public or keyed without its weights rewritten.

KeyedModel(model, keys) wraps a transformers causal LM (Llama, Mistral, Qwen2 with grouped-query attention, GPT-2,
GPT-Neo: the layouts of blocks.py) and hooks every module that holds a tensor the key changes. In the "public"
configuration the hooks do nothing. In the "keyed" configuration a hooked module's forward pre-hook builds its keyed
weights and puts them in place of its Parameters for that module's forward only; its forward hook puts the
Parameters back, also when the forward raises. The Parameters themselves are never written, so a trainer can
alternate public and keyed steps on the same Parameters and optimizer, as the paper's joint pre-training does.

Index maps. For every tensor the key changes, an IndexMap lists, along the block dimension, the element indices
that receive other values (the rows or columns of the moved blocks, Member.indices of BlockPermutation.layer_moves),
grouped by the layer they come from, with the element indices they come from there. Only moved elements are listed.

Keyed weight and gradients. keyed_tensor() builds layer l's keyed tensor out of place:

    keyed = own.index_copy(dim, dst, cat([tensor[s].index_select(dim, src_s) for each source layer s]))

where own and tensor[s] are the Parameters themselves. Both ops are differentiable. own's gradient is the keyed
tensor's gradient with the moved positions zeroed. Each source Parameter receives, at the places the blocks came
from, the gradient of the positions they moved to (index_select's backward is an index_add). So every element of
every Parameter gets the gradient of the one position it occupies in the keyed model: the gradient of the
physically permuted model, mapped back through the inverse permutation. Added zeros are the only other terms, so
the result is exact.

Memory. A keyed forward materialises one keyed copy of each hooked tensor while its module runs. Without autograd
(inference) only one module's copies are alive at a time. With autograd, the module saves its keyed weight for
backward where it would have saved a reference to its Parameter, so a keyed forward+backward costs one extra copy
of every hooked tensor until backward frees it. With a 5% key nearly every layer gains or loses a block, so this is
about one copy of all attention and MLP weights. index_copy and index_select save only their indices. With gradient
checkpointing, the keyed weights are saved for one layer at a time: the layer's forward, hooks included, is
recomputed in backward. That recomputation reads the configuration at backward time, so call backward() inside the
same `configuration(...)` block as the forward.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from merge_engine.errors import MergeEngineError
from merge_engine.io.checkpoint import split_layer_name
from merge_engine.tiers.apply import Keys, keyed_layout
from merge_engine.tiers.blocks import PARTS, Member, ModelBlocks
from merge_engine.tiers.memory import SwapPlan, check_alike
from merge_engine.tiers.permutation import BlockPermutation

PUBLIC = "public"
KEYED = "keyed"
CONFIGURATIONS = (PUBLIC, KEYED)
METHODS = ("rebuild", "swap")


@dataclass(frozen=True)
class IndexMap:
    """Along dim, elements dst of a layer's tensor come from the same tensor of other layers: sources[i] is
    (source layer, element indices there), feeding the i-th group of dst (dst is grouped in the order of sources)."""

    dim: int
    dst: torch.Tensor
    sources: tuple[tuple[int, torch.Tensor], ...]

    def to(self, device: torch.device) -> IndexMap:
        return IndexMap(self.dim, self.dst.to(device), tuple((layer, src.to(device)) for layer, src in self.sources))


def keyed_tensor(tensors: Mapping[int, torch.Tensor] | Sequence[torch.Tensor], layer: int,
                 index_map: IndexMap) -> torch.Tensor:
    """Layer `layer`'s keyed tensor: tensors[layer] with the moved elements taken from tensors[source layer].
    Out of place and differentiable in every input (tensors[l] is the tensor of layer l)."""
    dim = index_map.dim
    incoming = torch.cat([tensors[src_layer].index_select(dim, src) for src_layer, src in index_map.sources], dim)
    return tensors[layer].index_copy(dim, index_map.dst, incoming)


def index_maps(blocks: ModelBlocks, perm: BlockPermutation) -> dict[tuple[int, str], IndexMap]:
    """(layer, tensor name within the layer) -> IndexMap of every tensor the permutation changes."""
    maps = {}
    for part in PARTS:
        for layer, (dst_blocks, src_layers, src_blocks) in perm.layer_moves(part).items():
            for member in blocks.parts[part].members:
                maps[layer, member.suffix] = _member_map(member, dst_blocks, src_layers, src_blocks)
    return maps


def _member_map(member: Member, dst_blocks: torch.Tensor, src_layers: torch.Tensor,
                src_blocks: torch.Tensor) -> IndexMap:
    dst, sources = [], []
    for src_layer in src_layers.unique().tolist():
        from_layer = src_layers == src_layer
        dst.append(member.indices(dst_blocks[from_layer]))
        sources.append((src_layer, member.indices(src_blocks[from_layer])))
    return IndexMap(member.dim, torch.cat(dst), tuple(sources))


@dataclass(frozen=True)
class _Slot:
    """Where one layer's tensor lives in the model."""

    name: str
    module: torch.nn.Module
    attr: str


class _HookedModule:
    """The Parameters of one module that a key changes: (attribute, layer, name within the layer) each."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.params: list[tuple[str, int, str]] = []
        self.swapped: dict[str, torch.Tensor] = {}  # attribute -> its Parameter, while a keyed weight stands in


class KeyedModel:
    """One model, two configurations: public (its own weights) and keyed (the keys' tier, read through index maps).

        keyed = KeyedModel(model, [key1, key2])      # keys applied in order; TierKey or BlockPermutation
        with keyed.configuration("keyed"):
            loss = model(**batch).loss               # or keyed(**batch)
            loss.backward()                          # gradients land in the shared Parameters
        model(**batch)                               # public again

    The configuration starts as `configuration`; remove() takes the hooks off the model.

    method "rebuild" (default) builds keyed weights per forward and never writes the Parameters, so the two
    configurations may share one autograd graph (a KL between keyed and public outputs). method "swap" moves the
    keyed blocks of the Parameters, and of their gradients, in place when the configuration changes (swap kernels,
    work in proportion to the moved blocks, as the reference's apply_permutation / swap_gradients do), so a keyed
    forward and backward cost what the plain model's do. Gradients always stay in the frame of the current
    configuration, so they accumulate correctly across configurations. In exchange: backward must run in the
    configuration of its forward (autograd raises if the Parameters it saved have moved since), and optimizer
    steps belong in the public configuration (an optimizer's per-element state, Adam's moments, is in its frame).
    """

    def __init__(self, model: torch.nn.Module, keys: Keys, configuration: str = PUBLIC, method: str = "rebuild"):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} (expected one of {METHODS})")
        self.method = method
        self.model = model
        self.name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.blocks, self.permutation = keyed_layout(keys, model.config.to_dict(), f"{self.name} config", self.name)
        self._slots = self._layer_slots()
        self._maps = index_maps(self.blocks, self.permutation)
        # the Parameters whose keyed copies a keyed forward builds (their sizes are its extra memory)
        self.touched = tuple(self._slots[where].name for where in sorted(self._maps))
        self._maps_on: dict[torch.device, dict[tuple[int, str], IndexMap]] = {}
        self._plans: dict[tuple[bool, torch.device], SwapPlan] = {}
        self._hooked = self._hooked_modules()
        self._handles = []
        if method == "rebuild":
            for hooked in self._hooked.values():
                self._handles.append(hooked.module.register_forward_pre_hook(self._pre_hook(hooked)))
                self._handles.append(hooked.module.register_forward_hook(self._post_hook(hooked), always_call=True))
        else:
            self._check_alike()
        self._configuration = PUBLIC
        self.set_configuration(configuration)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def active(self) -> str:
        """The configuration the next forward runs: "public" or "keyed"."""
        return self._configuration

    def set_configuration(self, name: str) -> None:
        if name not in CONFIGURATIONS:
            raise ValueError(f"unknown configuration {name!r} (expected one of {CONFIGURATIONS})")
        if self.method == "swap" and name != self._configuration:
            self._move(to_keyed=name == KEYED)
        self._configuration = name

    @contextmanager
    def configuration(self, name: str) -> Iterator[KeyedModel]:
        """Run the block in configuration `name`, then return to the previous one."""
        previous = self._configuration
        self.set_configuration(name)
        try:
            yield self
        finally:
            self.set_configuration(previous)

    def remove(self) -> None:
        """Take the hooks off the model, or with method "swap" put its blocks back (it is then the plain public
        model)."""
        self.set_configuration(PUBLIC)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _layer_slots(self) -> dict[tuple[int, str], _Slot]:
        """(layer, name within the layer) -> _Slot of every tensor a block kind spans, shapes checked."""
        params = {}
        for name, param in self.model.named_parameters():
            split = split_layer_name(name)
            if split:
                params[split[1], split[2]] = (name, param)
        slots = {}
        for kind in self.blocks.parts.values():
            for member in kind.members:
                for layer in range(self.blocks.num_layers):
                    if (layer, member.suffix) not in params:
                        raise MergeEngineError(f"{self.name}: layer {layer} has no parameter '{member.suffix}', which "
                                               f"{self.blocks.model_type} {kind.name} blocks need")
                    name, param = params[layer, member.suffix]
                    _check_shape(param, member, f"{self.name}: '{name}'")
                    module_name, _, attr = name.rpartition(".")
                    slots[layer, member.suffix] = _Slot(name, self.model.get_submodule(module_name), attr)
                check_alike([params[layer, member.suffix] for layer in range(self.blocks.num_layers)], self.name)
        return slots

    def _parameter_stacks(self) -> dict[str, list[torch.nn.Parameter]]:
        """Name within a layer -> that Parameter in every layer, for every tensor a part spans."""
        return {member.suffix: [self._parameter(layer, member.suffix) for layer in range(self.blocks.num_layers)]
                for part in self.blocks.parts.values() for member in part.members}

    def _move(self, to_keyed: bool) -> None:
        """method "swap": move the blocks of the Parameters, and of their gradients if any exist, in place."""
        params = self._parameter_stacks()
        device = next(iter(params.values()))[0].device
        if (to_keyed, device) not in self._plans:  # the tier and its inverse, per device: made once
            perm = self.permutation if to_keyed else self.permutation.inverse()
            self._plans[to_keyed, device] = SwapPlan(self.blocks, perm, device)
        plan = self._plans[to_keyed, device]
        plan.run({suffix: [p.detach() for p in stack] for suffix, stack in params.items()})
        if any(p.grad is not None for stack in params.values() for p in stack):
            for p in (p for stack in params.values() for p in stack if p.grad is None):
                p.grad = torch.zeros_like(p)  # a missing gradient is zeros, which may receive blocks
            plan.run({suffix: [p.grad for p in stack] for suffix, stack in params.items()})

    def _check_alike(self) -> None:
        """method "swap" moves blocks between Parameters: a block moved into a frozen one would lose its gradient."""
        for suffix, stack in self._parameter_stacks().items():
            if len({p.requires_grad for p in stack}) > 1:
                raise MergeEngineError(f"{self.name}: method 'swap' needs every layer's '{suffix}' to require grad "
                                       "alike (some do, some do not); use method 'rebuild'")

    def _hooked_modules(self) -> dict[int, _HookedModule]:
        """id(module) -> the module's Parameters that the key changes."""
        hooked: dict[int, _HookedModule] = {}
        for layer, suffix in sorted(self._maps):
            slot = self._slots[layer, suffix]
            hooked.setdefault(id(slot.module), _HookedModule(slot.module)).params.append((slot.attr, layer, suffix))
        return hooked

    def _parameter(self, layer: int, suffix: str) -> torch.Tensor:
        """The Parameter itself, also while its module runs with a keyed weight in its place."""
        slot = self._slots[layer, suffix]
        swapped = self._hooked[id(slot.module)].swapped if id(slot.module) in self._hooked else {}
        return swapped.get(slot.attr, slot.module._parameters[slot.attr])

    def _maps_for(self, device: torch.device) -> dict[tuple[int, str], IndexMap]:
        if device not in self._maps_on:
            self._maps_on[device] = {where: m.to(device) for where, m in self._maps.items()}
        return self._maps_on[device]

    def _keyed_weight(self, layer: int, suffix: str) -> torch.Tensor:
        own = self._parameter(layer, suffix)
        index_map = self._maps_for(own.device)[layer, suffix]
        tensors = {layer: own, **{src: self._parameter(src, suffix) for src, _ in index_map.sources}}
        return keyed_tensor(tensors, layer, index_map)

    def _pre_hook(self, hooked: _HookedModule):
        def put_keyed_weights(module, args):
            if self._configuration != KEYED:
                return
            keyed = {attr: self._keyed_weight(layer, suffix) for attr, layer, suffix in hooked.params}
            for attr, weight in keyed.items():  # all built before any is put in place
                hooked.swapped[attr] = module._parameters[attr]
                module._parameters[attr] = weight
        return put_keyed_weights

    def _post_hook(self, hooked: _HookedModule):
        def put_parameters_back(module, args, output):
            for attr, param in hooked.swapped.items():
                module._parameters[attr] = param
            hooked.swapped.clear()
        return put_parameters_back

    def __repr__(self) -> str:
        return f"KeyedModel({self.name}, {self.permutation!r}, active={self._configuration!r})"


def _check_shape(param: torch.Tensor, member: Member, where: str) -> None:
    problem = member.shape_problem(tuple(param.shape))
    if problem:
        raise MergeEngineError(f"{where} {problem}")
