"""A tiny in-memory Llama (no checkpoint is written, so these tests are not slow), word-level tokenizers over
its vocabulary, and small multiple-choice question files."""
from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from merge_engine.demo import tiny_config
from tests.stats.tiny_text import SPECIAL, WORDS

BOS = "<bos>"
# Answers are chosen by the tests from the model's own preferences; the choice counts differ (2 to 4).
QUESTIONS = [
    ("the cat sat on the", ["mat", "tree", "rug"]),
    ("a big red dog", ["ran far away", "sat", "flew over the tree", "slowly sat"]),
    ("the small bird", ["flew", "sat on the mat"]),
    ("then the dog", ["ran", "sat under the rug", "flew away"]),
    ("a blue cat slowly", ["sat", "ran quickly", "flew"]),
    ("", ["the cat", "a dog"]),  # an empty prompt: the BOS (or EOS) token stands for it
    ("the green tree and then", ["the bird flew", "a cat sat", "far away", "dog"]),
    ("dog", ["cat", "bird"]),
]


def word_tokenizer(bos: bool = False):
    """A word-level fast tokenizer over the stats tests' words (ids < 256, the tiny model's vocabulary); with
    bos, it adds <bos> before every text, as Llama's tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    tokens = [*SPECIAL, BOS, *WORDS]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", **({"bos_token": BOS} if bos else {}))


@pytest.fixture(scope="session", params=[False, True], ids=["no_bos", "bos"])
def tokenizer(request):
    return word_tokenizer(bos=request.param)


@pytest.fixture(scope="session")
def causal_lm():
    """A 2-layer fp32 Llama, initialised wide (std 0.3) so that its choices differ by clear margins."""
    from transformers import AutoModelForCausalLM
    config = tiny_config("llama", layers=2)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def write_questions(path, questions, answers) -> str:
    with open(path, "w") as f:
        for (prompt, choices), answer in zip(questions, answers):
            f.write(json.dumps({"question": prompt, "choices": choices, "answer": answer}) + "\n")
    return str(path)


@contextmanager
def real_tokens_fed(model):
    """The real (unpadded) tokens each forward of model is fed while inside, appended to the list it yields: the
    input_ids-wide end of its attention mask (the rest covers a copied cache)."""
    fed: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: fed.append(int(kwargs["attention_mask"][:, -kwargs["input_ids"].shape[1]:].sum())),
        with_kwargs=True)
    try:
        yield fed
    finally:
        hook.remove()
