"""Public against keyed outputs of one model on given prompts: does a key really change what the model predicts?

Both configurations of a KeyedModel run on the same tokens (one copy of the weights, nothing rewritten). At every
position of a prompt, the last one included (each predicts the token after it), we take
KL(keyed || public) = sum_v p_keyed(v) (log p_keyed(v) - log p_public(v)), in nats, computed in float32 (float64 for
a float64 model), and whether the two most likely next tokens agree. Each prompt reports the mean over its positions.
The overall figures are means over all positions of all prompts, so every token weighs the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from merge_engine.devices import resolve_device
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.tiers.apply import Keys, resolve
from merge_engine.tiers.forward import KEYED, PUBLIC, KeyedModel


@dataclass(frozen=True)
class PromptComparison:
    text: str
    tokens: int
    kl: float  # mean KL(keyed || public) over the prompt's positions, nats
    agreement: float  # share of positions whose top-1 next tokens agree


@dataclass(frozen=True)
class Comparison:
    model: str
    prompts: tuple[PromptComparison, ...]

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.prompts)

    @property
    def mean_kl(self) -> float:
        return sum(p.kl * p.tokens for p in self.prompts) / self.tokens

    @property
    def agreement(self) -> float:
        return sum(p.agreement * p.tokens for p in self.prompts) / self.tokens

    def table(self, text_width: int = 40) -> str:
        lines = [f"{self.model}: public vs keyed next-token distributions",
                 f"{'prompt':>6} {'tokens':>6} {'KL(keyed||public)':>17} {'top-1 agree':>11}  text"]
        for i, p in enumerate(self.prompts, 1):
            text = p.text if len(p.text) <= text_width else p.text[:text_width - 3] + "..."
            lines.append(f"{i:>6} {p.tokens:>6} {nats(p.kl):>17} {100 * p.agreement:>10.1f}%  {text}")
        lines.append(f"{'all':>6} {self.tokens:>6} {nats(self.mean_kl):>17} {100 * self.agreement:>10.1f}%  "
                     f"(means over all {self.tokens} positions; KL in nats)")
        return "\n".join(lines)


def nats(kl: float) -> str:
    """A KL for the table: below 1e-3 in exponent form, so that a key that changes a model a little (a tiny or
    nearly uniform model) does not read 0.000000, which only the identity gives."""
    return f"{kl:.6f}" if kl == 0 or kl >= 1e-3 else f"{kl:.3e}"


def position_divergence(public_logits: torch.Tensor, keyed_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (leading dimensions kept): KL(keyed || public) and whether the top-1 tokens agree."""
    dtype = torch.promote_types(public_logits.dtype, torch.float32)
    log_public = F.log_softmax(public_logits.to(dtype), dim=-1)
    log_keyed = F.log_softmax(keyed_logits.to(dtype), dim=-1)
    kl = F.kl_div(log_public, log_keyed, reduction="none", log_target=True).sum(-1)
    kl.clamp_(min=0)  # a KL is never negative; rounding of nearly equal distributions can make the sum so
    return kl, public_logits.argmax(-1) == keyed_logits.argmax(-1)


@torch.no_grad()
def compare_batch(keyed: KeyedModel, batch: dict[str, torch.Tensor]) -> list[tuple[int, float, float]]:
    """(tokens, mean KL, agreement) of each sequence of a right-padded batch."""
    logits = {}
    for name in (PUBLIC, KEYED):
        with keyed.configuration(name):
            logits[name] = keyed(**batch).logits
    kl, agree = position_divergence(logits[PUBLIC], logits[KEYED])
    mask = batch["attention_mask"].bool()
    return [(int(m.sum()), kl[row][m].mean().item(), agree[row][m].double().mean().item())
            for row, m in enumerate(mask)]


def compare_configurations(keyed: KeyedModel, texts: list[str], batches: list[dict[str, torch.Tensor]]) -> Comparison:
    """Compare the two configurations on tokenized batches of the given texts (in the same order)."""
    device = next(keyed.model.parameters()).device
    rows = [row for batch in batches for row in compare_batch(keyed, {k: v.to(device) for k, v in batch.items()})]
    return Comparison(keyed.name, tuple(PromptComparison(text, *row) for text, row in zip(texts, rows, strict=True)))


def compare_prompts(model_dir: str, keys: Keys, prompts: str, max_length: int = 128, batch_size: int = 8,
                    max_examples: int | None = None, device: str = "auto",
                    dtype: torch.dtype | None = None) -> Comparison:
    """Load the model and tokenizer of model_dir and compare its public and keyed outputs on a prompts file
    (plain text, one prompt per line, or .jsonl with a "text" field; see merge_engine.stats.data)."""
    # imported here: the statistics modules are needed by this entry point only
    from merge_engine.stats.data import load_data, read_texts
    from merge_engine.stats.models import load_model, resolve_max_length, vocab_size_of
    ckpt = Checkpoint(model_dir)
    try:
        resolve(keys, ckpt)  # refuse keys made for another model before loading it
    finally:
        ckpt.close()
    max_length = resolve_max_length(model_dir, ckpt.config, max_length)  # no more positions than the model has
    data = load_data(prompts, model_dir, max_length, max_examples, vocab_size_of(ckpt.config))
    model = load_model(model_dir, dtype, resolve_device(device)).eval()
    keyed = KeyedModel(model, keys)
    return compare_configurations(keyed, read_texts(prompts, max_examples), data.batches(batch_size))
