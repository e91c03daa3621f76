"""Tiny Llama folders whose tokenizers and vocabularies differ, for the vocabulary-alignment tests."""
from __future__ import annotations

import json
import os
import random

import torch
from safetensors.torch import load_file, save_file

from merge_engine.demo import make_models

SPECIAL = ["<pad>", "<eos>", "<unk>"]
WORDS = [f"w{i}" for i in range(300)]
BASE_TOKENS = SPECIAL + WORDS[:253]  # the 256 rows make_models gives
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def save_tokenizer(path: str, tokens: list[str], added: list[str] = ()) -> None:
    """A word-level fast tokenizer with these ids, plus `added` special tokens after them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    tok.add_tokens([AddedToken(a, special=True) for a in added])
    tok.save_pretrained(path)


def make_vocab_models(root: str, dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """base: BASE_TOKENS; extra: base + 2 added tokens; other: lacks w0-w4, has w260-w264, ids shuffled;
    padded: base's tokens with 264 rows (config vocab_size 264). Rows of shared tokens are the base's
    rows plus noise (so models differ), new tokens get random rows."""
    base, *experts = make_models(os.path.join(root, "src"), "llama", 3, dtype, seed=11)
    shuffled = SPECIAL + WORDS[5:253] + WORDS[260:265]
    random.Random(0).shuffle(shuffled)
    layout = {"base": (base, BASE_TOKENS, [], 256),
              "extra": (experts[0], BASE_TOKENS, ["<|im_start|>", "<|im_end|>"], 258),
              "other": (experts[1], shuffled, [], 256),
              "padded": (experts[2], BASE_TOKENS, [], 264)}
    gen = torch.Generator().manual_seed(5)
    out = {}
    for name, (src, tokens, added, rows) in layout.items():
        path = os.path.join(root, name)
        os.makedirs(path, exist_ok=True)
        tensors = load_file(os.path.join(src, "model.safetensors"))
        for key in VOCAB_TENSORS:
            old = tensors[key]
            new = (0.02 * torch.randn((rows, old.shape[1]), generator=gen)).to(dtype)
            for i, t in enumerate(tokens):
                if t in BASE_TOKENS:
                    new[i] = old[BASE_TOKENS.index(t)]
            tensors[key] = new
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(src, "config.json")) as f:
            config = json.load(f)
        config["vocab_size"] = rows
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_tokenizer(path, tokens, added)
        out[name] = path
    return out


CORPUS_A = ["the quick brown fox jumps over the lazy dog", "merging models one tensor at a time",
            "a tokenizer learns its merges from text", "the dog sleeps under the brown table"] * 20
CORPUS_B = ["vision and language models share a vocabulary", "fine tuning adds tokens for chat turns",
            "the fox reads the manual before merging", "tensors stream from disk to device"] * 20


def save_bpe_tokenizer(path: str, corpus: list[str], vocab: int, added: list[str] = ()) -> None:
    """A byte-level BPE tokenizer trained on corpus (vocab tokens), plus `added` special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    tok.add_tokens([AddedToken(a, special=True) for a in added])
    tok.save_pretrained(path)


def make_bpe_models(root: str) -> dict[str, str]:
    """base: BPE of 300 tokens over CORPUS_A plus 2 added tokens past its 300 rows (trimmed when it is the
    base tokenizer); other: BPE of 310 tokens over CORPUS_B. Vocabulary rows are random."""
    base, other = make_models(os.path.join(root, "src"), "llama", 1, torch.float32, seed=13)
    gen = torch.Generator().manual_seed(6)
    out = {}
    for name, src, corpus, rows, added in (("bpe_base", base, CORPUS_A, 300, ["<|a|>", "<|b|>"]),
                                           ("bpe_other", other, CORPUS_B, 310, [])):
        path = os.path.join(root, name)
        os.makedirs(path, exist_ok=True)
        tensors = load_file(os.path.join(src, "model.safetensors"))
        for key in VOCAB_TENSORS:
            tensors[key] = 0.02 * torch.randn((rows, tensors[key].shape[1]), generator=gen)
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(src, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**config, "vocab_size": rows}, f, indent=2)
        save_bpe_tokenizer(path, corpus, rows, added)
        out[name] = path
    return out
