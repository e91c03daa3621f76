"""lm-eval-harness tasks (a user's local task YAMLs, or the harness's own) scoring the live model through
lm_eval's HFLM, which takes a model instance, its log-likelihood requests scored as the multiple-choice scorer
scores them (loglikelihood.scored_tokens: shared rows and prompts). lm_eval is the optional extra "eval"."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from merge_engine.errors import MergeEngineError
from merge_engine.evaluation.data_files import raise_problems
from merge_engine.evaluation.loglikelihood import scored_tokens, tokens_fed
from merge_engine.evaluation.memory import generation_bytes, scoring_bytes
from merge_engine.evaluation.multiple_choice import encode_pair
from merge_engine.extras import require
from merge_engine.io.untrusted import is_finite_number, is_int

log = logging.getLogger(__name__)
WHAT = "the lm-eval-harness objective"
DEFAULT_GENERATED_TOKENS = 256  # lm_eval's max_gen_toks when a generation task sets none


class LmEvalTasks:
    """The mean over the tasks of lm_eval's metric (e.g. "acc": results[task]["acc,none"]), maximized or minimized
    as the tasks' higher_is_better says. The tasks are resolved and their data loaded at construction, so an
    unknown task, a metric a task does not compute or a missing data file fails before the search reads any
    weights."""

    def __init__(self, tasks: Sequence[str], tokenizer, include_path: str | None = None, metric: str = "acc",
                 batch_size: int = 8, limit: int | float | None = None):
        require("lm_eval", "eval", WHAT)
        source = "lm_eval tasks"
        problems = []
        if not isinstance(tasks, (list, tuple)) or not tasks or not all(isinstance(t, str) for t in tasks):
            problems.append(f"tasks must be a non-empty list of task names, got {tasks!r}")
        if include_path is not None and not os.path.isdir(include_path):
            problems.append(f"include_path {include_path!r} is not a folder")
        if not is_int(batch_size) or batch_size < 1:
            problems.append(f"batch_size must be an integer of at least 1, got {batch_size!r}")
        if limit is not None and not (is_finite_number(limit) and limit > 0 and (is_int(limit) or limit < 1)):
            problems.append(f"limit must be a number of examples per task (an integer of at least 1) or a fraction "
                            f"of them (below 1), got {limit!r}")
        if not isinstance(metric, str) or not metric:
            problems.append(f"metric must be a metric's name (acc, acc_norm...), got {metric!r}")
        raise_problems(problems, source)
        self.manager = task_manager(tasks, include_path)
        raise_problems([f"unknown task {t!r} (not among lm_eval's tasks or those under include_path "
                        f"{include_path!r})" for t in tasks if t not in self.manager.all_tasks], source)
        self.task_names, self.tokenizer, self.metric = list(tasks), tokenizer, metric
        self.batch_size, self.limit = batch_size, limit
        self.name = f"{metric} on {', '.join(tasks)}"
        loaded = self.manager.load(self.task_names)["tasks"].values()
        self.direction = metric_direction(loaded, metric, source)
        with quiet_lm_eval():  # (the tasks' warnings, from load, are shown: once)
            self.requests = read_requests(loaded, tokenizer, limit)

    def tokens(self) -> int:
        """About how many tokens one evaluation feeds the model: every request's text, plus max_gen_toks for a
        generation (an upper bound: generation stops early at a stop sequence). Log-likelihood requests count as
        scored_tokens feeds them (loglikelihood.tokens_fed: shared rows and prompts once)."""
        r = self.requests
        return (sum(r.rolling) + sum(c + g for c, g in r.generations)
                + (tokens_fed(r.sequences, r.first, self.batch_size) if r.sequences else 0))

    def memory_bytes(self, model: torch.nn.Module) -> int:
        """The most memory one call allocates beside the model's weights (evaluation.memory; the model may be on
        the meta device): the log-likelihood requests as SharedRowsLM feeds them (cut from the left to the model's
        length), batch_size rolling windows fed whole, and batch_size generations (evaluation.memory's
        generation_bytes)."""
        r, rows, length = self.requests, self.batch_size, hflm_max_length(model.config, self.tokenizer)
        cut = [s[-(length + 1):] for s in r.sequences]
        first = [len(c) - (len(s) - f) for c, s, f in zip(cut, r.sequences, r.first)]
        window = min(max(r.rolling, default=0), length)
        prompt, total = max((c for c, _ in r.generations), default=0), max((c + g for c, g in r.generations), default=0)
        return max(scoring_bytes(model, cut, [max(f, 1) for f in first], rows),
                   scoring_bytes(model, [[i] + [0] * window for i in range(rows)], [1] * rows, rows) if window else 0,
                   generation_bytes(model, rows, min(prompt, length), min(total, length)) if total else 0)

    def check_model(self, config) -> None:
        """Nothing to refuse: lm_eval cuts inputs to the model's length itself."""

    def __call__(self, model: torch.nn.Module) -> float:
        import lm_eval
        # no seeding (it would reset the caller's random generators), no bootstrap of standard errors (slow),
        # no per-sample logs (memory)
        state = random.getstate()  # lm_eval draws from Python's generator (task ids): the caller's is kept
        try:
            with quiet_lm_eval():
                lm = shared_rows_lm()(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size)
                results = lm_eval.simple_evaluate(model=lm, tasks=self.task_names, task_manager=self.manager,
                                                  limit=self.limit, bootstrap_iters=0, log_samples=False,
                                                  random_seed=None, numpy_random_seed=None, torch_random_seed=None)
        finally:
            random.setstate(state)
        if lm.nan_requests:  # lm_eval's argmax would predict each question's first choice: no score to compare
            log.warning("lm_eval: the model's log-likelihoods are NaN on %d request(s): score NaN", lm.nan_requests)
            return math.nan
        return sum(self._score(results["results"], t) for t in self.task_names) / len(self.task_names)

    def _score(self, results: dict, task: str) -> float:
        key = f"{self.metric},none"  # lm_eval 0.4 keys a metric by "<metric>,<filter>"; plain tasks' filter is none
        if key not in results.get(task, {}):
            metrics = sorted(k for k in results.get(task, {}) if "," in k and "_stderr" not in k)
            raise MergeEngineError(f"lm_eval task {task!r} reports no {key!r} (it reports {', '.join(metrics)})")
        return float(results[task][key])


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """simple_evaluate as one trial of many: without its log lines (a dozen per call, its warnings about the
    task's metrics among them) and the progress bar it draws building the task's prompts, and without the
    environment report it adds to its results (a `git describe` that prints 'fatal: not a git repository' outside
    one, and torch's collect_env, seconds per call spent in subprocesses) that the score does not use.
    Errors are still logged; lm_eval's own settings come back after."""
    import lm_eval.api.task
    import lm_eval.evaluator
    from tqdm import tqdm
    logger = logging.getLogger("lm_eval")
    level = logger.level
    saved = {(lm_eval.evaluator, name): getattr(lm_eval.evaluator, name)
             for name in ("get_git_commit_hash", "add_env_info")}
    saved[lm_eval.api.task, "tqdm"] = lm_eval.api.task.tqdm
    logger.setLevel(logging.ERROR)
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    lm_eval.evaluator.add_env_info = lambda results: None
    lm_eval.api.task.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        logger.setLevel(level)
        for (module, name), value in saved.items():
            setattr(module, name, value)


