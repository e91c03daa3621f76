"""The memory one evaluation allocates beside the model's weights, estimated from the model's class, config and
dtype before any weight is read (the model may be on the meta device), so that a merge session's memory plan keeps
room for it (session.plan_memory's `evaluation`).

An upper bound of what scored_tokens' forwards hold at once, batch by batch as plan_batches feeds them, from the
transformer's widths:
    activations   per token, the widest layer's transient tensors: residual, norm, q/k/v and their rotated
                  copies, attention output; the MLP's gate, up and product (a mixture of experts: each routed
                  expert's and the shared expert's, and the tokens' copies to their experts)
    attention     the 4D mask (rows x width x keys, in the model's dtype or bool; one per kind of layer where
                  sliding-window and full layers alternate); for eager attention the scores in the model's
                  dtype, and softmax's float32 input copy (16-bit models) and output; SDPA and flash kernels keep
                  no scores
    cache         keys and values of every layer, per token: a shared prefix's, its copies to the rows, the
                  tails', and one layer's copy while the cache grows (sliding-window layers counted whole)
    logits        the positions kept (all of them where the forward takes no logits_to_keep) x vocab in the
                  model's dtype; twice for models that rescale them (Gemma 2's soft-capping, Granite's and
                  Cohere's logit scale); a float32 copy of a 16-bit model's under transformers before 4.46, which
                  upcast them; one row's float32 logits (a copy, 16-bit models) and log-softmax
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from merge_engine.evaluation.loglikelihood import (
    Batch,
    cache_argument,
    carriers,
    fed_and_needed,
    keeps_logits,
    plan_batches,
    served_by,
    text_config,
)

RESCALED_LOGITS = ("final_logit_softcapping", "logits_scaling", "logit_scale")  # config keys of a second logits tensor


@dataclass(frozen=True)
class ModelWidths:
    """Bytes per token (or per attention score) of a causal LM's forward, from its class, config and dtype."""

    activations: int  # the widest layer's transient tensors
    cache: int  # keys and values, every layer
    layer_cache: int  # keys and values, one layer
    logits: int  # one kept position's logits, every copy the forward makes
    row_logits: int  # one position of one row's float32 logits and log-softmax (pick)
    score: int  # one attention score, eager (0: kernels that keep none)
    masks: int  # 4D masks, one per kind of layer (full, sliding)
    queries: int  # heads x head_dim
    heads: int
    vocab: int
    itemsize: int
    keeps_logits: bool  # the forward takes logits_to_keep


def model_widths(model: torch.nn.Module) -> ModelWidths:
    config, size = text_config(model.config), next(model.parameters()).dtype.itemsize
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    layers, half = config.num_hidden_layers, size < 4
    eager = (getattr(config, "_attn_implementation", None) or "eager") == "eager"  # set when a model is built
    copies = 2 if any(getattr(config, k, None) is not None for k in RESCALED_LOGITS) else 1
    return ModelWidths(activations=size * (4 * hidden + 2 * heads * head_dim + 4 * kv + mlp_width(config)),
                       cache=2 * kv * layers * size, layer_cache=2 * kv * size,
                       logits=config.vocab_size * (copies * size + (4 if half and upcasts_logits() else 0)),
                       row_logits=config.vocab_size * (8 if half else 4),
                       score=(size + 8 if half else 8) if eager else 0, queries=heads * head_dim, heads=heads,
                       vocab=config.vocab_size, masks=len(set(getattr(config, "layer_types", None) or [0])),
                       itemsize=size, keeps_logits=keeps_logits(model))


