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
