"""evaluator_from_spec: each kind is built with its options, paths taken relative to base_dir; every problem of
the mapping is reported at once, naming its key."""
from __future__ import annotations

import pytest

from merge_engine.errors import ConfigError
from merge_engine.evaluation import MultipleChoice, Perplexity, evaluator_from_spec
from tests.evaluation.conftest import QUESTIONS, word_tokenizer, write_questions

WHERE = "search.objective"


@pytest.fixture
def data_dir(tmp_path):
    write_questions(tmp_path / "val.jsonl", QUESTIONS, [0] * len(QUESTIONS))
    (tmp_path / "text.txt").write_text("the cat sat on the mat")
    return tmp_path


def test_each_kind_is_built_with_its_options_relative_to_base_dir(data_dir):
    tokenizer = word_tokenizer()
    accuracy = evaluator_from_spec({"kind": "multiple_choice", "data": "val.jsonl", "normalize": "tokens",
                                    "batch_size": 2, "delimiter": " ", "max_length": 64}, tokenizer, WHERE,
                                   base_dir=str(data_dir))
    assert isinstance(accuracy, MultipleChoice)
    assert (accuracy.path, accuracy.normalize, accuracy.batch_size) == (str(data_dir / "val.jsonl"), "tokens", 2)
    perplexity = evaluator_from_spec({"kind": "perplexity", "data": str(data_dir / "text.txt"), "max_length": 4},
                                     tokenizer, WHERE, base_dir="/elsewhere")  # an absolute path stays
    assert isinstance(perplexity, Perplexity) and [len(w) for w in perplexity.windows] == [4, 2]


@pytest.mark.parametrize("spec, problems", [
    ([1], [f"{WHERE} must be a mapping with a kind (multiple_choice, perplexity, lm_eval), got [1]"]),
    ({"data": "val.jsonl"}, [f"{WHERE}.kind must be one of multiple_choice, perplexity, lm_eval, it is missing"]),
    ({"kind": "accuracy"}, [f"{WHERE}.kind must be one of multiple_choice, perplexity, lm_eval, got 'accuracy'"]),
    ({"kind": ["perplexity"]}, [f"{WHERE}.kind must be one of multiple_choice, perplexity, lm_eval, got ['perplexity']"]),
    ({"kind": "perplexity", "data": "a\0b"}, [f"{WHERE}.data must be a file path, got 'a\\x00b'"]),
    ({"kind": "lm_eval", "tasks": ["arc"], "include_path": "\ud800"},
     [f"{WHERE}.include_path must be a folder path or null, got '\\ud800'"]),
    ({"kind": "multiple_choice"}, [f"{WHERE}.data is missing: a multiple_choice objective needs a file path"]),
    ({"kind": "multiple_choice", "data": "val.jsonl", "normalize": "x", "batch_size": 0, "delimiter": 1,
      "max_length": True, "shuffle": True},
     [f"{WHERE}.shuffle is not a key of a multiple_choice objective (known: kind, data, normalize, batch_size, "
      "delimiter, max_length)",
      f"{WHERE}.normalize must be one of none, tokens, chars, got 'x'",
      f"{WHERE}.batch_size must be a positive integer, got 0",
      f"{WHERE}.delimiter must be a string, got 1",
      f"{WHERE}.max_length must be a positive integer or null, got True"]),
    ({"kind": "perplexity", "data": 3, "max_length": 1, "batch_size": 2.0},
     [f"{WHERE}.data must be a file path, got 3", f"{WHERE}.max_length must be an integer of at least 2, got 1",
      f"{WHERE}.batch_size must be a positive integer, got 2.0"]),
    ({"kind": "lm_eval", "tasks": "arc", "include_path": 1, "metric": None, "limit": 1.5},
     [f"{WHERE}.tasks must be a non-empty list of task names, got 'arc'",
      f"{WHERE}.include_path must be a folder path or null, got 1",
      f"{WHERE}.metric must be a metric name (e.g. acc), got None",
      f"{WHERE}.limit must be null, a positive integer or a fraction between 0 and 1, got 1.5"]),
])
def test_problems_name_their_key(data_dir, spec, problems):
    with pytest.raises(ConfigError) as error:
        evaluator_from_spec(spec, word_tokenizer(), WHERE, base_dir=str(data_dir))
    assert error.value.problems == problems
    assert error.value.source == WHERE


def test_a_bad_data_file_is_named_by_its_path_under_base_dir(data_dir):
    (data_dir / "bad.jsonl").write_text('{"question": "the", "choices": ["a", "b"], "answer": 2}\n')
    with pytest.raises(ConfigError, match=f"{data_dir / 'bad.jsonl'}:1: \"answer\" 2 is out of range"):
        evaluator_from_spec({"kind": "multiple_choice", "data": "bad.jsonl"}, word_tokenizer(), WHERE,
                            base_dir=str(data_dir))
