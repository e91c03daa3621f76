"""Multiple-choice accuracy by log-likelihood (the LLM merging competition's metric; lm-eval-harness's acc
and acc_norm): a question's predicted answer is the choice the model finds most likely after the prompt."""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import torch

from merge_engine.evaluation.data_files import raise_problems, read_text
from merge_engine.evaluation.loglikelihood import check_fits, check_vocabulary, token_logprobs, tokens_fed
from merge_engine.evaluation.memory import scoring_bytes
from merge_engine.io.untrusted import RepeatedKeyError, is_int, is_text, refuse_repeated_keys

log = logging.getLogger(__name__)
NORMALIZE = ("none", "tokens", "chars")  # a choice's log-likelihood: the sum, per token, per character


@dataclass(frozen=True)
class Question:
    line: int
    sequences: list[list[int]]  # per choice: context then continuation token ids
    continuation_tokens: list[int]
    choice_chars: list[int]
    answer: int


class MultipleChoice:
    """Accuracy on a JSONL file of {"question" (or "prompt"): str, "choices": [str, ...], "answer": index}.
    The file is read, checked and tokenized at construction: every problem is raised there, naming path:line."""

    direction = "maximize"

    def __init__(self, path: str, tokenizer, normalize: str = "none", batch_size: int = 16, delimiter: str = " ",
                 max_length: int | None = None):
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
        if max_length is not None and not is_int(max_length):
            raise ValueError(f"max_length must be an integer or None, got {max_length!r}")
        if not isinstance(delimiter, str):
            raise ValueError(f"delimiter must be a string, got {delimiter!r}")
        self.path, self.normalize, self.batch_size = path, normalize, batch_size
        self.name = f"accuracy on {os.path.basename(path)}"
        self.questions = read_questions(path, tokenizer, delimiter, normalize)
        if max_length is not None:
            raise_problems([f"{path}:{q.line}: a choice feeds the model {fed(q)} tokens, more than max_length "
                            f"{max_length}" for q in self.questions if fed(q) > max_length], path)
        self._sequences = [s for q in self.questions for s in q.sequences]
        self._first = [len(s) - n for q in self.questions for s, n in zip(q.sequences, q.continuation_tokens)]
        self._longest = max(self.questions, key=fed)

    def tokens(self) -> int:
        """Tokens one call feeds the model (loglikelihood.tokens_fed: shared rows and prompts counted once)."""
        return tokens_fed(self._sequences, self._first, self.batch_size)

    def memory_bytes(self, model: torch.nn.Module) -> int:
        """The most memory one call allocates beside the model's weights (evaluation.memory; the model may be on
        the meta device)."""
        return scoring_bytes(model, self._sequences, self._first, self.batch_size)

    def check_model(self, config) -> None:
        """Refuse a model (its transformers config) with fewer positions than the longest question needs, or a
        smaller vocabulary than the questions' token ids."""
        check_fits(config, fed(self._longest), f"{self.path}:{self._longest.line}", self.path)
        check_vocabulary(config, max(max(s) for s in self._sequences), self.path, self.path)

    def scores(self, model: torch.nn.Module) -> list[list[float]]:
        """Per question, per choice: the continuation's log-likelihood, normalized as asked."""
        self.check_model(getattr(model, "config", None))
        logprobs = iter(token_logprobs(model, self._sequences, self.batch_size, self._first))
        return [[self._normalized(next(logprobs), n, chars) for n, chars in zip(q.continuation_tokens, q.choice_chars)]
                for q in self.questions]

    def __call__(self, model: torch.nn.Module) -> float:
        """The accuracy; NaN where a log-likelihood is NaN (a merge that overflows), which no choice compares above:
        argmax would predict the first choice and count those questions by where their answers stand."""
        scores = self.scores(model)
        undefined = [q.line for q, row in zip(self.questions, scores) if any(map(math.isnan, row))]
        if undefined:
            log.warning("%s: the model's log-likelihoods are NaN on %d question(s) (line %d first): accuracy NaN",
                        self.path, len(undefined), undefined[0])
            return math.nan
        predicted = [max(range(len(s)), key=s.__getitem__) for s in scores]  # ties: the first, as argmax
        return sum(p == q.answer for p, q in zip(predicted, self.questions)) / len(self.questions)

    def _normalized(self, logprobs: torch.Tensor, tokens: int, chars: int) -> float:
        total = float(logprobs.double().sum())  # the continuation's tokens
        return total / {"none": 1, "tokens": tokens, "chars": chars}[self.normalize]


def fed(question: Question) -> int:
    """The most tokens one of the question's sequences feeds the model (the last token is only predicted)."""
    return max(len(s) for s in question.sequences) - 1


