"""LmEvalTasks: a local lm-eval-harness task scores the live model as MultipleChoice does; bad task lists are
refused at construction; without lm_eval, a one-line error names the extra."""
from __future__ import annotations

import json
import logging
import math
import random
import sys

import pytest
import torch
import yaml

from merge_engine.errors import ConfigError
from merge_engine.evaluation import LmEvalTasks, MultipleChoice
from merge_engine.extras import MissingExtraError
from tests.evaluation.conftest import QUESTIONS, real_tokens_fed, word_tokenizer, write_questions
from tests.stats.tiny_text import SENTENCES, WORDS

ANSWERS = [0, 1, 1, 2, 0, 1, 3, 0]


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    """A task folder, read offline, holding a multiple-choice task over QUESTIONS, "tiny_mc", the same with its acc
    declared lower is better, "tiny_mc_lower", and a perplexity task over SENTENCES, "tiny_ppl"."""
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
    (folder / "tiny_mc_lower.yaml").write_text(yaml.safe_dump({
        "include": "tiny_mc.yaml", "task": "tiny_mc_lower", "metric_list": [{"metric": "acc", "higher_is_better": False}]}))
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": sentence}) + "\n" for sentence in SENTENCES))
    (folder / "tiny_ppl.yaml").write_text(yaml.safe_dump({
        "task": "tiny_ppl", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(texts)}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}]}))
    return str(folder)


@pytest.mark.parametrize("metric, normalize", [("acc", "none"), ("acc_norm", "chars")])
def test_a_local_task_scores_as_multiple_choice_does(causal_lm, tokenizer, task_dir, tmp_path, metric, normalize):
    evaluator = LmEvalTasks(["tiny_mc"], tokenizer, include_path=task_dir, metric=metric, batch_size=3)
    reference = MultipleChoice(str(tmp_path / "questions.jsonl"), tokenizer, normalize=normalize, batch_size=3)
    accuracy = reference(causal_lm)
    assert 0 < accuracy < 1  # the answers are neither all right nor all wrong: the equality below tells
    random.seed(5)
    expected = random.random()
    random.seed(5)
    with real_tokens_fed(causal_lm) as fed:
        assert evaluator(causal_lm) == pytest.approx(accuracy, abs=1e-12)
    assert random.random() == expected  # lm_eval's draws leave the caller's generator as it was
    # lm_eval's requests are the scorer's sequences, fed as the scorer feeds them (shared rows and prompts once)
    distinct = {tuple(s[:-1]) for q in reference.questions for s in q.sequences}
    assert evaluator.tokens() == sum(fed) == reference.tokens() < sum(map(len, distinct))
    assert evaluator.memory_bytes(causal_lm) == reference.memory_bytes(causal_lm) > 0  # the same rows and batches
    assert (evaluator.name, evaluator.direction) == (f"{metric} on tiny_mc", "maximize")


def test_a_model_whose_log_likelihoods_are_nan_scores_nan(causal_lm, task_dir):
    """As MultipleChoice: lm_eval's argmax over NaN log-likelihoods predicts each question's first choice, so a
    merge that overflows scored the share of answers that are choices[0]; NaN makes the search count it failed."""
    import copy
    broken = copy.deepcopy(causal_lm)
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    assert math.isnan(LmEvalTasks(["tiny_mc"], word_tokenizer(), include_path=task_dir, batch_size=3)(broken))


def test_a_lower_is_better_metric_is_minimized_and_scores_as_lm_evals_own(causal_lm, task_dir):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    evaluator = LmEvalTasks(["tiny_ppl"], word_tokenizer(), include_path=task_dir, metric="word_perplexity")
    assert evaluator.direction == "minimize"  # a search maximizing perplexity would find the worst merge
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=causal_lm, tokenizer=word_tokenizer(), batch_size=8),
                                     tasks=["tiny_ppl"], task_manager=evaluator.manager, bootstrap_iters=0)
    assert evaluator(causal_lm) == pytest.approx(theirs["results"]["tiny_ppl"]["word_perplexity,none"], rel=1e-4)


