"""token_logprobs: rows shared between sequences whose fed tokens one extends (carriers), the log-probs of only
the positions asked for, and logits formed only where needed, against whole unshared forwards."""
from __future__ import annotations

import random

import pytest
import torch

from merge_engine.evaluation.loglikelihood import carriers, token_logprobs


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
