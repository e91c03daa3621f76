"""Log-probabilities of token sequences under a live causal LM, batched: the one forward pass every scorer
of this package shares."""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from merge_engine.errors import ConfigError

log = logging.getLogger(__name__)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_fits(config, longest: int, what: str, source: str) -> None:
    """Refuse inputs longer than the position table of a model (its transformers config): a model would
    silently extrapolate (RoPE) or index out of range (learned positions) rather than score them."""
    limit = getattr(text_config(config), "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise ConfigError([f"{what} feeds the model {longest} tokens, more than its max_position_embeddings "
                           f"({limit})"], source)


def text_config(config):
    """The config of a model's language part: a multimodal model's (Qwen2-VL's) text_config, else the config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_vocabulary(config, largest: int, what: str, source: str) -> None:
    """Refuse token ids beyond a model's embedding table (its transformers config's vocab_size): the lookup would
    fail mid-evaluation, on a GPU with a device-side assert that ends the process' use of CUDA."""
    vocab = getattr(text_config(config), "vocab_size", None)
    if isinstance(vocab, int) and largest >= vocab:
        raise ConfigError([f"{what} holds token id {largest}, beyond the model's vocabulary of {vocab} tokens (data "
                           "tokenized for another model?)"], source)


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


TRUNK_KEY = 64  # rows whose first 64 fed tokens agree (a few-shot prompt, an instruction) are batched together


@dataclass(frozen=True)
class SharedPrefix:
    """Rows (carriers) of one forward that all begin with the same `length` tokens, none needing logits inside
    them: the prefix is fed once, its key-value cache copied to each row, and each row feeds only its tail."""
    length: int
    rows: list[int]


@dataclass(frozen=True)
class Batch:
    """At most batch_size rows fed together: `groups` sharing prefixes (one forward for the prefixes, one for the
    rest), and `whole` rows (a forward of their own)."""
    groups: list[SharedPrefix]
    whole: list[int]

    def rows(self) -> list[int]:
        return [c for g in self.groups for c in g.rows] + self.whole


def plan_batches(sequences: list[list[int]], first: list[int], batch_size: int, carried: dict[int, list[int]],
                 share: bool, position_limit: int | None = None) -> list[Batch]:
    """The carriers' rows in batches, each fed the cheapest of three ways (with share; else whole): whole rows;
    a question's rows (same tokens before the first position whose logits they need: for a multiple choice, the
    prompt but its last token) feeding that prompt once; or every row of the batch feeding their common first
    tokens (a few-shot prompt, an instruction) once. Rows are ordered so that batches hold rows alike: by the
    first TRUNK_KEY tokens they share, then by question, longest first; the rows of several questions that share
    their first TRUNK_KEY tokens fill batches of their own. position_limit: the model's position table, if known."""
    fed, need = fed_and_needed(sequences, first, carried)
    prompt = {c: tuple(fed[c][:need[c]]) for c in carried}
    # a row's cluster: its first TRUNK_KEY tokens where its prompt is longer, else its question (its prompt), else
    # itself (no prompt: a perplexity window)
    cluster = {c: tuple(fed[c][:TRUNK_KEY]) if need[c] >= TRUNK_KEY else prompt[c] or c for c in carried}
    longest_in: dict[object, int] = {}
    for c in carried:
        for key in (("cluster", cluster[c]), ("prompt", prompt[c])):
            longest_in[key] = max(longest_in.get(key, 0), len(fed[c]))
    rank = {key: k for k, key in enumerate(sorted(set(cluster.values()), key=repr))}  # any fixed order of clusters
    order = sorted(carried, key=lambda c: (-longest_in["cluster", cluster[c]], rank[cluster[c]],
                                           -longest_in["prompt", prompt[c]], prompt[c], -len(fed[c])))
    prompts_of: dict[object, set[tuple[int, ...]]] = {}
    for c in carried:
        prompts_of.setdefault(cluster[c], set()).add(prompt[c])
    batches: list[list[int]] = []
    for c in order:  # a cluster of several questions (a shared few-shot prompt) starts and ends its own batches
        last = batches[-1][-1] if batches else None
        if last is None or len(batches[-1]) == batch_size or (
                cluster[c] != cluster[last] and max(len(prompts_of[cluster[c]]), len(prompts_of[cluster[last]])) > 1):
            batches.append([])
        batches[-1].append(c)
    return [cheapest(rows, fed, need, prompt, position_limit) if share else Batch([], rows) for rows in batches]