@functools.cache
def shared_rows_lm():
    """lm_eval's HFLM with its log-likelihood requests (multiple choice, and the windows of rolling
    log-likelihoods) scored by scored_tokens: lm_eval's tokenization, left truncation to the model's length, sum
    and is_greedy, with the rows and prompts that requests share fed once and a float32 log-softmax (lm_eval's
    runs in the logits' dtype). Generation, and sequence-to-sequence models, go through HFLM unchanged."""
    from lm_eval.models.huggingface import HFLM

    class SharedRowsLM(HFLM):
        nan_requests = 0  # log-likelihood requests scored NaN (a merge that overflows)

        # no progress bars: one evaluation is one trial of a search, which has its own
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            batch_size = override_bs or self.batch_size
            if self.backend != "causal" or not isinstance(batch_size, int):  # seq2seq, or batch_size "auto"
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            sequences, first = [], []
            for _, context, continuation in requests:
                if not context or not continuation or len(continuation) > self.max_length:
                    raise MergeEngineError(f"lm_eval asked for the log-likelihood of {len(continuation)} tokens after "
                                           f"{len(context)}: it needs at least one of each and at most the model's "
                                           f"{self.max_length} positions of continuation")
                sequence = (context + continuation)[-(self.max_length + 1):]  # as lm_eval truncates: from the left
                sequences.append(sequence)
                first.append(len(sequence) - len(continuation))
            cut = sum(len(c) + len(t) > self.max_length + 1 for _, c, t in requests)
            if cut:
                log.warning("lm_eval: %d requests are longer than the model's %d positions; their contexts are cut "
                            "from the left", cut, self.max_length)
            scores = scored_tokens(self.model, sequences, batch_size, first, greedy=True)
            answers = []
            for (request, _, _), (logprobs, greedy) in zip(requests, scores):
                answers.append((float(logprobs.double().sum()), greedy))
                self.cache_hook.add_partial("loglikelihood", request, answers[-1])
            self.nan_requests += sum(math.isnan(score) for score, _ in answers)
            return answers

    return SharedRowsLM


