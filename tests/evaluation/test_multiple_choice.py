"""MultipleChoice: batched log-likelihoods against a plain one-example-at-a-time reference, accuracy, and every
problem of a question file reported at construction with its path:line."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from merge_engine.errors import ConfigError
from merge_engine.evaluation import MultipleChoice
from merge_engine.evaluation.multiple_choice import encode_pair
from tests.evaluation.conftest import QUESTIONS, real_tokens_fed, word_tokenizer, write_questions


def reference_loglikelihoods(model, tokenizer, questions, delimiter=" ") -> list[list[tuple[float, int]]]:
    """Per question, per choice: (sum of the continuation's log-probs, its token count), from one unpadded
    forward per (question, choice) and a float64 log-softmax. An empty prompt is the BOS token, else EOS."""
    out = []
    for prompt, choices in questions:
        row = []
        for choice in choices:
            if prompt:
                context = tokenizer(prompt)["input_ids"]
                continuation = tokenizer(prompt + delimiter + choice)["input_ids"][len(context):]
            else:
                context = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
                continuation = tokenizer(delimiter + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)
            row.append((sum(float(logprobs[len(context) + j - 1, t]) for j, t in enumerate(continuation)),
                        len(continuation)))
        out.append(row)
    return out


@pytest.fixture(scope="module")
def reference(causal_lm, tokenizer):
    return reference_loglikelihoods(causal_lm, tokenizer, QUESTIONS)


def normalized(reference, questions, normalize):
    divisor = {"none": lambda n, choice: 1, "tokens": lambda n, choice: n, "chars": lambda n, choice: len(choice)}
    return [[total / divisor[normalize](n, choice) for (total, n), choice in zip(row, choices)]
            for row, (_, choices) in zip(reference, questions)]


def argmax(row):
    return max(range(len(row)), key=row.__getitem__)


@pytest.mark.parametrize("batch_size", [1, 3, 100])  # 100: more than the 23 sequences, one batch
@pytest.mark.parametrize("normalize", ["none", "tokens", "chars"])
def test_batched_scores_equal_one_at_a_time(causal_lm, tokenizer, reference, tmp_path, normalize, batch_size):
    path = write_questions(tmp_path / "q.jsonl", QUESTIONS, [0] * len(QUESTIONS))
    scores = MultipleChoice(path, tokenizer, normalize=normalize, batch_size=batch_size).scores(causal_lm)
    expected = normalized(reference, QUESTIONS, normalize)
    # fp32 model: padding and batching change only the order of fp32 sums inside the forward (ulp 6e-8 on
    # activations of order 1), so each log-prob moves by ~1e-6 and a sum of up to 5 of them by far less than 1e-4
    for got, want in zip(scores, expected):
        assert got == pytest.approx(want, abs=1e-4)
        margin = sorted(want)[-1] - sorted(want)[-2]
        assert margin > 1e-3, "the model's best choice must win clearly, or the prediction test means nothing"
        assert argmax(got) == argmax(want)


def test_accuracy_is_the_fraction_of_questions_whose_best_choice_is_the_answer(causal_lm, tokenizer, reference,
                                                                               tmp_path):
    best = [argmax(row) for row in normalized(reference, QUESTIONS, "chars")]
    wrong = {1, 4, 6}
    answers = [(b + 1) % len(choices) if i in wrong else b for i, (b, (_, choices)) in enumerate(zip(best, QUESTIONS))]
    path = write_questions(tmp_path / "q.jsonl", QUESTIONS, answers)
    evaluator = MultipleChoice(path, tokenizer, normalize="chars", batch_size=4)
    assert evaluator(causal_lm) == (len(QUESTIONS) - len(wrong)) / len(QUESTIONS)
    assert (evaluator.name, evaluator.direction) == ("accuracy on q.jsonl", "maximize")


def test_a_model_whose_log_likelihoods_are_nan_scores_nan(causal_lm, tokenizer, tmp_path):
    """A merge that overflows gives NaN logits: every choice compares false, so argmax's first choice was predicted
    and the accuracy was the share of answers that are choices[0] (all of them here, a perfect score); NaN makes the
    search count the trial failed."""
    import copy
    broken = copy.deepcopy(causal_lm)
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    path = write_questions(tmp_path / "q.jsonl", QUESTIONS, [0] * len(QUESTIONS))
    assert math.isnan(MultipleChoice(path, tokenizer, batch_size=4)(broken))


def fed_rows(tokenizer, questions) -> list[tuple[str, ...]]:
    """The rows a call must feed, by brute force over words: each choice's prompt + choice less its last word
    (only predicted), except where another choice's extends it (that row's logits hold it); duplicates once."""
    bos = ("<bos>",) if tokenizer.bos_token_id is not None else ()
    fed = {bos + tuple(p.split() if p else ["<bos>" if bos else "<eos>"])[len(bos) if not p else 0:]
           + tuple(c.split()[:-1]) for p, choices in questions for c in choices}
    return [f for f in fed if not any(len(g) > len(f) and g[:len(f)] == f for g in fed)]


def test_tokens_counts_what_one_call_feeds_the_model(causal_lm, tokenizer, tmp_path):
    path = write_questions(tmp_path / "q.jsonl", QUESTIONS, [0] * len(QUESTIONS))
    evaluator = MultipleChoice(path, tokenizer)
    with real_tokens_fed(causal_lm) as fed:
        evaluator.scores(causal_lm)
    rows = fed_rows(tokenizer, QUESTIONS)
    assert evaluator.tokens() == sum(fed)
    # "the cat sat on the" with three one-word choices is one row; four questions' choices share rows, and the
    # questions whose choices still take two or more rows feed their prompt once
    assert len(rows) < sum(len(c) for _, c in QUESTIONS) and sum(fed) < sum(map(len, rows))


def test_choices_of_one_token_share_one_forward_row(causal_lm, tokenizer, tmp_path):
    questions = [("the cat sat on the", ["mat", "tree", "rug"]), ("then the dog", ["ran", "sat", "flew"])]
    path = write_questions(tmp_path / "q.jsonl", questions, [0, 0])
    fed = []
    hook = causal_lm.register_forward_pre_hook(lambda m, args, kwargs: fed.append(kwargs["input_ids"].shape[0]),
                                               with_kwargs=True)
    try:
        scores = MultipleChoice(path, tokenizer, batch_size=8).scores(causal_lm)
    finally:
        hook.remove()
    assert fed == [2]  # one row per question
    expected = reference_loglikelihoods(causal_lm, tokenizer, questions)
    for got, want in zip(scores, expected):
        assert got == pytest.approx([total for total, _ in want], abs=1e-4)


def test_the_model_keeps_its_mode_and_runs_where_it_is(causal_lm, tokenizer, tmp_path):
    path = write_questions(tmp_path / "q.jsonl", QUESTIONS[:2], [0, 0])
    causal_lm.train()
    try:
        MultipleChoice(path, tokenizer)(causal_lm)
        assert causal_lm.training
    finally:
        causal_lm.eval()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scores_on_a_cuda_model_equal_those_on_cpu(causal_lm, tokenizer, tmp_path):
    import copy
    path = write_questions(tmp_path / "q.jsonl", QUESTIONS, [0] * len(QUESTIONS))
    evaluator = MultipleChoice(path, tokenizer)
    on_cpu = evaluator.scores(causal_lm)
    on_gpu = evaluator.scores(copy.deepcopy(causal_lm).cuda())
    for got, want in zip(on_gpu, on_cpu):
        assert got == pytest.approx(want, abs=1e-3)  # TF32/cuBLAS sums: ~1e-4 per log-prob


def test_encode_pair_moves_trailing_spaces_and_stands_bos_for_an_empty_prompt(tokenizer):
    whole = tokenizer("the cat")["input_ids"]
    assert encode_pair(tokenizer, "the ", "cat") == (tokenizer("the")["input_ids"], whole[-1:])
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    assert encode_pair(tokenizer, "", " cat") == ([bos], tokenizer("cat", add_special_tokens=False)["input_ids"])


def test_a_prompt_that_starts_with_the_bos_text_gets_no_second_bos(tokenizer):
    # pre-templated data ("<s>...", "<|begin_of_text|>..."): lm-eval (HFLM.tok_encode) adds no special tokens then
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    text = tokenizer.decode(prefix)
    context, continuation = encode_pair(tokenizer, text + "the", " cat")
    assert context + continuation == tokenizer(text + "the cat", add_special_tokens=False)["input_ids"]
    assert context.count(prefix) == 1 and context[0] == prefix


def test_sequences_longer_than_max_length_are_refused_at_construction(tokenizer, tmp_path):
    path = write_questions(tmp_path / "q.jsonl", QUESTIONS[:2], [0, 0])
    with pytest.raises(ConfigError, match=r"q\.jsonl:2: a choice feeds the model \d+ tokens, more than max_length 6"):
        MultipleChoice(path, tokenizer, max_length=6)


def test_a_model_with_fewer_positions_is_refused_at_the_call(causal_lm, tokenizer, tmp_path):
    path = write_questions(tmp_path / "q.jsonl", [("the " * 130, ["cat", "dog"])], [0])
    with pytest.raises(ConfigError, match=r"q\.jsonl:1 feeds the model 13\d tokens, more than its "
                                          r"max_position_embeddings \(128\)"):
        MultipleChoice(path, tokenizer)(causal_lm)


def test_a_model_with_a_smaller_vocabulary_is_refused_at_the_call(causal_lm, tokenizer, tmp_path):
    import copy
    path = write_questions(tmp_path / "q.jsonl", QUESTIONS[:2], [0, 0])
    evaluator = MultipleChoice(path, tokenizer)
    largest = max(max(s) for q in evaluator.questions for s in q.sequences)
    small = copy.deepcopy(causal_lm.config)
    small.vocab_size = largest  # one id too few: the lookup would fail mid-evaluation
    with pytest.raises(ConfigError, match=rf"q\.jsonl holds token id {largest}, beyond the model's vocabulary of "
                                          rf"{largest} tokens"):
        evaluator.check_model(small)
    small.vocab_size = largest + 1
    evaluator.check_model(small)


@pytest.mark.parametrize("setting, problem", [(dict(batch_size=2.5), "batch_size must be an integer"),
                                              (dict(batch_size=0), "batch_size must be an integer of at least 1"),
                                              (dict(max_length=6.5), "max_length must be an integer or None"),
                                              (dict(delimiter=None), "delimiter must be a string")])
def test_bad_arguments_are_named(tokenizer, tmp_path, setting, problem):
    path = write_questions(tmp_path / "q.jsonl", QUESTIONS[:1], [0])
    with pytest.raises(ValueError, match=problem):
        MultipleChoice(path, tokenizer, **setting)


GOOD = {"question": "the cat", "choices": ["sat", "ran"], "answer": 1}
HOSTILE = {  # line 3 of the file (line 1 is a good question, line 2 blank), and how its problem begins
    "not json": ('{"question": "the cat",', "not valid JSON"),
    "not an object": ('["the cat", ["sat", "ran"], 0]', "not a JSON object, got a list"),
    "no question": (json.dumps({"choices": ["sat", "ran"], "answer": 0}), 'missing "question" (or "prompt")'),
    "prompt not a string": (json.dumps({**GOOD, "question": 3}), '"question" must be a string, got a int'),
    "no choices": (json.dumps({"prompt": "the", "answer": 0}), 'missing "choices"'),
    "choices not a list": (json.dumps({**GOOD, "choices": "sat"}), '"choices" must be a list, got a str'),
    "one choice": (json.dumps({**GOOD, "choices": ["sat"], "answer": 0}), '"choices" needs at least 2 choices, got 1'),
    "choice not a string": (json.dumps({**GOOD, "choices": ["sat", 7]}), "choices[1] must be a string, got a int"),
    "choice without tokens": (json.dumps({**GOOD, "choices": ["sat", " "]}), "choices[1] (' ') does not tokenize"),
    "no answer": (json.dumps({"question": "the", "choices": ["a", "b"]}), 'missing "answer"'),
    "answer a bool": (json.dumps({**GOOD, "answer": True}), '"answer" must be an integer index, got True'),
    "answer a string": (json.dumps({**GOOD, "answer": "1"}), "\"answer\" must be an integer index, got '1'"),
    "answer out of range": (json.dumps({**GOOD, "answer": 2}), '"answer" 2 is out of range for 2 choices'),
    "negative answer": (json.dumps({**GOOD, "answer": -1}), '"answer" -1 is out of range for 2 choices'),
    "answer of 5001 digits": ('{"question": "the cat", "choices": ["sat", "ran"], "answer": ' + "9" * 5001 + "}",
                              "not a usable JSON line (ValueError"),
    "nested past the stack": ("[" * 100_000 + "]" * 100_000, "not a usable JSON line (RecursionError"),
    "lone surrogate": ('{"question": "the cat \\ud800", "choices": ["sat", "ran"], "answer": 0}',
                       "the prompt is not text: it holds a lone surrogate escape"),
    "lone surrogate in a choice": ('{"question": "the cat", "choices": ["sat", "\\udfff"], "answer": 0}',
                                   "choices[1] is not text"),
    "a key twice": ('{"question": "the cat", "choices": ["sat", "ran"], "answer": 0, "answer": 1}',
                    "the key 'answer' appears twice"),
    "question and prompt": (json.dumps({**GOOD, "prompt": "the dog"}), 'both "question" and "prompt" are given'),
    "the answer twice": (json.dumps({**GOOD, "choices": ["ran", "sat", "sat"]}),
                         "choices[2] is the same text as the answer, choices[1]"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_bad_line_is_named_by_path_and_line(tokenizer, tmp_path, case):
    line, problem = HOSTILE[case]
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")  # the blank line 2 is skipped but counted
    with pytest.raises(ConfigError) as error:
        MultipleChoice(str(path), tokenizer)
    assert len(error.value.problems) == 1 and error.value.problems[0].startswith(f"{path}:3: {problem}")
    assert error.value.source == str(path)


@pytest.mark.parametrize("content, problem", [(None, r"cannot read \(No such file"), ("", "no examples"),
                                              ("\n  \n", "no examples"), (b"\xff\xfe", "not UTF-8 text")])
def test_a_missing_empty_or_binary_file(tokenizer, tmp_path, content, problem):
    path = tmp_path / "q.jsonl"
    if content is not None:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ConfigError, match=problem):
        MultipleChoice(str(path), tokenizer)


def test_a_fifo_named_as_the_file_is_refused_without_blocking(tokenizer, tmp_path):
    os.mkfifo(tmp_path / "q.jsonl")
    with pytest.raises(ConfigError, match="q.jsonl: is a FIFO, not a regular file"):
        MultipleChoice(str(tmp_path / "q.jsonl"), tokenizer)


def test_every_problem_is_listed_up_to_twenty_and_a_count(tokenizer, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(["[]"] * 25 + [json.dumps({**GOOD, "answer": 5, "choices": ["a"]})]))
    with pytest.raises(ConfigError) as error:
        MultipleChoice(str(path), tokenizer)
    assert error.value.problems[0] == f"{path}:1: not a JSON object, got a list"
    assert error.value.problems[19] == f"{path}:20: not a JSON object, got a list"
    assert error.value.problems[20] == "and 7 more"  # 5 lists more, and line 26's two problems


def test_an_empty_choice_is_refused_when_normalizing_by_characters(tokenizer, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({**GOOD, "choices": ["sat", ""]}) + "\n")
    with pytest.raises(ConfigError, match=r"q\.jsonl:1: choices\[1\] is empty, and normalize chars divides"):
        MultipleChoice(str(path), tokenizer, normalize="chars", delimiter=" the")


def test_a_byte_order_mark_is_not_part_of_the_first_question(tokenizer, tmp_path):
    plain, marked = tmp_path / "plain.jsonl", tmp_path / "marked.jsonl"
    plain.write_text(json.dumps(GOOD) + "\n")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())  # as some Windows editors save UTF-8
    assert MultipleChoice(str(marked), tokenizer).questions == MultipleChoice(str(plain), tokenizer).questions


def test_a_prompt_of_whitespace_alone_is_refused_for_what_it_is(tmp_path):
    # its whitespace moves to the choices (as lm-eval-harness moves it): nothing is left, though the tokenizer has
    # an EOS to stand for an empty prompt
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({**GOOD, "question": "  "}) + "\n")
    with pytest.raises(ConfigError) as error:
        MultipleChoice(str(path), word_tokenizer(bos=False))
    assert error.value.problems == [f"{path}:1: the prompt gives no tokens to condition on (its text gives none "
                                    "once its trailing whitespace moves to the choices)"]


def test_a_byte_that_is_not_utf8_is_named_by_line_and_byte_from_the_files_start(tokenizer, tmp_path):
    path = tmp_path / "q.jsonl"
    good = json.dumps(GOOD).encode()
    latin1 = b'{"question": "caf\xe9"}\n'  # on line 3, after a byte-order mark and two kinds of line end
    data = b"\xef\xbb\xbf" + good + b"\r\n" + good + b"\r" + latin1
    path.write_bytes(data)
    with pytest.raises(ConfigError) as error:
        MultipleChoice(str(path), tokenizer)
    bad = data.index(b"\xe9")
    assert error.value.problems == [f"{path}: not UTF-8 text (line 3, byte {bad})"]