def fed_and_needed(sequences: list[list[int]], first: list[int], carried: dict[int, list[int]]
                   ) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Each carrier's fed tokens (all but its last), and the first of its positions whose logits a sequence it
    serves needs."""
    return ({c: sequences[c][:-1] for c in carried},
            {c: min(first[i] for i in served) - 1 for c, served in carried.items()})


def cheapest(rows: list[int], fed: dict[int, list[int]], need: dict[int, int],
             prompt: dict[int, tuple[int, ...]], position_limit: int | None) -> Batch:
    """The way to feed a batch's rows that feeds fewest tokens: by question (rows with an empty prompt whole: a
    prefix row of padding alone would attend to nothing; not where the questions' prompts and tails, padded,
    would be wider than the model's positions), or after their common first tokens; or whole rows where neither
    saves an eighth of them."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for c in rows:
        by_prompt.setdefault(prompt[c], []).append(c)
    questions = [SharedPrefix(len(p), g) for p, g in by_prompt.items() if p]
    # the widest prefix and the widest tail side by side must fit the position table: some models' attention
    # (GPT-2's causal-mask buffer in transformers 4) is only as wide as it
    if questions and position_limit is not None and position_limit < max(g.length for g in questions) + max(
            len(fed[c]) - g.length for g in questions for c in g.rows):
        questions = []
    trunk = common_length([fed[c] for c in rows], min(need[c] for c in rows))
    options = [Batch([], rows),
               Batch(questions, by_prompt.get((), [])) if questions else Batch([], rows),
               Batch([SharedPrefix(trunk, rows)] if trunk else [], [] if trunk else rows)]
    best = min(options[1:], key=lambda b: tokens_of(b, fed))  # on a tie by question
    # a saving of less than an eighth does not pay for the second forward and the cache's copies
    return best if tokens_of(best, fed) <= 7 / 8 * tokens_of(options[0], fed) else options[0]


def tokens_of(batch: Batch, fed: dict[int, list[int]]) -> int:
    return (sum(g.length + sum(len(fed[c]) - g.length for c in g.rows) for g in batch.groups)
            + sum(len(fed[c]) for c in batch.whole))


def common_length(rows: list[list[int]], limit: int) -> int:
    """The length of the rows' longest common beginning, at most limit."""
    first, n = rows[0], limit
    for row in rows[1:]:
        n = next((j for j in range(min(n, len(row))) if row[j] != first[j]), min(n, len(row)))
    return n


