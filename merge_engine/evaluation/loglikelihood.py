"""Log-probabilities of token sequences under a live causal LM, batched: the one forward pass every scorer
of this package shares."""
from __future__ import annotations

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


def token_logprobs(model: torch.nn.Module, sequences: list[list[int]], batch_size: int) -> list[torch.Tensor]:
    """For each sequence s (at least 2 tokens), the float32 CPU tensor of log p(s[j] | s[:j]) for j = 1..len-1,
    in the input order. The model is fed s[:-1], right-padded with an attention mask, batch_size sequences at
    a time sorted longest first (similar lengths share a batch; the first batch shows the peak memory)."""
    device = model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                for i, logprobs in zip(batch, _batch_logprobs(model, [sequences[i] for i in batch], device)):
                    out[i] = logprobs
    finally:
        model.train(was_training)
    return out


def _batch_logprobs(model: torch.nn.Module, batch: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    width = max(len(s) for s in batch) - 1
    ids = torch.zeros((len(batch), width), dtype=torch.long)  # pad id 0: masked, so any id does
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, s in enumerate(batch):
        ids[row, :len(s) - 1] = torch.tensor(s[:-1])
        mask[row, :len(s) - 1] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    result = []
    for row, s in enumerate(batch):
        # one row at a time in float32: the whole batch's float32 log-softmax would be batch x width x vocab
        logprobs = logits[row, :len(s) - 1].float().log_softmax(-1)
        targets = torch.tensor(s[1:], device=device).unsqueeze(-1)
        result.append(logprobs.gather(-1, targets).squeeze(-1).cpu())
    return result
