"""Text examples for statistics runs (Fisher information, activation statistics).

A DATA file is either plain text, one example per non-blank line, or `.jsonl` (or `.json`, any case),
one JSON object per line with a string "text" field. Blank lines are skipped in both, a leading
byte-order mark is dropped, and errors name the file and line. Examples are tokenized with the model
folder's tokenizer (or a tokenizer object), truncated to max_length tokens, and grouped in file order
into right-padded batches: {"input_ids", "attention_mask"} (LongTensor, batch x length), padded with
the pad token, else the end-of-sequence token.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass

import torch

from merge_engine.errors import MergeEngineError
from merge_engine.extras import require
from merge_engine.io.untrusted import RepeatedKeyError, is_text, refuse_repeated_keys


class DataError(MergeEngineError):
    """A data file or tokenizer that cannot be used as asked; the message names the file."""


JSON_LINES_SUFFIXES = (".jsonl", ".json")  # datasets' to_json writes JSON Lines to .json


def read_texts(path: str, max_examples: int | None = None) -> list[str]:
    """The examples of a .txt or .jsonl file, in file order, at most max_examples of them."""
    return [text for _, text in read_examples(path, max_examples)]


def read_examples(path: str, max_examples: int | None = None) -> list[tuple[int, str]]:
    """(line number, text) of each example of a .txt or .jsonl file, in file order, at most max_examples of
    them; a byte-order mark (some editors write one) is not text."""
    if not os.path.exists(path):
        raise DataError(f"{path}: data file does not exist")
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read, a device never end
        raise DataError(f"{path}: data file is not a regular file")
    parse = _jsonl_text if os.path.splitext(path)[1].lower() in JSON_LINES_SUFFIXES else _plain_text
    examples: list[tuple[int, str]] = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if max_examples is not None and len(examples) >= max_examples:
                    break
                if line.strip():
                    examples.append((lineno, parse(line, path, lineno)))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text ({_first_bad_byte(path)})") from None
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty or holds only blank lines)")
    return examples


def _first_bad_byte(path: str) -> str:
    """Where a file's first non-UTF-8 byte is (the decoder reading a file in chunks counts within a chunk)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[:e.start].decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # lines as open() reads them
        return f"line {before.count(chr(10)) + 1}, byte {e.start}"
    return "the file changed while it was read"


def _plain_text(line: str, path: str, lineno: int) -> str:
    return line.rstrip("\r\n")


def _jsonl_text(line: str, path: str, lineno: int) -> str:
    try:
        record = json.loads(line, object_pairs_hook=refuse_repeated_keys)
    except RepeatedKeyError as e:  # which of the two texts was meant?
        raise DataError(f"{path}:{lineno}: {e}") from None
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than Python's stack
        raise DataError(f"{path}:{lineno}: not a JSON object ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
    if not is_text(record["text"]):
        raise DataError(f'{path}:{lineno}: "text" is not text: it holds a lone surrogate escape (\\ud800-\\udfff)')
    return record["text"]


def load_tokenizer(model_dir: str):
    """The tokenizer saved in a model folder (vocabulary.load_tokenizer: local files, no code of the folder's)."""
    from merge_engine.vocabulary import TOKENIZER_FILES
    from merge_engine.vocabulary import load_tokenizer as load_local
    transformers = require("transformers", "hf", "tokenizing a data file")
    if not any(os.path.lexists(os.path.join(model_dir, name)) for name in TOKENIZER_FILES):
        # transformers' own message then speaks of slow tokenizers, sentencepiece and tiktoken
        raise DataError(f"{model_dir}: the model folder holds no tokenizer (none of tokenizer.json, "
                        "tokenizer_config.json, vocab.json, ...); the text is tokenized with the model's own tokenizer: "
                        "save it into the folder (tokenizer.save_pretrained)")
    try:
        return load_local(transformers, model_dir)
    except (OSError, ValueError) as e:
        raise DataError(f"{model_dir}: cannot load a tokenizer from the model folder ({' '.join(str(e).split())})") from e


def pad_token_id(tokenizer) -> int:
    """The pad token, else end-of-sequence; 0 when neither exists (padding is masked out, so any id works)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


@dataclass
class TokenizedData:
    """Tokenized examples of one data file, in file order."""

    path: str
    sequences: list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def tokens(self) -> int:
        return sum(map(len, self.sequences))

    def batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        return [make_batch(self.sequences[i:i + batch_size], self.pad_id)
                for i in range(0, len(self.sequences), batch_size)]


def make_batch(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and the attention_mask marking the real tokens."""
    length = max(map(len, sequences))
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, :len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


CHARS_PER_TOKEN = 32  # far more than any tokenizer's characters per token


def tokenized_chars(max_length: int) -> int:
    """Characters of an example's kept end tokenized at first: enough for max_length tokens and a margin."""
    return (max_length + 8) * CHARS_PER_TOKEN


def load_data(path: str, tokenizer, max_length: int, max_examples: int | None = None,
              vocab_size: int | None = None) -> TokenizedData:
    """Read and tokenize a data file; tokenizer is a tokenizer object or a model folder holding one. Each
    example keeps the max_length tokens the tokenizer's truncation keeps (kept_tokens). vocab_size: the model's,
    which no token id may reach (the tokenizer of another model)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    lines, texts = zip(*read_examples(path, max_examples))
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer))
    short = tokenized_chars(max_length)  # examples tokenized whole, in one call (the tokenizer's own batching)
    shorts = [t for t in texts if len(t) <= short]  # (a tokenizer refuses an empty batch)
    whole = iter(tokenizer(shorts, truncation=True, max_length=max_length)["input_ids"] if shorts else [])
    encoded = [list(next(whole)) if len(t) <= short else kept_tokens(tokenizer, t, max_length) for t in texts]
    empty = [line for line, ids in zip(lines, encoded) if not ids]
    if empty:
        raise DataError(f"{path}:{empty[0]}: the example tokenizes to no tokens")
    if vocab_size is not None:
        beyond = next(((line, max(ids)) for line, ids in zip(lines, encoded) if max(ids) >= vocab_size), None)
        if beyond:
            raise DataError(f"{path}:{beyond[0]}: the example holds token id {beyond[1]}, beyond the model's "
                            f"vocabulary of {vocab_size} (is the tokenizer the model's?)")
    return TokenizedData(path, encoded, pad_token_id(tokenizer))


def kept_tokens(tokenizer, text: str, max_length: int) -> list[int]:
    """The max_length tokens of text that the tokenizer's truncation keeps (its first ones; its last where the
    tokenizer truncates on the left), tokenizing only as much of that end as they need: a line of megabytes
    would otherwise be tokenized whole (about 140 bytes of memory per character) to keep 512 tokens. A part
    holding a few more tokens than are kept gives the whole text's truncation (a tokenizer's tokens depend only
    on nearby text; special tokens are added as for the whole), else twice as much is tried."""
    left = getattr(tokenizer, "truncation_side", "right") == "left"

    def end(chars: int) -> str:
        return text[-chars:] if left else text[:chars]
    chars = tokenized_chars(max_length)
    while chars < len(text) and len(tokenizer(end(chars), add_special_tokens=False)["input_ids"]) <= max_length + 8:
        chars *= 2
    return list(tokenizer(end(chars), truncation=True, max_length=max_length)["input_ids"])
