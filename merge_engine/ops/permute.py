"""Permute ops: moving blocks of parameters between the per-layer tensors of one kind, for keyed tiers
(merge_engine/tiers). A block is a run of `block_size` consecutive indices along one dimension `dim`
of a layer's tensor (rows: dim 0, columns: dim 1; biases are 1-D); block b spans
[b * block_size, (b + 1) * block_size). Every layer's tensor of a kind has one shape, dtype and device.

- gather_blocks: a layer's tensor read through index tables (src_layer[b], src_block[b] per block b),
  as a keyed forward does without rewriting the weights; differentiable (its gradient is op 2).
- scatter_add_blocks_: the adjoint of gather_blocks, in place.
- swap_blocks_: a batch of disjoint block swaps in place (applies or removes a key).

The pure-PyTorch references below are the specification. gather and swap only move data, so every
backend (csrc/cpu/permute.cpp, csrc/cuda/permute.cu, triton_kernels/permute.py) reproduces them bit
for bit. scatter_add adds each element once (the (layer, block) pairs of a call are distinct), as
torch's index_add_ does: in the tensor's dtype, which for bf16 and fp16 torch computes as an fp32 add
rounded once to the dtype (nearest even); the kernels do the same. That is also the correctly rounded
sum: an fp32 sum of two 16-bit values rounded again to 16 bits is never doubly rounded wrongly (24 >=
2p + 2 bits for p = 8 and 11), so every backend gives the same bits, NaN payloads aside.

Arguments are validated (ValueError) before any kernel runs; index tables are int64 tensors on the
data's device, and checking their ranges reads them (one device sync on a GPU).
"""
from __future__ import annotations

import torch

from merge_engine.ops import backends
from merge_engine.ops.library import op, spans_overlap

# ---- validation ----

def _check_stack(op: str, tensors: list[torch.Tensor], dim: int, block_size: int) -> int:
    """The number of blocks per tensor, after checking that the tensors form one stack of blocks."""
    if len(tensors) == 0:
        raise ValueError(f"{op}: need at least one tensor")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{op}: tensor {i} is {t.dtype} {list(t.shape)} on {t.device} but tensor 0 is "
                             f"{first.dtype} {list(first.shape)} on {first.device}; all must match")
    if not 0 <= dim < first.dim():
        raise ValueError(f"{op}: dim {dim} is out of range for {first.dim()}-D tensors (0 <= dim < {first.dim()})")
    extent = first.shape[dim]
    if block_size < 1 or extent % block_size:
        raise ValueError(f"{op}: block_size {block_size} must be >= 1 and divide the size {extent} of dim {dim}")
    return extent // block_size


def _check_apart(op: str, tensors: list[torch.Tensor]) -> None:
    """Tensors an op writes must not share memory: a block written through one would be read through
    another, and the backends' orders differ."""
    for j, t in enumerate(tensors):
        for i in range(j):
            if spans_overlap(tensors[i], t):
                raise ValueError(f"{op}: tensors {i} and {j} share memory (a tensor listed twice, or overlapping "
                                 f"views); each must be a separate tensor")


def _check_layer(op: str, layer: int, num_layers: int) -> None:
    if not 0 <= layer < num_layers:
        raise ValueError(f"{op}: layer {layer} is out of range for {num_layers} tensors")


def _check_index(op: str, name: str, index: torch.Tensor, shape: tuple, device: torch.device) -> None:
    """An int64 tensor on device with the given sizes (a str size, e.g. "M", matches any)."""
    fits = index.dim() == len(shape) and all(isinstance(s, str) or s == n for s, n in zip(shape, index.shape))
    if index.dtype != torch.int64 or not fits or index.device != device:
        raise ValueError(f"{op}: {name} must be an int64 tensor of shape {list(shape)} on {device}, got "
                         f"{index.dtype} {list(index.shape)} on {index.device}")


def _check_range(op: str, name: str, values: torch.Tensor, bound: int) -> None:
    if bool(((values < 0) | (values >= bound)).any()):
        raise ValueError(f"{op}: {name} has entries outside [0, {bound})")


def _check_distinct(op: str, layers: torch.Tensor, blocks: torch.Tensor, n_blocks: int, what: str) -> None:
    keys = layers * n_blocks + blocks
    if torch.unique(keys).numel() != keys.numel():
        raise ValueError(f"{op}: {what}")