def mlp_width(config) -> int:
    """Elements per token an MLP block holds at once: gate, up and their product; for a mixture of experts, each of
    the top-k routed experts' (input copy, gate, up, product), the shared expert's, and the tokens' copies."""
    hidden = config.hidden_size
    dense = 3 * (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not top_k:
        return dense
    routed = getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", None) or 4 * hidden
    shared = (getattr(config, "shared_expert_intermediate_size", None)
              or (getattr(config, "n_shared_experts", None) or 0) * routed)
    return max(dense, top_k * (4 * routed + 2 * hidden) + 3 * shared)


def upcasts_logits() -> bool:
    """transformers before 4.46 returned a causal LM's logits in float32 (transformers#33902)."""
    import transformers
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return (major, minor) < (4, 46)


def forward_bytes(w: ModelWidths, rows: int, width: int, past: int, keep: int, span: int) -> int:
    """One forward of rows x width tokens after `past` cached ones, asking for the last `keep` positions' logits,
    of which one row's log-softmax takes `span`."""
    keys, kept = past + width, keep if w.keeps_logits else width
    return (rows * width * w.activations + rows * width * keys * (w.masks * w.itemsize + w.heads * w.score)
            + rows * kept * w.logits
            + span * w.row_logits)


def batch_bytes(w: ModelWidths, batch: Batch, fed: dict[int, list[int]], need: dict[int, int]) -> int:
    """The most one batch of scored_tokens holds at once: its shared-prefix forwards, then its whole rows'."""
    peak = 0
    if batch.groups:
        groups, rows = len(batch.groups), sum(len(g.rows) for g in batch.groups)
        prefix = max(g.length for g in batch.groups)
        tail = max(len(fed[c]) - g.length for g in batch.groups for c in g.rows)
        keep = tail - min(need[c] - g.length for g in batch.groups for c in g.rows)
        span = max(len(fed[c]) - need[c] for g in batch.groups for c in g.rows)
        prefix_cache, copies = groups * prefix * w.cache, rows * prefix * w.cache
        peak = max(forward_bytes(w, groups, prefix, 0, 1, 0) + prefix_cache,
                   prefix_cache + copies + rows * tail * w.cache + rows * (prefix + tail) * w.layer_cache
                   + forward_bytes(w, rows, tail, prefix, keep, span))
    if batch.whole:
        width = max(len(fed[c]) for c in batch.whole)
        keep = width - min(need[c] for c in batch.whole)
        span = max(len(fed[c]) - need[c] for c in batch.whole)
        peak = max(peak, forward_bytes(w, len(batch.whole), width, 0, keep, span))
    return peak


def scoring_bytes(model: torch.nn.Module, sequences: list[list[int]], first: list[int], batch_size: int) -> int:
    """The most memory scored_tokens(model, sequences, batch_size, first) allocates at once on the model's device,
    beside its weights (an upper bound: the module's docstring)."""
    if not sequences:
        return 0
    w = model_widths(model)
    carried = served_by(carriers(sequences))
    fed, need = fed_and_needed(sequences, first, carried)
    batches = plan_batches(sequences, first, batch_size, carried, cache_argument(model) is not None,
                           getattr(text_config(model.config), "max_position_embeddings", None))
    return max(batch_bytes(w, batch, fed, need) for batch in batches)


def generation_bytes(model: torch.nn.Module, rows: int, prompt: int, total: int) -> int:
    """The most memory generate() holds for rows prompts of `prompt` tokens grown to `total`: the prompts' forward,
    the cache (and one layer's copy as it grows), and a decoding step: its forward, one layer's keys and values
    repeated to every query head (transformers repeats them for SDPA too where a padding mask is given; eager
    attention copies them once more, SDPA on a CPU widens 16-bit ones), and the next tokens' float32 logits, their processed scores and a float32
    buffer of the CPU's 16-bit matrix product."""
    w = model_widths(model)
    cache = rows * total * (w.cache + w.layer_cache)
    per_value = 2 * w.itemsize if w.score else w.itemsize + (4 if w.itemsize < 4 else 0)  # SDPA's math on a CPU
    repeated = rows * total * 2 * w.queries * per_value  # widens 16-bit keys and values to float32
    step = forward_bytes(w, rows, 1, total, 1, 0) + repeated + rows * w.vocab * 4 * 3
    return max(forward_bytes(w, rows, prompt, 0, 1, 0), cache + step)
