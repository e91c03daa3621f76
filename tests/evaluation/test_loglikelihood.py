"""token_logprobs: rows shared between sequences whose fed tokens one extends (carriers), the log-probs of only
the positions asked for, and logits formed only where needed, against whole unshared forwards."""
from __future__ import annotations

import random

import pytest
import torch

from merge_engine.evaluation.loglikelihood import carriers, token_logprobs, tokens_fed
from tests.evaluation.conftest import real_tokens_fed


def random_sequences(seed: int, count: int = 40) -> list[list[int]]:
    """Sequences over a small alphabet, many of them extending others (as choices extend one prompt)."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    for _ in range(count):
        base = list(rng.choice(out)) if out and rng.random() < 0.7 else []
        out.append(base[:rng.randint(0, len(base))] + [rng.randrange(4) for _ in range(rng.randint(2, 5))])
    return out


@pytest.mark.parametrize("seed", range(5))
def test_carriers_serve_every_sequence_from_the_fewest_rows(seed):
    sequences = random_sequences(seed)
    fed = [tuple(s[:-1]) for s in sequences]
    carrier = carriers(sequences)
    assert all(fed[c][:len(fed[i])] == fed[i] for i, c in enumerate(carrier))
    assert all(carrier[c] == c for c in carrier)
    # brute force: one row per distinct fed sequence that no other fed sequence strictly extends
    maximal = {f for f in fed if not any(len(g) > len(f) and g[:len(f)] == f for g in fed)}
    assert {fed[c] for c in carrier} == maximal and len(set(carrier)) == len(maximal)


class WithoutLogitsToKeep(torch.nn.Module):
    """The same model behind a forward that does not take logits_to_keep (as some architectures' do not)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


@pytest.mark.parametrize("batch_size", [1, 4, 100])
def test_shared_rows_and_asked_positions_equal_whole_forwards(causal_lm, batch_size):
    sequences = [[t + 10 for t in s] for s in random_sequences(7, 24)]
    first = [random.Random(i).randint(1, len(s) - 1) for i, s in enumerate(sequences)]
    with torch.no_grad():  # the reference: each sequence alone, unpadded, every position, float64 log-softmax
        whole = [causal_lm(input_ids=torch.tensor([s[:-1]])).logits[0].double().log_softmax(-1)
                 .gather(-1, torch.tensor(s[1:]).unsqueeze(-1)).squeeze(-1) for s in sequences]
    for model in (causal_lm, WithoutLogitsToKeep(causal_lm)):
        got = token_logprobs(model, sequences, batch_size, first)
        # fp32 model: padding, batching and the shorter logits matrix change only the order of fp32 sums
        # (ulp 6e-8 on activations of order 1): each log-prob moves by about 1e-6
        for g, w, f in zip(got, whole, first):
            assert g.dtype == torch.float32 and g.shape == (len(w) - f + 1,)
            assert torch.allclose(g.double(), w[f - 1:], atol=1e-5, rtol=0)


def tiny_lm(arch: str, attention: str):
    """A 2-layer fp32 causal LM of each position scheme and cache kind that shared prompts meet: rotary (Llama,
    Qwen2 with grouped-query attention), learned absolute positions (GPT-2), a sliding window shorter than the
    sequences (Mistral), sliding and global layers in turn (Gemma 2)."""
    import transformers as tf
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, initializer_range=0.3)
    config = {"llama": lambda: tf.LlamaConfig(**common),
              "qwen2": lambda: tf.Qwen2Config(**common, num_key_value_heads=2),
              "gpt2": lambda: tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                            initializer_range=0.3),
              "mistral": lambda: tf.MistralConfig(**common, num_key_value_heads=4, sliding_window=5),
              "gemma2": lambda: tf.Gemma2Config(**common, num_key_value_heads=4, head_dim=8, sliding_window=5)}[arch]()
    config._attn_implementation = attention
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def prompts_with_choices(seed: int) -> tuple[list[list[int]], list[int]]:
    """Multiple-choice-like sequences: prompts of 1-12 tokens, each followed by 2-4 continuations of 1-5 tokens
    (some one continuation's prefix), first = the prompt's length; and sequences scored whole (first = 1)."""
    rng = random.Random(seed)
    sequences, first = [], []
    for _ in range(7):
        prompt = [rng.randrange(1, 64) for _ in range(rng.randint(1, 12))]
        tails = [[rng.randrange(1, 64) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(2, 4))]
        tails[-1] = tails[0][:rng.randint(1, len(tails[0]))]  # shares the first's row where it is shorter
        sequences += [prompt + t for t in tails]
        first += [len(prompt)] * len(tails)
    sequences += [[rng.randrange(1, 64) for _ in range(rng.randint(2, 9))] for _ in range(3)]
    return sequences, first + [1] * 3


