"""Log-probabilities of token sequences under a live causal LM, batched: the one forward pass every scorer
of this package shares."""
from __future__ import annotations

import inspect

import torch

from merge_engine.errors import ConfigError


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_fits(config, longest: int, what: str, source: str) -> None:
    """Refuse inputs longer than the position table of a model (its transformers config): a model would
    silently extrapolate (RoPE) or index out of range (learned positions) rather than score them."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise ConfigError([f"{what} feeds the model {longest} tokens, more than its max_position_embeddings "
                           f"({limit})"], source)


def carriers(sequences: list[list[int]]) -> list[int]:
    """For each sequence, the index of the sequence whose forward pass serves it: one whose fed tokens (all but
    the last) begin with its own fed tokens, itself when none does. A causal LM's logits at a position depend only
    on the tokens up to it, so the longer sequence's logits hold the shorter one's: a multiple-choice question
    whose choices are one token each (letters, single words) costs one row, not one per choice (lm-eval-harness
    shares those rows the same way)."""
    fed = [tuple(s[:-1]) for s in sequences]
    order = sorted(range(len(sequences)), key=fed.__getitem__)  # a prefix sorts just before what extends it
    carrier = list(range(len(sequences)))
    for at in range(len(order) - 2, -1, -1):
        i, after = order[at], order[at + 1]
        if fed[after][:len(fed[i])] == fed[i]:
            carrier[i] = carrier[after]
    return carrier


def token_logprobs(model: torch.nn.Module, sequences: list[list[int]], batch_size: int,
                   first: list[int] | None = None) -> list[torch.Tensor]:
    """For each sequence s (at least 2 tokens), the float32 CPU tensor of log p(s[j] | s[:j]) for j = f..len-1,
    in the input order, where f is its entry of `first` (default 1: every predicted token). Only the carriers'
    rows are fed (see carriers): s[:-1], right-padded with an attention mask, batch_size rows at a time sorted
    longest first (similar lengths share a batch; the first batch shows the peak memory). Logits are formed only
    from the first position any row of a batch needs on (transformers' logits_to_keep, where the model takes it)."""
    first = first or [1] * len(sequences)
    carrier = carriers(sequences)
    carried: dict[int, list[int]] = {}
    for i, c in enumerate(carrier):
        carried.setdefault(c, []).append(i)
    rows = sorted(carried, key=lambda c: -len(sequences[c]))
    device = model_device(model)
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    out: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                needs = [[(sequences[i], first[i]) for i in carried[c]] for c in batch]
                logprobs = _batch_logprobs(model, [sequences[c] for c in batch], needs, device, keeps_logits)
                for c, row in zip(batch, logprobs):
                    for i, lp in zip(carried[c], row):
                        out[i] = lp
    finally:
        model.train(was_training)
    return out


def _batch_logprobs(model: torch.nn.Module, batch: list[list[int]], needs: list[list[tuple[list[int], int]]],
                    device: torch.device, keeps_logits: bool) -> list[list[torch.Tensor]]:
    """Per fed row, per sequence it carries (s, f): log p(s[j] | s[:j]) for j = f..len(s)-1."""
    width = max(len(s) for s in batch) - 1
    ids = torch.zeros((len(batch), width), dtype=torch.long)  # pad id 0: masked, so any id does
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, s in enumerate(batch):
        ids[row, :len(s) - 1] = torch.tensor(s[:-1])
        mask[row, :len(s) - 1] = 1
    lowest = min(f - 1 for row in needs for _, f in row)  # the first position whose logits any row needs
    extra = {"logits_to_keep": width - lowest} if keeps_logits else {}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **extra).logits
    offset = width - logits.shape[1]  # position p is logits[:, p - offset]
    result = []
    for row, carried in enumerate(needs):
        lo, hi = min(f - 1 for _, f in carried), max(len(s) - 1 for s, _ in carried)
        # one row at a time in float32: the whole batch's float32 log-softmax would be batch x width x vocab
        logprobs = logits[row, lo - offset:hi - offset].float().log_softmax(-1)
        result.append([logprobs[f - 1 - lo:len(s) - 1 - lo].gather(
            -1, torch.tensor(s[f:], device=device).unsqueeze(-1)).squeeze(-1).cpu() for s, f in carried])
    return result
