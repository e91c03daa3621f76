"""Which tensors a patch stores, and the per-layer norms of a fine-tune's difference that help choose them.

Name filters are substrings, as mergekit's parameter filters match. Layer selectors keep the tensors of chosen
layers (the first N, or the fewest layers carrying a share of the squared difference norm, largest first, as
"Robust Weight Signatures" found the difference concentrated in few layers); with a layer selector, tensors
outside the layers (embeddings, final norm, head) are kept only when asked (outside_layers).
"""
from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint, split_layer_name
from merge_engine.io.experts import layout_hint
from merge_engine.patches.arithmetic import difference

log = logging.getLogger("merge_engine.patches")
OUTSIDE_LAYERS = None  # the layer key of embeddings, final norms and heads
T = TypeVar("T")


@dataclass(frozen=True)
class Selection:
    include: tuple[str, ...] = ()  # substrings; empty: every tensor
    exclude: tuple[str, ...] = ()
    first_layers: int | None = None
    top_norm: float | None = None  # a share in (0, 1]
    outside_layers: bool = False  # with a layer selector: keep the tensors outside the layers too

    def __post_init__(self):
        if self.first_layers is not None and self.top_norm is not None:
            raise ValueError("choose layers by first_layers or by top_norm, not both")
        if self.first_layers is not None and self.first_layers < 1:
            raise ValueError(f"first_layers must be at least 1, got {self.first_layers}")
        if self.top_norm is not None and not 0 < self.top_norm <= 1:
            raise ValueError(f"top_norm is a share of the difference norm in (0, 1], got {self.top_norm}")

    @property
    def by_layer(self) -> bool:
        return self.first_layers is not None or self.top_norm is not None

    def named(self, name: str) -> bool:
        included = any(s in name for s in self.include) if self.include else True
        return included and not any(s in name for s in self.exclude)


def layer_of(name: str) -> int | None:
    split = split_layer_name(name)
    return split[1] if split else OUTSIDE_LAYERS


def candidates(base: Checkpoint, tuned: Checkpoint, selection: Selection) -> list[str]:
    """Floating-point tensors the name filters keep, checked to match between the two checkpoints (in file order)."""
    names = [n for n in sorted(tuned.tensors, key=lambda n: (tuned.tensors[n].file, tuned.tensors[n].data_start))
             if selection.named(n) and tuned.tensors[n].dtype.is_floating_point and tuned.tensors[n].shape]
    missing = [n for n in names if n not in base.tensors]
    if missing:
        raise CheckpointError(f"{tuned.path}: tensor '{missing[0]}' is not in the base {base.path}"
                              + (f" (nor are {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + next(filter(None, (layout_hint(n, base.tensors) for n in missing if ".experts." in n)), ""))
    for n in names:
        b, t = base.tensors[n], tuned.tensors[n]
        if (b.shape, b.dtype) != (t.shape, t.dtype):
            raise CheckpointError(f"{t.file}: tensor '{n}' is {t.dtype} {list(t.shape)} but {b.dtype} "
                                  f"{list(b.shape)} in the base {b.file}")
    if not names:
        raise CheckpointError(f"{tuned.path}: no floating-point tensor matches the name filters")
    lacking = [n for n in base.tensors if selection.named(n) and n not in tuned.tensors]
    if lacking:  # (a base with more layers, or another model's) applying the patch keeps them: it does not give TUNED
        log.warning("%s: %d tensor(s) of the base %s are not in it (%s%s): the patch leaves them as the base has "
                    "them, so applying it does not give this model", tuned.path, len(lacking), base.path,
                    ", ".join(lacking[:3]), ", ..." if len(lacking) > 3 else "")
    return names


def in_order(work: Callable[[str], T], names: list[str], ahead: int = 2) -> Iterator[tuple[str, T]]:
    """(name, work(name)) for each name in order, with the next `ahead` names worked on by threads meanwhile:
    reads and torch's ops release the GIL, so the disk and the cores overlap. Memory: ahead + 1 results."""
    with ThreadPoolExecutor(ahead) as pool:
        queued = iter(names)
        pending = deque((name, pool.submit(work, name)) for name in itertools.islice(queued, ahead))
        while pending:
            following = next(queued, None)
            if following is not None:
                pending.append((following, pool.submit(work, following)))
            name = pending[0][0]
            # no local holds the future: a failed one's error would keep this frame, and what work holds, in a cycle
            yield name, pending.popleft()[1].result()


def read_pairs(base: Checkpoint, tuned: Checkpoint, names: list[str]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, base tensor, tuned tensor) in order, read ahead (in_order)."""
    for name, (b, t) in in_order(lambda n: (base.read(n), tuned.read(n)), names):
        yield name, b, t


def layer_norms(base: Checkpoint, tuned: Checkpoint, names: list[str]) -> dict[int | None, float]:
    """Squared Frobenius norm of TUNED - BASE per layer (None: the tensors outside the layers)."""
    norms: dict[int | None, float] = {}
    squares = in_order(lambda n: float(difference(base.read(n), tuned.read(n)).square().sum()), names)
    for name, square in squares:
        norms[layer_of(name)] = norms.get(layer_of(name), 0.0) + square
    return norms


def chosen_layers(selection: Selection, norms: dict[int | None, float] | None, num_layers: int) -> set[int] | None:
    """The layers a layer selector keeps; None when there is no layer selector."""
    if selection.first_layers is not None:  # the layers that exist below it (not a set of a billion numbers)
        return {layer for layer in range(num_layers) if layer < selection.first_layers}
    if selection.top_norm is None:
        return None
    ranked = sorted(((sq, layer) for layer, sq in norms.items() if layer is not OUTSIDE_LAYERS), reverse=True)
    total, kept, layers = sum(sq for sq, _ in ranked), 0.0, set()
    for sq, layer in ranked:
        if total and kept >= selection.top_norm * total:
            break
        layers.add(layer)
        kept += sq
    return layers


def select(names: list[str], selection: Selection, layers: set[int] | None) -> list[str]:
    """The candidates a layer selector keeps (all of them without one)."""
    if layers is None:
        return names
    return [n for n in names if layer_of(n) in layers or (layer_of(n) is OUTSIDE_LAYERS and selection.outside_layers)]


def norm_table(norms: dict[int | None, float]) -> str:
    """Per layer: the difference's norm, its share of the squared norm, and the cumulative share in layer order."""
    total = sum(norms.values()) or 1.0
    lines = [f"{'layer':>8} {'norm':>12} {'share':>8} {'cumulative':>11}"]
    cumulative = 0.0
    for layer in sorted((k for k in norms if k is not OUTSIDE_LAYERS)) + ([OUTSIDE_LAYERS] if OUTSIDE_LAYERS in norms
                                                                         else []):
        share = norms[layer] / total
        cumulative += share
        label = "other" if layer is OUTSIDE_LAYERS else str(layer)
        lines.append(f"{label:>8} {norms[layer] ** 0.5:12.5g} {100 * share:7.2f}% {100 * cumulative:10.2f}%")
    return "\n".join(lines)
