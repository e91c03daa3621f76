"""A base and two experts (2-layer Llama, fp32) with a word-level tokenizer, a validation and a test file of
multiple-choice questions, and a SEARCH.yml writer."""
from __future__ import annotations

import pytest
import torch
import yaml

from merge_engine.demo import make_models
from tests.evaluation.conftest import QUESTIONS, word_tokenizer, write_questions


@pytest.fixture(scope="session")
def search_models(tmp_path_factory):
    """(model folders [base, expert1, expert2], validation file, test file)."""
    root = tmp_path_factory.mktemp("search")
    paths = make_models(str(root), "llama", 2, torch.float32, layers=2, seed=3, noise=0.2)
    word_tokenizer(bos=True).save_pretrained(paths[0])
    val = write_questions(root / "val.jsonl", QUESTIONS, [0, 1, 1, 2, 0, 1, 3, 0])
    test = write_questions(root / "test.jsonl", QUESTIONS[:5], [1, 0, 0, 1, 2])
    return paths, val, test


def search_config(paths, val, **search) -> dict:
    """A TIES search: per-expert weight (log range) and density (a 2-knot gradient), and normalize (a choice)."""
    return {"merge_method": "ties", "base_model": paths[0], "dtype": "float32",
            "models": [{"model": p, "parameters": {"weight": {"search": [0.1, 2.0], "log": True},
                                                   "density": {"search": [0.2, 0.9], "knots": 2}}} for p in paths[1:]],
            "parameters": {"normalize": {"choice": [True, False]}},
            "search": {"objective": {"kind": "multiple_choice", "data": val}, **search}}


@pytest.fixture
def write_search(tmp_path):
    def write(config: dict, name: str = "search.yml") -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config))
        return str(path)
    return write