def few_shot_questions(seed: int) -> tuple[list[list[int]], list[int]]:
    """Questions after one of two few-shot prompts of 70 tokens (as lm-eval's MMLU puts a subject's examples before
    each of its questions), each of 3-10 tokens and answered by one-token letters (one row per question) or by
    phrases of 1-4 tokens; and two questions without a few-shot prompt."""
    rng = random.Random(seed)
    shots = [[rng.randrange(1, 64) for _ in range(70)] for _ in range(2)]
    sequences, first = [], []
    for k in range(9):
        prompt = ([] if k > 6 else shots[k % 2]) + [rng.randrange(1, 64) for _ in range(rng.randint(3, 10))]
        letters = k % 3 != 2
        choices = [[t] for t in rng.sample(range(1, 64), 4)] if letters else \
            [[rng.randrange(1, 64) for _ in range(rng.randint(1, 4))] for _ in range(3)]
        sequences += [prompt + c for c in choices]
        first += [len(prompt)] * len(choices)
    return sequences, first


class WithoutCache(torch.nn.Module):
    """A model whose forward takes the cache's arguments but returns no cache (shared prompts must fall back to
    feeding the rows whole)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask[:, -input_ids.shape[1]:],
                          use_cache=False)


@pytest.mark.parametrize("arch,attention", [(arch, attention) for arch in ("llama", "qwen2", "gpt2", "mistral")
                                            for attention in ("eager", "sdpa")] + [("gemma2", "eager")])  # no sdpa
@pytest.mark.parametrize("batch_size", [1, 3, 100])
@pytest.mark.parametrize("questions", [prompts_with_choices, few_shot_questions])
def test_shared_prompts_equal_whole_forwards(arch, attention, batch_size, questions):
    model = tiny_lm(arch, attention)
    sequences, first = questions(batch_size)
    with torch.no_grad():  # the reference: each sequence alone, unpadded, every position, float64 log-softmax
        whole = [model(input_ids=torch.tensor([s[:-1]]), use_cache=False).logits[0].double().log_softmax(-1)
                 .gather(-1, torch.tensor(s[1:]).unsqueeze(-1)).squeeze(-1) for s in sequences]
    with real_tokens_fed(model) as fed:
        got = token_logprobs(model, sequences, batch_size, first)
    # fp32: left padding, the cache's copies and batching change only the order of fp32 sums (ulp 6e-8 on
    # activations of order 1, logits of order 10 with this wide initialisation): each log-prob moves by ~1e-5
    for g, w, f in zip(got, whole, first):
        assert g.dtype == torch.float32 and g.shape == (len(w) - f + 1,)
        assert torch.allclose(g.double(), w[f - 1:], atol=5e-5, rtol=0)
    whole_rows = sum(len(sequences[c]) - 1 for c in set(carriers(sequences)))
    assert sum(fed) == tokens_fed(sequences, first, batch_size)
    assert sum(fed) < whole_rows if batch_size > 1 else sum(fed) == whole_rows  # one row a batch: nothing shared


def test_a_model_that_returns_no_cache_is_fed_whole_rows(causal_lm):
    sequences, first = prompts_with_choices(0)
    sequences = [[t + 10 for t in s] for s in sequences]
    wrapped = WithoutCache(causal_lm)
    want = token_logprobs(WithoutLogitsToKeep(causal_lm), sequences, 4, first)
    for g, w in zip(token_logprobs(wrapped, sequences, 4, first), want):
        assert torch.allclose(g, w, atol=1e-5, rtol=0)


def test_a_few_shot_prompt_is_fed_once_a_batch():
    """Rows of one few-shot prompt are batched together and feed it once; each letter question is one row."""
    model = tiny_lm("llama", "sdpa")
    sequences, first = few_shot_questions(0)
    with real_tokens_fed(model) as fed:
        token_logprobs(model, sequences, 8, first)
    rows = set(carriers(sequences))
    whole = sum(len(sequences[c]) - 1 for c in rows)
    # 7 questions share a 70-token prompt (4 of one, 3 of the other): each prompt fed once saves 5 x 70 tokens
    assert sum(fed) == tokens_fed(sequences, first, 8) <= whole - 5 * 70


def test_a_long_prompt_beside_long_choices_stays_within_the_positions():
    """A question of a long prompt and short choices beside one of a short prompt and long choices: by question,
    the prompts (left-padded to 119) and the tails (right-padded to 101) would span 220 positions, past GPT-2's
    128, though every real row fits (transformers 4's GPT-2 fails on its causal-mask buffer; padding numbered on
    from a long prompt indexes its position table out of range). The batch is fed another way, and right."""
    rng = random.Random(0)
    long_prompt, short_prompt = [rng.randrange(1, 64) for _ in range(120)], [rng.randrange(1, 64) for _ in range(5)]
    sequences = [long_prompt + [rng.randrange(1, 64) for _ in range(3)] for _ in range(2)]
    sequences += [short_prompt + [rng.randrange(1, 64) for _ in range(100)] for _ in range(2)]
    first = [120, 120, 5, 5]
    model = tiny_lm("gpt2", "eager")
    with torch.no_grad():
        whole = [model(input_ids=torch.tensor([s[:-1]])).logits[0].double().log_softmax(-1)
                 .gather(-1, torch.tensor(s[1:]).unsqueeze(-1)).squeeze(-1) for s in sequences]
    for g, w, f in zip(token_logprobs(model, sequences, 4, first), whole, first):
        assert torch.allclose(g.double(), w[f - 1:], atol=5e-5, rtol=0)  # fp32, as above


def test_the_rows_of_a_question_with_a_short_prompt_share_a_batch():
    """Three questions of 20-token prompts and four multi-token choices, four rows a batch: each batch is one
    question, feeding its prompt (but its last token) once and then each choice's tokens."""
    rng = random.Random(2)
    sequences, first, ideal = [], [], 0
    for _ in range(3):
        prompt = [rng.randrange(1, 64) for _ in range(20)]
        choices = [[rng.randrange(1, 64) for _ in range(rng.randint(2, 6))] for _ in range(4)]
        sequences += [prompt + c for c in choices]
        first += [20] * 4
        ideal += 19 + sum(map(len, choices))  # each row's tail: the prompt's last token and the choice but its last
    assert tokens_fed(sequences, first, 4) == ideal