def read_questions(path: str, tokenizer, delimiter: str, normalize: str) -> list[Question]:
    text, problems = read_text(path)
    questions = []
    for number, line in enumerate((text or "").split("\n"), 1):
        if line.strip():
            question, line_problems = parse_question(line, number, tokenizer, delimiter, normalize)
            problems += [f"{path}:{number}: {p}" for p in line_problems]
            questions += [question] if question else []
    if text is not None and not problems and not questions:
        problems.append(f"{path}: no examples (the file has no non-blank line)")
    raise_problems(problems, path)
    return questions


def parse_question(line: str, number: int, tokenizer, delimiter: str, normalize: str
                   ) -> tuple[Question | None, list[str]]:
    try:
        record = json.loads(line, object_pairs_hook=refuse_repeated_keys)
    except json.JSONDecodeError as e:
        return None, [f"not valid JSON ({e.msg} at column {e.colno})"]
    except RepeatedKeyError as e:  # which of the two values was meant?
        return None, [str(e)]
    except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting deeper than Python's stack
        return None, [f"not a usable JSON line ({type(e).__name__}: {str(e)[:80]})"]
    if not isinstance(record, dict):
        return None, [f"not a JSON object, got a {type(record).__name__}"]
    problems = record_problems(record, normalize)
    if problems:
        return None, problems
    problems = [f"{where} is not text: it holds a lone surrogate escape (\\ud800-\\udfff)"
                for where, text in [("the prompt", record.get("question", record.get("prompt")))]
                + [(f"choices[{i}]", c) for i, c in enumerate(record["choices"])] if not is_text(text)]
    if problems:
        return None, problems
    context = record.get("question", record.get("prompt"))
    pairs = [encode_pair(tokenizer, context, delimiter + choice) for choice in record["choices"]]
    if not pairs[0][0]:
        return None, [f"the prompt gives no tokens to condition on ({no_context_reason(context)})"]
    problems = [f"choices[{i}] ({choice!r}) does not tokenize: {delimiter + choice!r} gives no tokens"
                for i, (choice, (_, continuation)) in enumerate(zip(record["choices"], pairs)) if not continuation]
    if problems:
        return None, problems
    return Question(number, [c + t for c, t in pairs], [len(t) for _, t in pairs],
                    [len(choice) for choice in record["choices"]], record["answer"]), []


def no_context_reason(context: str) -> str:
    """Why a prompt encodes to no context tokens (lm-eval-harness fails on such a request)."""
    if not context:
        return "an empty prompt is replaced by the BOS or EOS token, and this tokenizer has neither"
    return "its text gives none once its trailing whitespace moves to the choices"


def record_problems(record: dict, normalize: str) -> list[str]:
    """What is missing or mistyped in one line's object."""
    problems = []
    key = "question" if "question" in record else "prompt"
    if "question" in record and "prompt" in record:
        problems.append('both "question" and "prompt" are given: one line holds one prompt')
    elif key not in record:
        problems.append('missing "question" (or "prompt")')
    elif not isinstance(record[key], str):
        problems.append(f'"{key}" must be a string, got a {type(record[key]).__name__}')
    choices = record.get("choices")
    if not isinstance(choices, list):
        problems.append('missing "choices"' if choices is None else
                        f'"choices" must be a list, got a {type(choices).__name__}')
        choices = None
    elif len(choices) < 2:
        problems.append(f'"choices" needs at least 2 choices, got {len(choices)}')
    else:
        problems += [f"choices[{i}] must be a string, got a {type(c).__name__}"
                     for i, c in enumerate(choices) if not isinstance(c, str)]
        if normalize == "chars":
            problems += [f"choices[{i}] is empty, and normalize chars divides by its length"
                         for i, c in enumerate(choices) if c == ""]
    answer = record.get("answer")
    if "answer" not in record:
        problems.append('missing "answer"')
    elif not isinstance(answer, int) or isinstance(answer, bool):
        problems.append(f'"answer" must be an integer index, got {answer!r}')
    elif choices is not None and not 0 <= answer < len(choices):
        problems.append(f'"answer" {answer} is out of range for {len(choices)} choices')
    elif choices is not None:  # the two score alike, and the first of a tie is predicted: right or wrong by order
        problems += [f"choices[{i}] is the same text as the answer, choices[{answer}]" for i, c in enumerate(choices)
                     if i != answer and c == choices[answer]]
    return problems


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-eval-harness (0.4.x, HFLM) splits a loglikelihood request:
    trailing spaces of the context move to the continuation, the two are encoded whole (the tokenizer's
    default special tokens, none when the context already starts with the BOS text, as pre-templated prompts do)
    and the context's own encoding is cut off the front, so tokens are those the model sees in the whole text. An
    empty context becomes the BOS token (EOS without one; [] without either)."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if not context:
        ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if prefix is None:
            return [], ids
        return (ids[:1], ids[1:]) if ids and ids[0] == prefix else ([prefix], ids)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    special = {"add_special_tokens": False} if prefix is not None and context.startswith(tokenizer.decode(prefix)) else {}
    whole = tokenizer(context + continuation, **special)["input_ids"]
    context_ids = tokenizer(context, **special)["input_ids"]
    return context_ids, whole[len(context_ids):]
