"""LmEvalTasks: a local lm-eval-harness task scores the live model as MultipleChoice does; bad task lists are
refused at construction; without lm_eval, a one-line error names the extra."""
from __future__ import annotations

import sys

import pytest
import yaml

from merge_engine.errors import ConfigError
from merge_engine.evaluation import LmEvalTasks, MultipleChoice
from merge_engine.extras import MissingExtraError
from tests.evaluation.conftest import QUESTIONS, word_tokenizer, write_questions

ANSWERS = [0, 1, 1, 2, 0, 1, 3, 0]


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    """A task folder holding one multiple-choice task, "tiny_mc", over QUESTIONS, read offline."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    data = write_questions(tmp_path / "questions.jsonl", QUESTIONS, ANSWERS)
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny_mc.yaml").write_text(yaml.safe_dump({
        "task": "tiny_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": data}},
        "validation_split": "validation", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))
    return str(folder)


@pytest.mark.parametrize("metric, normalize", [("acc", "none"), ("acc_norm", "chars")])
def test_a_local_task_scores_as_multiple_choice_does(causal_lm, tokenizer, task_dir, tmp_path, metric, normalize):
    evaluator = LmEvalTasks(["tiny_mc"], tokenizer, include_path=task_dir, metric=metric, batch_size=3)
    reference = MultipleChoice(str(tmp_path / "questions.jsonl"), tokenizer, normalize=normalize)
    accuracy = reference(causal_lm)
    assert 0 < accuracy < 1  # the answers are neither all right nor all wrong: the equality below tells
    assert evaluator(causal_lm) == pytest.approx(accuracy, abs=1e-12)
    # lm_eval runs the requests that feed the same tokens as one row; merge_engine's scorer also lets a row carry
    # the choices whose tokens it extends, so it feeds no more
    distinct = {tuple(s[:-1]) for q in reference.questions for s in q.sequences}
    assert evaluator.tokens() == sum(map(len, distinct)) >= reference.tokens()
    assert (evaluator.name, evaluator.direction) == (f"{metric} on tiny_mc", "maximize")


@pytest.mark.parametrize("tasks, include_path, problem", [
    ([], None, "tasks must be a non-empty list of task names, got []"),
    ("tiny_mc", None, "tasks must be a non-empty list of task names, got 'tiny_mc'"),
    (["tiny_mc", 3], None, "tasks must be a non-empty list of task names"),
    (["tiny_mc"], "no/such/folder", "include_path 'no/such/folder' is not a folder"),
])
def test_a_bad_task_list_is_refused(tasks, include_path, problem):
    pytest.importorskip("lm_eval")
    with pytest.raises(ConfigError) as error:
        LmEvalTasks(tasks, word_tokenizer(), include_path=include_path)
    assert error.value.problems[0].startswith(problem)


def test_an_unknown_task_is_named(task_dir):
    with pytest.raises(ConfigError, match="unknown task 'no_such_task_xyz'"):  # indexes lm_eval's own tasks: 12 s
        LmEvalTasks(["tiny_mc", "no_such_task_xyz"], word_tokenizer(), include_path=task_dir)


def test_without_lm_eval_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MissingExtraError, match=r'^the lm-eval-harness objective needs lm_eval: '
                                                r'pip install "merge_engine\[eval\]"$'):
        LmEvalTasks(["tiny_mc"], word_tokenizer())