class RunsOutOfMemory(torch.nn.Module):
    """A model whose forward fails as a GPU out of memory does when fed more than `rows` rows at once."""

    def __init__(self, model, rows: int):
        super().__init__()
        self.model, self.rows, self.fed = model, rows, []
        self.config = model.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None, logits_to_keep=0):
        if input_ids.shape[0] > self.rows:
            raise torch.OutOfMemoryError("CUDA out of memory (a test's)")
        self.fed.append(input_ids.shape[0])
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep)


@pytest.mark.parametrize("questions", [prompts_with_choices, few_shot_questions])
def test_a_batch_out_of_memory_is_fed_again_in_halves(questions, caplog):
    model = tiny_lm("llama", "sdpa")
    sequences, first = questions(3)
    expected = token_logprobs(model, sequences, 2, first)
    small = RunsOutOfMemory(model, rows=2)
    with caplog.at_level("WARNING", logger="merge_engine.evaluation.loglikelihood"):
        got = token_logprobs(small, sequences, 16, first)
    assert small.fed and max(small.fed) <= 2
    assert "out of memory feeding" in caplog.text
    # other batches: other padding, so the order of fp32 sums moves each log-prob by about 1e-6 (as above)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and torch.allclose(g, e, atol=1e-5, rtol=0)
    with pytest.raises(torch.OutOfMemoryError):  # one row that does not fit is the caller's to handle
        token_logprobs(RunsOutOfMemory(model, rows=0), sequences, 16, first)