@pytest.mark.parametrize("tasks, metric, problem", [
    (["tiny_mc"], "acc_nrom", "lm_eval task 'tiny_mc' computes no metric 'acc_nrom' (it computes acc, acc_norm)"),
    (["tiny_mc", "tiny_ppl"], "acc", "lm_eval task 'tiny_ppl' computes no metric 'acc' (it computes word_perplexity)"),
    (["tiny_mc", "tiny_mc_lower"], "acc", "metric 'acc' is better higher in some of the tasks and lower in others"),
])
def test_a_metric_without_one_direction_in_every_task_is_refused_at_construction(task_dir, tasks, metric, problem):
    with pytest.raises(ConfigError) as error:
        LmEvalTasks(tasks, word_tokenizer(), include_path=task_dir, metric=metric)
    assert error.value.problems[0].startswith(problem)


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


@pytest.mark.parametrize("setting, problem", [
    (dict(batch_size=0), "batch_size must be an integer of at least 1, got 0"),
    (dict(batch_size=2.5), "batch_size must be an integer of at least 1, got 2.5"),
    (dict(limit=-1), "limit must be a number of examples per task"),
    (dict(limit=1.5), "limit must be a number of examples per task"),
    (dict(metric=""), "metric must be a metric's name"),
])
def test_bad_settings_are_refused_before_tasks_load(setting, problem):
    pytest.importorskip("lm_eval")
    with pytest.raises(ConfigError) as error:
        LmEvalTasks(["tiny_mc"], word_tokenizer(), **setting)
    assert error.value.problems[0].startswith(problem)


def test_an_unknown_task_is_named(task_dir):
    with pytest.raises(ConfigError, match="unknown task 'no_such_task_xyz'"):  # indexes lm_eval's own tasks: 12 s
        LmEvalTasks(["tiny_mc", "no_such_task_xyz"], word_tokenizer(), include_path=task_dir)


def test_without_lm_eval_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MissingExtraError, match=r'^the lm-eval-harness objective needs lm_eval: '
                                                r'pip install "merge_engine\[eval\]"$'):
        LmEvalTasks(["tiny_mc"], word_tokenizer())



def greedy_continuation(model, context: list[int], length: int) -> list[int]:
    """The model's own most likely next tokens after context (each one is_greedy by construction)."""
    out = list(context)
    with torch.no_grad():
        for _ in range(length):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(context):]


def test_log_likelihoods_and_greedy_flags_equal_lm_evals_own(causal_lm):
    """The requests lm_eval sends (context and continuation token ids), scored by lm_eval's HFLM and by ours:
    contexts shared by several continuations, one-token continuations, greedy ones, and contexts longer than
    the model's 128 positions (cut from the left by both)."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from merge_engine.evaluation.lm_eval_tasks import shared_rows_lm
    rng = random.Random(0)
    requests = []
    for length in (1, 3, 7, 12, 20, 140, 150):
        context = [rng.randrange(4, 256) for _ in range(length)]
        continuations = [[rng.randrange(4, 256) for _ in range(rng.randint(1, 5))] for _ in range(3)]
        continuations += [[rng.randrange(4, 256)], greedy_continuation(causal_lm, context[-128:], 3)]
        requests += [(("", ""), context, c) for c in continuations]
    theirs = HFLM(pretrained=causal_lm, tokenizer=word_tokenizer(), batch_size=4)._loglikelihood_tokens(requests)
    ours = shared_rows_lm()(pretrained=causal_lm, tokenizer=word_tokenizer(), batch_size=4)._loglikelihood_tokens(
        requests)
    # fp32: batching, padding and the shared prompts change only the order of fp32 sums (~1e-6 a log-prob; sums of
    # up to 5)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert {g for _, g in ours} == {True, False}  # the flags are tested both ways
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], abs=1e-4)


def test_rolling_log_likelihoods_equal_lm_evals_own(causal_lm):
    """Perplexity tasks' rolling windows (texts longer than the model's 128 positions) go through the same scorer."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from merge_engine.evaluation.lm_eval_tasks import shared_rows_lm
    rng = random.Random(1)
    texts = [" ".join(rng.choices(WORDS, k=n)) for n in (5, 130, 300)]
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0) for t in texts]
    theirs = HFLM(pretrained=causal_lm, tokenizer=word_tokenizer(), batch_size=4).loglikelihood_rolling(requests)
    ours = shared_rows_lm()(pretrained=causal_lm, tokenizer=word_tokenizer(), batch_size=4).loglikelihood_rolling(
        requests)
    assert ours == pytest.approx(theirs, abs=1e-3)  # sums of up to 300 log-probs, ~1e-6 each