def check_tables(op: str, tensors: list[torch.Tensor], layer: int, src_layer: torch.Tensor, src_block: torch.Tensor,
                 dim: int, block_size: int) -> int:
    """Checks gather / scatter arguments; returns the number of blocks per tensor."""
    n_blocks = _check_stack(op, tensors, dim, block_size)
    _check_layer(op, layer, len(tensors))
    for name, index in (("src_layer", src_layer), ("src_block", src_block)):
        _check_index(op, name, index, (n_blocks,), tensors[0].device)
    _check_range(op, "src_layer", src_layer, len(tensors))
    _check_range(op, "src_block", src_block, n_blocks)
    return n_blocks


def check_scatter_args(targets: list[torch.Tensor], layer: int, values: torch.Tensor, src_layer: torch.Tensor,
                       src_block: torch.Tensor, dim: int, block_size: int) -> None:
    op = "scatter_add_blocks_"
    n_blocks = check_tables(op, targets, layer, src_layer, src_block, dim, block_size)
    first = targets[0]
    if values.shape != first.shape or values.dtype != first.dtype or values.device != first.device:
        raise ValueError(f"{op}: values is {values.dtype} {list(values.shape)} on {values.device} but the targets "
                         f"are {first.dtype} {list(first.shape)} on {first.device}")
    _check_apart(op, targets)
    _check_distinct(op, src_layer, src_block, n_blocks, "a (src_layer, src_block) pair appears more than once")


def check_swap_args(tensors: list[torch.Tensor], pairs: torch.Tensor, dim: int, block_size: int) -> None:
    op = "swap_blocks_"
    n_blocks = _check_stack(op, tensors, dim, block_size)
    _check_apart(op, tensors)
    _check_index(op, "pairs", pairs, ("M", 4), tensors[0].device)
    _check_range(op, "pairs (layer columns 0 and 2)", pairs[:, 0::2], len(tensors))
    _check_range(op, "pairs (block columns 1 and 3)", pairs[:, 1::2], n_blocks)
    _check_distinct(op, torch.cat([pairs[:, 0], pairs[:, 2]]), torch.cat([pairs[:, 1], pairs[:, 3]]), n_blocks,
                    "a block appears in more than one place of pairs (swaps must be disjoint)")


# ---- references ----

