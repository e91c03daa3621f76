"""Log-probabilities of token sequences under a live causal LM, batched: the one forward pass every scorer
of this package shares."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

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


@dataclass(frozen=True)
class SharedPrefix:
    """Rows (carriers) of one forward that need logits only after a common prefix of `length` tokens: the prefix
    is fed once, its key-value cache copied to each row, and each row feeds only its tail."""
    length: int
    rows: list[int]


def row_plan(sequences: list[list[int]], first: list[int], batch_size: int,
             carried: dict[int, list[int]]) -> tuple[list[SharedPrefix], list[int]]:
    """The rows that share a prefix, in groups of at most batch_size rows, and the rows fed whole. A row's
    prefix is its tokens before the first position whose logits it needs (for a multiple-choice question, the
    prompt but its last token): two or more rows with the same nonempty prefix share it."""
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for c, served in carried.items():
        by_prefix.setdefault(tuple(sequences[c][:min(first[i] for i in served) - 1]), []).append(c)
    shared, whole = [], []
    for prefix, rows in by_prefix.items():
        for at in range(0, len(rows), batch_size):
            group = rows[at:at + batch_size]
            if prefix and len(group) > 1:
                shared.append(SharedPrefix(len(prefix), group))
            else:
                whole += group
    return shared, whole


def tokens_fed(sequences: list[list[int]], first: list[int], batch_size: int) -> int:
    """Tokens token_logprobs feeds a model that takes a key-value cache: each shared prefix once per group, each
    row's tail, each whole row."""
    carried = served_by(carriers(sequences))
    shared, whole = row_plan(sequences, first, batch_size, carried)
    return (sum(g.length + sum(len(sequences[c]) - 1 - g.length for c in g.rows) for g in shared)
            + sum(len(sequences[c]) - 1 for c in whole))


def served_by(carrier: list[int]) -> dict[int, list[int]]:
    """Each carrier row, with the sequences it serves."""
    carried: dict[int, list[int]] = {}
    for i, c in enumerate(carrier):
        carried.setdefault(c, []).append(i)
    return carried


def token_logprobs(model: torch.nn.Module, sequences: list[list[int]], batch_size: int,
                   first: list[int] | None = None) -> list[torch.Tensor]:
    """For each sequence s (at least 2 tokens), the float32 CPU tensor of log p(s[j] | s[:j]) for j = f..len-1
    (see scored_tokens)."""
    return [logprobs for logprobs, _ in scored_tokens(model, sequences, batch_size, first)]


def scored_tokens(model: torch.nn.Module, sequences: list[list[int]], batch_size: int,
                  first: list[int] | None = None, greedy: bool = False) -> list[tuple[torch.Tensor, bool | None]]:
    """For each sequence s (at least 2 tokens), the float32 CPU tensor of log p(s[j] | s[:j]) for j = f..len-1,
    in the input order, where f is its entry of `first` (default 1: every predicted token). Only the carriers'
    rows are fed (see carriers), and rows that need logits only after a common prefix feed it once (see row_plan;
    where the model takes a key-value cache and position ids). Rows are fed right-padded with an attention mask,
    batch_size rows at a time, longest first (similar lengths share a batch; the first batch of each kind shows
    the peak memory). Logits are formed only from the first position any row of a batch needs (transformers'
    logits_to_keep, where the model takes it). With greedy, each sequence's flag says whether every one of those
    tokens is the most likely one at its position (the first of equal maxima, as argmax; lm-eval's is_greedy);
    else it is None."""
    first = first or [1] * len(sequences)
    carried = served_by(carriers(sequences))
    forward = Forward(model, greedy)
    shared, whole = row_plan(sequences, first, batch_size, carried) if forward.cache_name else ([], list(carried))
    needs = {c: [(sequences[i], first[i]) for i in served] for c, served in carried.items()}
    out: list[tuple[torch.Tensor, bool | None]] = [(torch.empty(0), None)] * len(sequences)

    def keep(rows: list[int], scores: list[list[tuple[torch.Tensor, bool | None]]]) -> None:
        for c, row in zip(rows, scores):
            for i, score in zip(carried[c], row):
                out[i] = score

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            shared.sort(key=lambda g: -max(len(sequences[c]) for c in g.rows))
            for batch in pack(shared, batch_size):
                rows = [c for g in batch for c in g.rows]
                scores = forward.shared_prefixes(batch, sequences, [needs[c] for c in rows])
                if scores is None:  # the model returned no usable cache: feed these rows whole
                    whole += rows
                    continue
                keep(rows, scores)
            whole.sort(key=lambda c: -len(sequences[c]))
            for start in range(0, len(whole), batch_size):
                rows = whole[start:start + batch_size]
                keep(rows, forward.whole_rows([sequences[c] for c in rows], [needs[c] for c in rows]))
    finally:
        model.train(was_training)
    return out