def tokens_fed(sequences: list[list[int]], first: list[int], batch_size: int) -> int:
    """Tokens scored_tokens feeds a model that takes a key-value cache: each shared prefix once per batch, the
    rest of each row."""
    carried = served_by(carriers(sequences))
    fed, _ = fed_and_needed(sequences, first, carried)
    return sum(tokens_of(batch, fed) for batch in plan_batches(sequences, first, batch_size, carried, share=True))


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
    rows are fed (see carriers), batch_size rows at a time, right-padded with an attention mask; where the model
    takes a key-value cache and position ids, the tokens a batch's rows share (a question's prompt, a few-shot
    prompt) are fed once (see plan_batches). Logits are formed only from the first position any row of a batch
    needs (transformers' logits_to_keep, where the model takes it). With greedy, each sequence's flag says whether
    every one of those tokens is the most likely one at its position (the first of equal maxima, as argmax;
    lm-eval's is_greedy); else it is None. A batch that runs out of memory is fed again in halves, with a warning
    (a single row that does not fit raises)."""
    first = first or [1] * len(sequences)
    carried = served_by(carriers(sequences))
    forward = Forward(model, greedy)
    needs = {c: [(sequences[i], first[i]) for i in served] for c, served in carried.items()}
    out: list[tuple[torch.Tensor, bool | None]] = [(torch.empty(0), None)] * len(sequences)
    share = forward.cache_name is not None
    limit = getattr(text_config(getattr(model, "config", None)), "max_position_embeddings", None)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            pending = plan_batches(sequences, first, batch_size, carried, share, limit)
            while pending:
                batch = pending.pop(0)
                try:
                    rows, scores = forward.batch(batch, sequences, needs)
                except torch.OutOfMemoryError:
                    rows = batch.rows()
                    if len(rows) == 1:
                        raise
                    scores = None  # out of the handler first: its traceback holds the failed forward's tensors
                if scores is None:
                    release_cached_memory(forward.device)
                    log.warning("evaluation: out of memory feeding %d rows at once; these rows again, %d at a time "
                                "(a smaller batch_size avoids the retry)", len(rows), (len(rows) + 1) // 2)
                    pending[:0] = plan_batches(sequences, first, (len(rows) + 1) // 2, {c: carried[c] for c in rows},
                                               share, limit)
                    continue
                for c, row in zip(rows, scores):
                    for i, score in zip(carried[c], row):
                        out[i] = score
    finally:
        model.train(was_training)
    return out


def release_cached_memory(device: torch.device) -> None:
    """Give memory freed by a failed forward back before the retry (PyTorch's GPU cache; the host's is the system's)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Forward:
    """A causal LM's forward passes as token_logprobs feeds it, with the keyword arguments this model takes."""

    def __init__(self, model: torch.nn.Module, greedy: bool):
        self.model, self.device, self.greedy = model, model_device(model), greedy
        self.keeps_logits, self.cache_name = keeps_logits(model), cache_argument(model)

    def batch(self, batch: Batch, sequences: list[list[int]], needs: dict[int, list[tuple[list[int], int]]]
              ) -> tuple[list[int], list[list[tuple[torch.Tensor, bool | None]]]]:
        """The batch's rows (carriers) in the order of their scores, and the scores (see whole_rows)."""
        shared, whole = [c for g in batch.groups for c in g.rows], batch.whole
        scores = self.shared_prefixes(batch.groups, sequences, [needs[c] for c in shared]) if shared else []
        if scores is None:  # the model returned no usable cache: these rows whole too
            shared, whole, scores = [], shared + whole, []
        if whole:
            scores += self.whole_rows([sequences[c] for c in whole], [needs[c] for c in whole])
        return shared + whole, scores

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
        """whole_rows' result for the groups' rows (in group order), feeding each group's prefix once: the
        prefixes left-padded (so each ends where its rows' tails begin, as generate() pads prompts), their cache
        copied to each row, the tails right-padded after it, with position ids counted from each row's first real
        token. None when the model returns no cache this can copy."""
        prefixes, prefix_mask = left_padded([sequences[g.rows[0]][:g.length] for g in groups])
        out = self.model(input_ids=prefixes.to(self.device), attention_mask=prefix_mask.to(self.device),
                         position_ids=positions(prefix_mask).to(self.device), use_cache=True, **self.keep(1))
        group_of_row = torch.tensor([k for k, g in enumerate(groups) for _ in g.rows])
        cache = copied_to_rows(out["cache"] if "cache" in out else out.get("past_key_values"),
                               group_of_row.to(self.device), len(groups))
        if cache is None:
            return None
        lengths = [g.length for g in groups for _ in g.rows]
        tails, tail_mask = right_padded([sequences[c][g.length:-1] for g in groups for c in g.rows])
        mask = torch.cat([prefix_mask[group_of_row], tail_mask], dim=1)
        # padding at position 0 (masked): numbered on, a long prompt's row padded to a long tail's width would reach
        # past every real position (learned positions index out of range; dynamic RoPE rescales on the largest id)
        tail_positions = (torch.tensor(lengths).unsqueeze(1) + torch.arange(tails.shape[1])).masked_fill(tail_mask == 0, 0)
        lowest = min(f - 1 - m for carried, m in zip(needs, lengths) for _, f in carried)  # first tail position needed
        logits = self.model(input_ids=tails.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=tail_positions.to(self.device), use_cache=True,
                            **{self.cache_name: cache}, **self.keep(tails.shape[1] - lowest)).logits
        offset = tails.shape[1] - logits.shape[1]  # position p of a row with prefix m is logits[:, p - m - offset]
        return [pick(logits[row], carried, m + offset, self.greedy)
                for row, (carried, m) in enumerate(zip(needs, lengths))]

    def keep(self, count: int) -> dict:
        return {"logits_to_keep": count} if self.keeps_logits else {}


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the forward forms only the last positions' logits when asked (transformers' logits_to_keep)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def cache_argument(model: torch.nn.Module) -> str | None:
    """The name of the forward's key-value cache argument where a decoder-only model takes a cache and position ids
    (so that rows can share prefixes), else None."""
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    # transformers 5 names the cache argument `cache`, earlier versions `past_key_values`
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def copied_to_rows(cache, index: torch.Tensor, prefixes: int):
    """The prefixes' cache with row k holding prefix index[k]'s: a transformers Cache (batch_select_indices), or
    the tuple of per-layer (key, value) tensors, batch first, that transformers 4 models return by default; None
    for anything else (such as a layout that folds the batch into another dimension)."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(index)
        return cache
    if isinstance(cache, (tuple, list)) and cache and all(
            isinstance(layer, (tuple, list)) and layer and all(isinstance(t, torch.Tensor) and t.dim() > 1
                                                               and t.shape[0] == prefixes for t in layer)
            for layer in cache):
        return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)
    return None


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