def _blocked(t: torch.Tensor, dim: int, block_size: int) -> torch.Tensor:
    """A view of t with dim split into (blocks, block_size): block b is index b of dim."""
    return t.unflatten(dim, (t.shape[dim] // block_size, block_size))


def _read_blocks(tensors, layers, blocks, dim, block_size) -> torch.Tensor:
    """Blocks (layers[i], blocks[i]) side by side along dim, in the order i, as a new tensor."""
    views = [_blocked(t, dim, block_size) for t in tensors]
    shape = list(views[0].shape)
    shape[dim] = layers.numel()
    out = views[0].new_empty(shape)
    for source in layers.unique().tolist():
        positions = (layers == source).nonzero().squeeze(1)
        out.index_copy_(dim, positions, views[source].index_select(dim, blocks[positions]))
    return out


def gather_blocks_reference(tensors: list[torch.Tensor], layer: int, src_layer: torch.Tensor, src_block: torch.Tensor,
                            dim: int, block_size: int) -> torch.Tensor:
    """A new contiguous tensor shaped like tensors[layer] whose block b is block src_block[b] of
    tensors[src_layer[b]]."""
    check_tables("gather_blocks", tensors, layer, src_layer, src_block, dim, block_size)
    return _read_blocks(tensors, src_layer, src_block, dim, block_size).flatten(dim, dim + 1)


def scatter_add_blocks_reference(targets: list[torch.Tensor], layer: int, values: torch.Tensor,
                                 src_layer: torch.Tensor, src_block: torch.Tensor, dim: int, block_size: int) -> None:
    """In place: block src_block[b] of targets[src_layer[b]] += block b of values (torch's index_add_)."""
    check_scatter_args(targets, layer, values, src_layer, src_block, dim, block_size)
    values = values_apart(targets, values)
    blocked_values = _blocked(values, dim, block_size)
    for target in src_layer.unique().tolist():
        positions = (src_layer == target).nonzero().squeeze(1)
        _blocked(targets[target], dim, block_size).index_add_(dim, src_block[positions],
                                                              blocked_values.index_select(dim, positions))


def swap_blocks_reference(tensors: list[torch.Tensor], pairs: torch.Tensor, dim: int, block_size: int) -> None:
    """In place: for each row (layer_a, block_a, layer_b, block_b) of pairs, the two blocks trade places."""
    check_swap_args(tensors, pairs, dim, block_size)
    layer_a, block_a, layer_b, block_b = pairs.unbind(1)
    destinations = (torch.cat([layer_a, layer_b]), torch.cat([block_a, block_b]))
    moved = _read_blocks(tensors, torch.cat([layer_b, layer_a]), torch.cat([block_b, block_a]), dim, block_size)
    for target in destinations[0].unique().tolist():
        positions = (destinations[0] == target).nonzero().squeeze(1)
        _blocked(tensors[target], dim, block_size).index_copy_(dim, destinations[1][positions],
                                                               moved.index_select(dim, positions))


def values_apart(targets: list[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """values, or a copy of them where they share memory with a target: the adds read every value as it was
    before the call (a block added to would otherwise be read afterwards by some backends)."""
    return values.clone() if any(spans_overlap(t, values) for t in targets) else values


# ---- ops and their device kernels ----

def _served(backend, tensors: list[torch.Tensor]) -> bool:
    return backend is not None and bool(tensors) and backends.served_by_kernels(*tensors)


@op("scatter_add_blocks_", mutates_args=("targets",))
def scatter_add_blocks_(targets: list[torch.Tensor], layer: int, values: torch.Tensor, src_layer: torch.Tensor,
                        src_block: torch.Tensor, dim: int, block_size: int) -> None:
    """In place, for every block b of values: block src_block[b] of targets[src_layer[b]] += block b
    (the adjoint of gather_blocks(targets, layer, src_layer, src_block, dim, block_size); `layer`
    names that call and is only range-checked). Each (src_layer, src_block) pair may appear once."""
    scatter_add_blocks_reference(targets, layer, values, src_layer, src_block, dim, block_size)


def _scatter_add_with(backend, targets, layer, values, src_layer, src_block, dim, block_size):
    if not _served(backend, [*targets, values]):
        return scatter_add_blocks_reference(targets, layer, values, src_layer, src_block, dim, block_size)
    check_scatter_args(targets, layer, values, src_layer, src_block, dim, block_size)
    backend.scatter_add_blocks(list(targets), layer, values_apart(targets, values), src_layer.contiguous(),
                               src_block.contiguous(), dim, block_size)


@scatter_add_blocks_.register_kernel("cpu")
def _scatter_add_blocks_cpu(targets, layer, values, src_layer, src_block, dim, block_size):
    _scatter_add_with(backends.cpu_extension(), targets, layer, values, src_layer, src_block, dim, block_size)


@scatter_add_blocks_.register_kernel("cuda")
def _scatter_add_blocks_cuda(targets, layer, values, src_layer, src_block, dim, block_size):
    _scatter_add_with(backends.gpu_backend("permute"), targets, layer, values, src_layer, src_block, dim, block_size)


@op("gather_blocks", differentiable=True)
def gather_blocks(tensors: list[torch.Tensor], layer: int, src_layer: torch.Tensor, src_block: torch.Tensor, dim: int,
                  block_size: int) -> torch.Tensor:
    """A new tensor shaped like tensors[layer]: along dim, block b is block src_block[b] of
    tensors[src_layer[b]] (src_layer, src_block: int64, one entry per block; an unmoved block b has
    (layer, b); a block may be read more than once). Differentiable: each source tensor's gradient is
    the scatter-add of grad_out's blocks to the places they came from (None for tensors no block came
    from; zeros under torch.compile, whose graph cannot depend on the tables)."""
    return gather_blocks_reference(tensors, layer, src_layer, src_block, dim, block_size)


@gather_blocks.register_fake
def _(tensors, layer, src_layer, src_block, dim, block_size):
    return torch.empty_like(tensors[layer], memory_format=torch.contiguous_format)


def _gather_with(backend, tensors, layer, src_layer, src_block, dim, block_size):
    if not _served(backend, tensors):
        return gather_blocks_reference(tensors, layer, src_layer, src_block, dim, block_size)
    check_tables("gather_blocks", tensors, layer, src_layer, src_block, dim, block_size)
    return backend.gather_blocks(list(tensors), layer, src_layer.contiguous(), src_block.contiguous(), dim,
                                 block_size)


@gather_blocks.register_kernel("cpu")
def _gather_blocks_cpu(tensors, layer, src_layer, src_block, dim, block_size):
    return _gather_with(backends.cpu_extension(), tensors, layer, src_layer, src_block, dim, block_size)


@gather_blocks.register_kernel("cuda")
def _gather_blocks_cuda(tensors, layer, src_layer, src_block, dim, block_size):
    return _gather_with(backends.gpu_backend("permute"), tensors, layer, src_layer, src_block, dim, block_size)


def _gather_setup_context(ctx, inputs, output):
    tensors, layer, src_layer, src_block, dim, block_size = inputs
    ctx.save_for_backward(src_layer, src_block)
    ctx.num_layers, ctx.layer, ctx.dim, ctx.block_size = len(tensors), layer, dim, block_size


def _occurrence(keys: torch.Tensor) -> torch.Tensor:
    """For each entry, how many equal keys come before it (0 for a key's first entry)."""
    order = torch.argsort(keys, stable=True)
    ordered = keys[order]
    occurrence = torch.empty_like(keys)
    occurrence[order] = torch.arange(keys.numel(), device=keys.device) - torch.searchsorted(ordered, ordered)
    return occurrence


def _gather_backward(ctx, grad):
    src_layer, src_block = ctx.saved_tensors
    tables = (src_layer, src_block, ctx.num_layers, ctx.layer, ctx.dim, ctx.block_size)
    if torch.compiler.is_compiling():  # traced before the tables are known: one op, a gradient for every layer
        return list(_gather_blocks_backward(grad, *tables)), None, None, None, None, None
    return _gradients_by_layer(grad, *tables), None, None, None, None, None


def _gradients_by_layer(grad: torch.Tensor, src_layer: torch.Tensor, src_block: torch.Tensor, num_layers: int,
                        layer: int, dim: int, block_size: int) -> list[torch.Tensor | None]:
    """Scatters grad into zero gradients of the source layers (and of `layer`, the call's own), which
    are the scatter's targets, indexed by their rank among those layers. Tables that read a block more
    than once take one scatter per repeat (a scatter adds to each block once): in round r, the r-th
    reads of blocks go to their sources, the rest to a scratch tensor at their own distinct places.
    None for the layers no block came from."""
    layers = torch.cat([src_layer, src_layer.new_tensor([layer])]).unique()
    target = torch.searchsorted(layers, src_layer)
    own = int(torch.searchsorted(layers, layer))
    grads = [grad.new_zeros(grad.shape) for _ in range(layers.numel())]
    occurrence = _occurrence(target * src_block.numel() + src_block)
    rounds = int(occurrence.max()) + 1 if occurrence.numel() else 1
    targets = grads + [grad.new_zeros(grad.shape)] * (rounds > 1)
    grad = grad.contiguous()
    with torch.no_grad():  # first-order: under create_graph too, a gradient without a graph of its own
        for r in range(rounds):
            now = occurrence == r
            scatter_add_blocks_(targets, own, grad, torch.where(now, target, len(grads)),
                                torch.where(now, src_block, torch.arange(src_block.numel(), device=src_block.device)),
                                dim, block_size)
    used = set(src_layer.tolist())
    by_layer = {i: g for i, g in zip(layers.tolist(), grads) if i in used}
    return [by_layer.get(i) for i in range(num_layers)]


def _every_layer_like_grad(grad, src_layer, src_block, num_layers, layer, dim, block_size):
    return [torch.empty_like(grad, memory_format=torch.contiguous_format) for _ in range(num_layers)]


@op("_gather_blocks_backward", fake=_every_layer_like_grad)
def _gather_blocks_backward(grad: torch.Tensor, src_layer: torch.Tensor, src_block: torch.Tensor, num_layers: int,
                            layer: int, dim: int, block_size: int) -> list[torch.Tensor]:
    """gather_blocks' gradient of each of the num_layers tensors, zeros where no block came from: the backward a
    compiled graph runs, whose outputs cannot depend on the tables."""
    return [grad.new_zeros(grad.shape) if g is None else g
            for g in _gradients_by_layer(grad, src_layer, src_block, num_layers, layer, dim, block_size)]


gather_blocks.register_autograd(_gather_backward, setup_context=_gather_setup_context)


@op("swap_blocks_", mutates_args=("tensors",))
def swap_blocks_(tensors: list[torch.Tensor], pairs: torch.Tensor, dim: int, block_size: int) -> None:
    """In place: each row (layer_a, block_a, layer_b, block_b) of pairs (int64 [M, 4]) swaps block_a
    of tensors[layer_a] with block_b of tensors[layer_b]. No block may appear twice (ValueError): the
    swaps are disjoint, so their order does not matter and applying pairs twice restores the tensors."""
    swap_blocks_reference(tensors, pairs, dim, block_size)


def _swap_with(backend, tensors, pairs, dim, block_size):
    if not _served(backend, tensors):
        return swap_blocks_reference(tensors, pairs, dim, block_size)
    check_swap_args(tensors, pairs, dim, block_size)
    backend.swap_blocks(list(tensors), pairs.contiguous(), dim, block_size)


@swap_blocks_.register_kernel("cpu")
def _swap_blocks_cpu(tensors, pairs, dim, block_size):
    _swap_with(backends.cpu_extension(), tensors, pairs, dim, block_size)


@swap_blocks_.register_kernel("cuda")
def _swap_blocks_cuda(tensors, pairs, dim, block_size):
    _swap_with(backends.gpu_backend("permute"), tensors, pairs, dim, block_size)
