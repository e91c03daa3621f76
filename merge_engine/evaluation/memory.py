"""The memory one evaluation allocates beside the model's weights, estimated from the model's config before any
weight is read, so that a merge session's memory plan keeps room for it (session.plan_memory's `evaluation`).

An upper bound of what scored_tokens' forwards hold at once, batch by batch as plan_batches feeds them, from the
transformer's widths:
    activations   per token, the widest layer's transient tensors (residual, norm, q/k/v and their rotated
                  copies, attention output; the MLP's gate, up and product)
    attention     the 4D mask (rows x width x keys, 4 bytes), and for eager attention the scores in the
                  model's dtype twice and in float32 (softmax); SDPA and flash kernels keep no scores
    cache         keys and values of every layer, per token: a shared prefix's, its copies to the rows, the
                  tails', and one layer's copy while the cache grows
    logits        the positions kept (logits_to_keep) x vocab, in the model's dtype (and a float32 copy of a 16-bit
                  model's: transformers 4 upcasts them); one row's float32 logits and log-softmax
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from merge_engine.evaluation.loglikelihood import Batch, cache_argument, carriers, plan_batches, served_by


@dataclass(frozen=True)
class ModelWidths:
    """Bytes per token of a causal LM's forward, from its transformers config and dtype."""

    activations: int  # the widest layer's transient tensors
    cache: int  # keys and values, every layer
    layer_cache: int  # keys and values, one layer
    logits: int  # one position's logits: the model's dtype, and a float32 copy below 32 bits (transformers 4)
    vocab: int
    heads: int
    itemsize: int
    eager: bool  # attention materialises its scores


def model_widths(config, dtype: torch.dtype) -> ModelWidths:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    layers, size = config.num_hidden_layers, dtype.itemsize
    attention = getattr(config, "_attn_implementation", None) or "eager"  # set when a model is built
    return ModelWidths(activations=size * (4 * hidden + 2 * heads * head_dim + 4 * kv + 3 * inner),
                       cache=2 * kv * layers * size, layer_cache=2 * kv * size,
                       logits=config.vocab_size * (size + (4 if size < 4 else 0)),
                       vocab=config.vocab_size, heads=heads, itemsize=size, eager=attention == "eager")


def forward_bytes(w: ModelWidths, rows: int, width: int, past: int, keep: int) -> int:
    """One forward of rows x width tokens after `past` cached ones, keeping `keep` positions' logits."""
    keys = past + width
    scores = rows * w.heads * width * keys * (2 * w.itemsize + 4) if w.eager else 0
    one_row_log_softmax = keep * w.vocab * 4 * 2  # float32 logits and their log-softmax
    return (rows * width * w.activations + rows * width * keys * 4 + scores + rows * keep * w.logits
            + one_row_log_softmax)


def batch_bytes(w: ModelWidths, batch: Batch, fed: dict[int, list[int]], need: dict[int, int]) -> int:
    """The most one batch of scored_tokens holds at once: its shared-prefix forwards, then its whole rows'."""
    peak = 0
    if batch.groups:
        groups, rows = len(batch.groups), sum(len(g.rows) for g in batch.groups)
        prefix = max(g.length for g in batch.groups)
        tail = max(len(fed[c]) - g.length for g in batch.groups for c in g.rows)
        keep = tail - min(need[c] - g.length for g in batch.groups for c in g.rows)
        prefix_cache, copies = groups * prefix * w.cache, rows * prefix * w.cache
        peak = max(forward_bytes(w, groups, prefix, 0, 1) + prefix_cache,
                   prefix_cache + copies + rows * tail * w.cache + rows * (prefix + tail) * w.layer_cache
                   + forward_bytes(w, rows, tail, prefix, keep))
    if batch.whole:
        width = max(len(fed[c]) for c in batch.whole)
        peak = max(peak, forward_bytes(w, len(batch.whole), width, 0, width - min(need[c] for c in batch.whole)))
    return peak


def scoring_bytes(model: torch.nn.Module, sequences: list[list[int]], first: list[int], batch_size: int) -> int:
    """The most memory scored_tokens(model, sequences, batch_size, first) allocates at once on the model's device,
    beside its weights (an upper bound: the module's docstring). model: its class, config and dtype are what
    count (built on the meta device, it holds no memory)."""
    if not sequences:
        return 0
    w = widths_of(model)
    carried = served_by(carriers(sequences))
    fed = {c: sequences[c][:-1] for c in carried}
    need = {c: min(first[i] for i in served) - 1 for c, served in carried.items()}
    batches = plan_batches(sequences, first, batch_size, carried, cache_argument(model) is not None,
                           getattr(model.config, "max_position_embeddings", None))
    return max(batch_bytes(w, batch, fed, need) for batch in batches)


def widths_of(model: torch.nn.Module) -> ModelWidths:
    return model_widths(model.config, next(model.parameters()).dtype)
