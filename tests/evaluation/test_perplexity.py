"""Perplexity: batched windows against a plain one-window-at-a-time reference, and its file's problems."""
from __future__ import annotations

import math
import re

import pytest
import torch

from merge_engine.errors import ConfigError
from merge_engine.evaluation import Perplexity
from tests.evaluation.conftest import word_tokenizer
from tests.stats.tiny_text import SENTENCES

TEXT = "\n".join(SENTENCES * 3)  # 129 words


def reference_perplexity(model, ids: list[int], max_length: int) -> float:
    """One unpadded forward per window, float64 log-softmax; a one-token last window predicts nothing."""
    nll, predicted = 0.0, 0
    for start in range(0, len(ids), max_length):
        window = ids[start:start + max_length]
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([window])).logits[0].double().log_softmax(-1)
        nll -= sum(float(logprobs[j - 1, window[j]]) for j in range(1, len(window)))
        predicted += len(window) - 1
    return math.exp(nll / predicted)


@pytest.mark.parametrize("max_length, batch_size", [(16, 1), (16, 3), (40, 100), (64, 2)])
def test_batched_windows_equal_one_at_a_time(causal_lm, tokenizer, tmp_path, max_length, batch_size):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    ids = tokenizer(TEXT)["input_ids"]  # these tokenizers add at most a BOS, at the start
    evaluator = Perplexity(str(path), tokenizer, max_length=max_length, batch_size=batch_size)
    # fp32 model, fp32 log-probs summed in fp64: batching changes each log-prob by ~1e-6 relative (summation
    # order), and the mean NLL, hence log(perplexity), by as little
    assert evaluator(causal_lm) == pytest.approx(reference_perplexity(causal_lm, ids, max_length), rel=1e-5)
    # (64, 2) without a BOS: 129 tokens = 64 + 64 + a one-token window, dropped; with one: 130 = 64 + 64 + 2
    assert evaluator.tokens() == sum(len(ids[i:i + max_length]) - 1 for i in range(0, len(ids), max_length)
                                     if len(ids[i:i + max_length]) >= 2)
    assert (evaluator.name, evaluator.direction) == ("perplexity on text.txt", "minimize")


def test_an_eos_the_tokenizer_appends_is_dropped(tmp_path):
    from tokenizers import processors
    tokenizer = word_tokenizer(bos=True)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 3), ("<eos>", 1)])
    path = tmp_path / "text.txt"
    path.write_text("the cat sat")
    assert Perplexity(str(path), tokenizer, max_length=8).windows == [[3, 4, 6, 9]]


@pytest.mark.parametrize("content, max_length, problem", [
    (None, 16, "cannot read (No such file"),
    ("", 16, "the file is empty"),
    (" \n\n", 16, "the file is empty"),
    ("cat", 16, None),  # one token without a BOS; two with one
    ("the cat sat", 1, "max_length must be at least 2"),
])
def test_file_problems_are_refused_at_construction(tokenizer, tmp_path, content, max_length, problem):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_text(content)
    if problem is None and tokenizer.bos_token_id is not None:
        assert Perplexity(str(path), tokenizer, max_length=max_length).tokens() == 1
        return
    problem = problem or "the text gives 1 token(s); perplexity needs at least 2"
    with pytest.raises(ConfigError, match=re.escape(problem)) as error:
        Perplexity(str(path), tokenizer, max_length=max_length)
    assert error.value.source == str(path)


def test_a_window_longer_than_the_model_takes_is_refused_at_the_call(causal_lm, tokenizer, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT + "\n" + TEXT)  # 258 words: a first window of 200 tokens
    with pytest.raises(ConfigError, match=r"a window of .*text\.txt feeds the model 199 tokens, more than its "
                                          r"max_position_embeddings \(128\)"):
        Perplexity(str(path), tokenizer, max_length=200)(causal_lm)