def pack(groups: list[SharedPrefix], batch_size: int) -> list[list[SharedPrefix]]:
    """Consecutive groups, as many to a batch as fit in batch_size rows."""
    batches: list[list[SharedPrefix]] = []
    for g in groups:
        if batches and sum(len(h.rows) for h in batches[-1]) + len(g.rows) <= batch_size:
            batches[-1].append(g)
        else:
            batches.append([g])
    return batches


class Forward:
    """A causal LM's forward passes as token_logprobs feeds it, with the keyword arguments this model takes."""

    def __init__(self, model: torch.nn.Module, greedy: bool):
        params = inspect.signature(model.forward).parameters
        self.model, self.device, self.greedy = model, model_device(model), greedy
        self.keeps_logits = "logits_to_keep" in params
        encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        # transformers 5 names the cache argument `cache`, earlier versions `past_key_values`
        cache_name = next((n for n in ("cache", "past_key_values") if n in params), None)
        self.cache_name = cache_name if "position_ids" in params and not encoder_decoder else None

    def whole_rows(self, batch: list[list[int]], needs: list[list[tuple[list[int], int]]]
                   ) -> list[list[tuple[torch.Tensor, bool | None]]]:
        """Per fed row, per sequence it carries (s, f): pick's scores of it."""
        ids, mask = right_padded([s[:-1] for s in batch])
        lowest = min(f - 1 for row in needs for _, f in row)  # the first position whose logits any row needs
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False,
                            **self.keep(ids.shape[1] - lowest)).logits
        offset = ids.shape[1] - logits.shape[1]  # position p is logits[:, p - offset]
        return [pick(logits[row], carried, offset, self.greedy) for row, carried in enumerate(needs)]

    def shared_prefixes(self, groups: list[SharedPrefix], sequences: list[list[int]],
                        needs: list[list[tuple[list[int], int]]]) -> list[list[tuple[torch.Tensor, bool | None]]] | None:
        """whole_rows' result for the groups' rows, feeding each group's prefix once: the prefixes left-padded
        (so each ends where its rows' tails begin, as generate() pads prompts), their cache copied to each row,
        the tails right-padded after it, with position ids counted from each row's first real token."""
        prefixes, prefix_mask = left_padded([sequences[g.rows[0]][:g.length] for g in groups])
        out = self.model(input_ids=prefixes.to(self.device), attention_mask=prefix_mask.to(self.device),
                         position_ids=positions(prefix_mask).to(self.device), use_cache=True, **self.keep(1))
        cache = out["cache"] if "cache" in out else out.get("past_key_values")
        if not hasattr(cache, "batch_select_indices"):
            return None
        group_of_row = torch.tensor([k for k, g in enumerate(groups) for _ in g.rows])
        cache.batch_select_indices(group_of_row.to(self.device))
        lengths = [g.length for g in groups for _ in g.rows]
        tails, tail_mask = right_padded([sequences[c][g.length:-1] for g in groups for c in g.rows])
        mask = torch.cat([prefix_mask[group_of_row], tail_mask], dim=1)
        tail_positions = torch.tensor(lengths).unsqueeze(1) + torch.arange(tails.shape[1])
        # every group has a row that needs the logits of its tail's first token (row_plan): keep them all
        logits = self.model(input_ids=tails.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=tail_positions.to(self.device), use_cache=True,
                            **{self.cache_name: cache}).logits
        return [pick(logits[row], carried, m, self.greedy) for row, (carried, m) in enumerate(zip(needs, lengths))]

    def keep(self, positions: int) -> dict:
        return {"logits_to_keep": positions} if self.keeps_logits else {}


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, each row at the left (pad id 0: masked, so any id does)."""
    ids = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, row in enumerate(rows):
        ids[k, :len(row)], mask[k, :len(row)] = torch.tensor(row), 1
    return ids, mask


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, each row at the right."""
    ids, mask = right_padded([row[::-1] for row in rows])
    return ids.flip(1), mask.flip(1)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token (padding gets 0; it is masked)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def pick(logits: torch.Tensor, carried: list[tuple[list[int], int]], shift: int, greedy: bool
         ) -> list[tuple[torch.Tensor, bool | None]]:
    """From one row's logits (position p at index p - shift), for each sequence it carries (s, f): log p(s[j] | s[:j])
    for j = f..len(s)-1, in float32 on the CPU, and with greedy whether each s[j] is the argmax there (else None)."""
    lo, hi = min(f - 1 for _, f in carried), max(len(s) - 1 for s, _ in carried)
    # one row at a time in float32: the whole batch's float32 log-softmax would be batch x width x vocab
    logprobs = logits[lo - shift:hi - shift].float().log_softmax(-1)
    out = []
    for s, f in carried:
        rows, tokens = logprobs[f - 1 - lo:len(s) - 1 - lo], torch.tensor(s[f:], device=logits.device)
        chosen = rows.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).cpu()
        out.append((chosen, bool((rows.argmax(-1) == tokens).all()) if greedy else None))
    return out
