"""Tiny model folders holding the tiny tokenizer, and a small text data file."""
from __future__ import annotations

import pytest

from merge_engine.demo import make_models
from tests.stats.tiny_text import SENTENCES, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """tiny_lm(arch) -> a 2-layer model folder (fp32) holding the tiny tokenizer. (transformers loads a
    Qwen2 folder's tokenizer as a Qwen2Tokenizer, which ignores this vocabulary: pass tiny_tokenizer() there.)"""
    root = tmp_path_factory.mktemp("stats_models")
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            path = make_models(str(root), arch, n_experts=0, layers=2, seed=7)[0]
            tiny_tokenizer().save_pretrained(path)
            cache[arch] = path
        return cache[arch]
    return get


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("\n".join(SENTENCES[:3]) + "\n\n" + "\n".join(SENTENCES[3:]) + "\n")
    return str(path)


@pytest.fixture
def gpt2_without_prefix(tiny_lm, tmp_path):
    """The tiny GPT-2 folder saved as the published GPT-2 is: weights named without the model's
    base_model_prefix (`h.0.attn...`, not `transformer.h.0.attn...`); transformers loads either."""
    import shutil

    from safetensors.torch import load_file, save_file
    folder = tmp_path / "gpt2-unprefixed"
    shutil.copytree(tiny_lm("gpt2"), folder)
    weights = load_file(folder / "model.safetensors")
    save_file({name.removeprefix("transformer."): t for name, t in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return str(folder)