def metric_direction(tasks, metric: str, source: str) -> str:
    """"maximize" or "minimize": the metric's higher_is_better in every task (lm_eval's word_perplexity is lower
    is better). Refuses a metric a task does not compute, and one better higher in some tasks and lower in others
    (their mean would mean nothing)."""
    better = {task.config.task: task.higher_is_better() for task in tasks}
    raise_problems([f"lm_eval task {name!r} computes no metric {metric!r} (it computes {', '.join(sorted(known))})"
                    for name, known in better.items() if metric not in known], source)
    higher = {bool(known[metric]) for known in better.values()}
    if len(higher) > 1:
        raise_problems([f"metric {metric!r} is better higher in some of the tasks and lower in others: their mean "
                        "has no direction to search"], source)
    return "minimize" if higher == {False} else "maximize"


def hflm_max_length(config, tokenizer) -> int:
    """The length HFLM gives a model it is handed: the config's n_positions, max_position_embeddings or n_ctx, else
    the tokenizer's model_max_length (unless unset), else 2048."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if hasattr(config, key):
            return getattr(config, key)
    unset = int(1e30)  # transformers' VERY_LARGE_INTEGER
    length = getattr(tokenizer, "model_max_length", None)
    return length if length is not None and length != unset else 2048


def task_manager(tasks: Sequence[str], include_path: str | None):
    """lm_eval's index of the tasks under include_path alone when it holds them all (indexing the harness's own
    ~15,000 task files takes 12 s), else of those and the harness's own."""
    from lm_eval.tasks import TaskManager
    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


@dataclass
class Requests:
    """What one evaluation of the tasks asks of the model, in tokens."""

    sequences: list[list[int]] = field(default_factory=list)  # log-likelihood requests: context + continuation
    first: list[int] = field(default_factory=list)  # each one's first continuation token
    rolling: list[int] = field(default_factory=list)  # each rolling log-likelihood text's tokens
    generations: list[tuple[int, int]] = field(default_factory=list)  # each generation's prompt tokens, max_gen_toks


def read_requests(tasks, tokenizer, limit: int | float | None) -> Requests:
    """The tasks' requests (their data loaded, the prompts built as simple_evaluate builds them), tokenized."""
    from lm_eval.evaluator_utils import get_sample_size
    r = Requests()
    for task in tasks:
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)  # as simple_evaluate does
        task.build_all_requests(limit=get_sample_size(task, limit), rank=0, world_size=1)
        for instance in task.instances:
            text, *rest = instance.args
            if instance.request_type == "loglikelihood":  # (context, continuation)
                context, continuation = encode_pair(tokenizer, text, rest[0])
                r.sequences.append(context + continuation)
                r.first.append(len(context))
            elif instance.request_type == "generate_until":  # (context, generation settings)
                r.generations.append((len(tokenizer(text)["input_ids"]),
                                      int(rest[0].get("max_gen_toks", DEFAULT_GENERATED_TOKENS))))
            else:  # loglikelihood_rolling: (text,)
                r.rolling.append(len(tokenizer(text)["input_ids"]))
    return r
