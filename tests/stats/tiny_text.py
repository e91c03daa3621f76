"""A tiny word-level tokenizer and sentences for the statistics tests (the demo models have no tokenizer
files)."""
from __future__ import annotations

WORDS = ("the a cat dog bird sat ran flew on under over mat rug tree far away big small red blue green and "
         "then slowly quickly").split()
SPECIAL = ("<pad>", "<eos>", "<unk>")
SENTENCES = [
    "the cat sat on the mat",
    "a big red dog ran far away",
    "the small bird flew over the green tree and then sat",
    "dog",
    "a blue cat slowly sat under the rug",
    "then the bird quickly flew away and the dog ran",
]


def tiny_tokenizer(pad: bool = True):
    """A word-level PreTrainedTokenizerFast over WORDS (ids < 256, the tiny models' vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {token: i for i, token in enumerate([*SPECIAL, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"eos_token": "<eos>", "unk_token": "<unk>", **({"pad_token": "<pad>"} if pad else {})}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def write_expert_grams(experts: list[str], root) -> list[str]:
    """Gram folders of each expert over half of SENTENCES (alternate halves), under root; their paths."""
    from merge_engine.stats.gram import GramOptions, collect_grams
    grams = []
    for i, path in enumerate(experts):
        data = root / f"data{i}.txt"
        data.write_text("\n".join(SENTENCES[i::2]) + "\n")
        grams.append(str(root / f"grams{i}"))
        collect_grams(path, str(data), grams[-1], GramOptions(batch_size=3, max_length=16, quiet=True, device="cpu",
                                                               tokenizer=tiny_tokenizer()))
    return grams
