"""Perplexity of a plain text file, in consecutive non-overlapping windows of max_length tokens."""
from __future__ import annotations

import math
import os

import torch

from merge_engine.evaluation.data_files import raise_problems, read_text
from merge_engine.evaluation.loglikelihood import check_fits, check_vocabulary, token_logprobs
from merge_engine.evaluation.memory import scoring_bytes
from merge_engine.io.untrusted import is_int


class Perplexity:
    """exp(mean negative log-likelihood) of every predicted token: the text is tokenized once, the tokenizer's
    special tokens kept at its start only, and cut into windows of max_length tokens; each window predicts its
    tokens 1..n-1 (a last window of one token predicts nothing and is dropped)."""

    direction = "minimize"

    def __init__(self, path: str, tokenizer, max_length: int = 512, batch_size: int = 4):
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
        if not is_int(max_length):
            raise ValueError(f"max_length must be an integer, got {max_length!r}")
        self.path, self.batch_size = path, batch_size
        self.name = f"perplexity on {os.path.basename(path)}"
        text, problems = read_text(path)
        if max_length < 2:
            problems.append(f"max_length must be at least 2 (a window predicts its tokens after the first), "
                            f"got {max_length}")
        ids = leading_specials_only(tokenizer, text) if text else []
        if text is not None and not text.strip():
            problems.append(f"{path}: the file is empty")
        elif text is not None and len(ids) < 2:
            problems.append(f"{path}: the text gives {len(ids)} token(s); perplexity needs at least 2")
        raise_problems(problems, path)
        self.windows = [w for w in (ids[i:i + max_length] for i in range(0, len(ids), max_length)) if len(w) >= 2]

    def tokens(self) -> int:
        return sum(len(w) - 1 for w in self.windows)

    def memory_bytes(self, model: torch.nn.Module) -> int:
        """The most memory one call allocates beside the model's weights (evaluation.memory; the model may be on
        the meta device)."""
        return scoring_bytes(model, self.windows, [1] * len(self.windows), self.batch_size)

    def check_model(self, config) -> None:
        """Refuse a model (its transformers config) with fewer positions than a window needs, or a smaller
        vocabulary than the text's token ids."""
        check_fits(config, max(len(w) for w in self.windows) - 1, f"a window of {self.path}", self.path)
        check_vocabulary(config, max(max(w) for w in self.windows), self.path, self.path)

    def __call__(self, model: torch.nn.Module) -> float:
        self.check_model(getattr(model, "config", None))
        logprobs = token_logprobs(model, self.windows, self.batch_size)
        nll = -sum(float(lp.double().sum()) for lp in logprobs)
        return math.exp(nll / self.tokens())


def leading_specials_only(tokenizer, text: str) -> list[int]:
    """The text's token ids with the special tokens the tokenizer adds before it (BOS) but none after it (an EOS
    would be scored as the text's end at the end of the last window only)."""
    whole = tokenizer(text)["input_ids"]
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    for start in range(len(whole) - len(plain) + 1):
        if whole[start:start + len(plain)] == plain:
            return whole[:start + len(plain)]
    return whole  # the specials changed how the text tokenizes: keep them all rather than guess
