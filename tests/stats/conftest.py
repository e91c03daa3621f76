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