def byte_level_bpe(bos: bool):
    """A GPT-2-style byte-level BPE tokenizer (a word's leading space is part of its token) of 300 tokens, trained on
    SENTENCES and a few accented words; with bos, it adds <s> before every text, as Llama's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.stats.tiny_text import SENTENCES
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([*SENTENCES, "café naïve über"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", **({"bos_token": "<s>"} if bos else {}))


BPE_QUESTIONS = [  # where a byte-level BPE tokenizes the delimiter's space with the choice, and spaces move
    ("the cat sat on the", ["mat", "tree", " rug"]),  # a choice's own leading space: two spaces before it
    ("a big red dog ", ["ran far away", "sat"]),  # the prompt's trailing space moves to the choice
    ("the small bird\n", ["flew", "sat on the mat"]),
    ("", ["the cat", "a dog"]),
    ("café", ["naïve", "über", "the café"]),
]


@pytest.mark.parametrize("bos", [False, True], ids=["no_bos", "bos"])
@pytest.mark.parametrize("delimiter", [" ", "\n"])
def test_multiple_choice_scores_equal_lm_evals_hflm_with_a_byte_level_tokenizer(tmp_path, bos, delimiter):
    """lm-eval-harness' multiple-choice requests (prompt, delimiter + choice) through its own HFLM, and the JSONL
    scorer: the same log-likelihoods, so the same acc and acc_norm (characters of the choice)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    from merge_engine.demo import tiny_config
    tokenizer = byte_level_bpe(bos)
    config = tiny_config("llama", layers=2)
    config.vocab_size, config.initializer_range = 300, 0.3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = write_questions(tmp_path / "q.jsonl", BPE_QUESTIONS, [0] * len(BPE_QUESTIONS))
    ours = MultipleChoice(path, tokenizer, delimiter=delimiter, batch_size=4).scores(model)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(prompt, delimiter + choice), idx=i)
                for prompt, choices in BPE_QUESTIONS for i, choice in enumerate(choices)]
    theirs = iter(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).loglikelihood(requests))
    theirs = [[next(theirs)[0] for _ in choices] for _, choices in BPE_QUESTIONS]
    for got, want, (_, choices) in zip(ours, theirs, BPE_QUESTIONS):
        assert got == pytest.approx(want, abs=1e-4)  # fp32: batching moves each log-prob by ~1e-6
        per_char = [[score / len(choice) for score, choice in zip(row, choices)] for row in (got, want)]
        for mine, reference in ((got, want), per_char):  # acc, and acc_norm: the same prediction
            assert sorted(reference)[-1] - sorted(reference)[-2] > 1e-3, "no clear winner: the test would mean nothing"
            assert argmax(mine) == argmax(reference)


def argmax(row: list[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


def test_an_evaluation_prints_nothing_and_leaves_lm_evals_settings(causal_lm, tokenizer, task_dir, tmp_path,
                                                                   monkeypatch, capfd, caplog):
    """A search evaluates once per trial: lm_eval's dozen log lines, its prompt-building bar and its environment
    report (a `git describe` printing 'fatal: not a git repository' outside one, and torch's collect_env, seconds
    in subprocesses) came with every trial."""
    import lm_eval.api.task
    import lm_eval.evaluator
    monkeypatch.chdir(tmp_path)  # outside any git repository
    before = (lm_eval.evaluator.add_env_info, lm_eval.api.task.tqdm, logging.getLogger("lm_eval").level)
    evaluator = LmEvalTasks(["tiny_mc"], tokenizer, include_path=task_dir, batch_size=3)
    capfd.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            evaluator(causal_lm)
    assert capfd.readouterr() == ("", "") and caplog.records == []
    assert (lm_eval.evaluator.add_env_info, lm_eval.api.task.tqdm, logging.getLogger("lm_eval").level) == before
