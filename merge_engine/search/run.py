"""`merge-engine search SEARCH.yml OUT_DIR --budget 50m`: the best merge of a config's search spaces on
validation data, within a wall-clock budget, reading the inputs once.

    search(config, out_dir, options)
      check                   the spaces, the `search:` settings, the output folder, the model headers, the
                              evaluation files, the memory plan; a budget that cannot fit one trial
      open_study              optuna's journal (a killed search resumes from it), its sampler
      MergeSession            every input read once, the live model merged at the spaces' middle
      trials                  ask -> session.merge -> evaluate -> tell, while a trial and the reserve still fit
      finish                  the best trial merged again, evaluated on the test data (if any), saved with
                              session.save: model files, mergekit_config.yml (a plain config that reproduces it
                              with merge-engine, bit for bit), trials.csv, search.json, search_journal.log
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from merge_engine.config import read_yaml
from merge_engine.devices import resolve_device
from merge_engine.engine import MergeOptions, check_seed_and_lora_dtype, input_folders
from merge_engine.errors import ConfigError, MergeEngineError
from merge_engine.evaluation import evaluator_from_spec
from merge_engine.evaluation.spec import PATH_KEYS, SCHEMAS, spec_path, spec_problems
from merge_engine.extras import optuna_log_level, require, require_isolated
from merge_engine.io.hub_cache import cache_folder
from merge_engine.io.untrusted import is_file_name, is_int, not_regular
from merge_engine.io.writer import check_output_apart, check_output_dir
from merge_engine.plan import build_plan
from merge_engine.progress import progress_bar
from merge_engine.search.budget import (
    PROBE_BYTES,
    READ_CEILING,
    Budget,
    matmul_rate,
    parse_duration,
    reserve_seconds,
    write_rate,
)
from merge_engine.search.spaces import SearchConfig, parse_search_config
from merge_engine.session import (
    MergeSession,
    input_bytes,
    job_parameters,
    live_model,
    method_key,
    output_dtype,
    output_tokenizer,
    plan_memory,
)

log = logging.getLogger("merge_engine")

SAMPLERS = ("tpe", "cmaes", "gp")
SETTINGS = ("objective", "test", "sampler", "seed", "trials", "storage")
SEED_LIMIT = 2**32  # the samplers' numpy seeds are in [0, 2**32)
STUDY_NAME = "merge_engine_search"
FINGERPRINT = "merge_engine_search_fingerprint"
JOURNAL_COPY = "search_journal.log"
ALARM_LIMIT = 1e8  # seconds (3 years): setitimer overflows near 1e12, which a budget may exceed


class SearchError(MergeEngineError):
    """A search that cannot give a result (no trial finished within the budget)."""


@dataclass
class SearchOptions:
    budget: float | str  # wall clock for everything: seconds, or a duration such as "50m" (parse_duration)
    device: str = "auto"
    placement: str = "auto"  # where the session holds the inputs (session.plan_memory)
    lora: str = "auto"  # how the session holds LoRA inputs (session.plan_memory)
    sampler: str | None = None  # overrides search.sampler
    seed: int | None = None  # the sampler's; overrides search.seed
    trials: int | None = None  # at most this many trials in this run; overrides search.trials
    storage: str | None = None  # the journal's path; overrides search.storage
    test: str | None = None  # a test data file scored like the objective; overrides search.test's data
    overwrite: bool = False
    random_seed: int = 0  # the merge's (DARE's drops)
    hub_cache: str | os.PathLike | None = None  # where Hub references are looked up (as MergeOptions.hub_cache)
    progress: bool = True
    clock: Callable[[], float] = time.monotonic
    started: float | None = None  # clock reading at which the budget began (the command: its process' start)


@dataclass
class SearchResult:
    out_dir: str
    params: dict[str, Any]  # the best trial's sampler parameters
    config: dict  # the plain config that reproduces the best merge
    score: float
    test_score: float | None
    trials: int  # finished trials in the study (earlier runs' included)
    trials_this_run: int
    seconds: float
    history: list = field(default_factory=list, repr=False)  # every trial of the study (optuna FrozenTrials)


def load_search_config(path: str) -> SearchConfig:
    return parse_search_config(read_yaml(path), path)


def search(config: SearchConfig | dict | str | os.PathLike, out_dir: str | os.PathLike, options: SearchOptions
           ) -> SearchResult:
    budget = Budget(parse_duration(options.budget), options.clock, options.started)  # checked: finite, positive
    optuna = require_isolated("optuna", "tune", "merge-engine search")
    config = os.fspath(config) if isinstance(config, os.PathLike) else config
    out_dir = os.fspath(out_dir)
    cfg = load_search_config(config) if isinstance(config, str) else (
        config if isinstance(config, SearchConfig) else parse_search_config(config))
    settings = check_settings(cfg, options)
    check_seed_and_lora_dtype(options.random_seed, None)
    check_output_dir(out_dir, options.overwrite)
    start_config = cfg.merge_config(cfg.start())
    plan = build_plan(start_config, hub_cache=cache_folder(options.hub_cache))
    check_spaces_reach(cfg, plan)
    base_dir = os.path.dirname(os.path.abspath(cfg.source)) if cfg.source else os.getcwd()
    inputs = search_inputs(cfg, settings, plan, base_dir)
    check_output_apart(out_dir, inputs)  # --overwrite would delete an input inside OUT_DIR
    check_storage(settings["storage"], storage_key(options), out_dir, inputs, cfg.source)
    tokenizer = output_tokenizer(plan)
    objective = evaluator_from_spec(settings["objective"], tokenizer, "search.objective", base_dir=base_dir)
    test = evaluator_from_spec(settings["test"], tokenizer, "search.test", base_dir=base_dir) if settings["test"] else None
    shape = live_model(plan, torch.device("meta"))  # the live model's class and config, its tensors unallocated
    evaluators = (objective, test) if test else (objective,)
    for evaluator in evaluators:
        evaluator.check_model(shape.config)
    evaluation = max(e.memory_bytes(shape) for e in evaluators)
    device = resolve_device(options.device)
    memory = plan_memory(plan, device, options.placement, lora=options.lora, evaluation=evaluation, shape=shape)
    estimate = estimate_seconds(plan, memory, objective, device, out_dir)
    check_budget_fits(budget, estimate, objective, test, input_bytes(plan.jobs))
    # the journal is held for the search (a second search on it is refused)
    with optuna_log_level(optuna, optuna.logging.WARNING), contextlib.ExitStack() as held:
        mark = fingerprint(cfg, settings, objective.direction, options.random_seed, base_dir)
        study, storage_path = open_study(optuna, cfg, settings, objective.direction, mark, out_dir,
                                         storage_key(options) if settings["storage"] else "the search's journal", held)
        session = MergeSession(start_config, str(device), placement=memory.placement, lora=memory.lora,
                               random_seed=options.random_seed, progress=options.progress, plan=plan,
                               evaluation_bytes=evaluation, hub_cache=options.hub_cache)
        ran = run_trials(optuna, study, cfg, session, objective, test, settings["trials"], budget, estimate, options)
        return finish(optuna, study, cfg, session, objective, test, out_dir, storage_path, settings, budget, options, ran,
                      estimate)


def check_spaces_reach(cfg: SearchConfig, plan) -> None:
    """Refuse a space that no tensor's parameters follow (a filter matching none of the merge's tensor names, as
    Mixtral's block_sparse_moe under transformers 5's names, or only tensors an earlier entry takes): its trials
    would all merge alike. A space is moved off its start, the others kept there, and every tensor resolved."""
    start = cfg.start()

    def resolved(params: dict) -> tuple:
        merge_cfg = cfg.merge_config(params)
        return method_key(merge_cfg), [job_parameters(merge_cfg, job, cfg.source) for job in plan.jobs]
    at_start = resolved(start)
    idle = [space.name for space in cfg.spaces if resolved({**start, **space.elsewhere()}) == at_start]
    if idle:
        raise ConfigError([f"{name}: no tensor of the merge takes this setting (its filter matches none of the "
                           "merge's tensor names, or only tensors an earlier entry's filter takes): this space would "
                           "change nothing" for name in idle], cfg.source)


def check_settings(cfg: SearchConfig, options: SearchOptions) -> dict:
    """The `search:` section with the options' overrides; ConfigError naming each bad key."""
    s = cfg.settings
    problems = [f"search.{k}: unknown setting (known: {', '.join(SETTINGS)})" for k in s if k not in SETTINGS]
    stored = s.get("storage")
    if isinstance(stored, str) and cfg.source:  # read from the search file's folder, as its data paths are
        stored = os.path.join(os.path.dirname(os.path.abspath(cfg.source)), stored)
    out = {"objective": s.get("objective"), "test": s.get("test"), "sampler": options.sampler or s.get("sampler", "tpe"),
           "seed": options.seed if options.seed is not None else s.get("seed", 0),
           "trials": options.trials if options.trials is not None else s.get("trials"),
           "storage": options.storage or stored}
    if not isinstance(out["objective"], dict):
        problems.append("search.objective: a mapping such as {kind: multiple_choice, data: val.jsonl} is required")
    # --test: scored as search.test (else the objective) is, on another file (a search.test that is no mapping is
    # named below)
    if options.test and isinstance(out["objective"], dict) and isinstance(out["test"] or {}, dict):
        like = out["test"] or out["objective"]
        if "data" in SCHEMAS.get(like.get("kind"), {"data": None}):  # (an unknown kind is named below)
            out["test"] = {**like, "data": os.path.abspath(options.test)}
        else:
            problems.append(f"--test: the objective's kind, {like['kind']}, reads no data file (give search.test its "
                            "own tasks instead)")
    if out["test"] is not None and not isinstance(out["test"], dict):
        problems.append(f"search.test: a mapping like the objective's, got {out['test']!r}")
    for key in ("objective", "test"):  # the keys now: an empty data path would pass for SEARCH.yml's folder
        if isinstance(out[key], dict):
            problems += spec_problems(out[key], f"search.{key}")
    def named(key: str) -> str:  # where a bad value came from: the option (the command's flag) or SEARCH.yml
        return f"--{key}" if getattr(options, key) is not None else f"search.{key}"
    if out["sampler"] not in SAMPLERS:
        problems.append(f"{named('sampler')}: one of {', '.join(SAMPLERS)}, got {out['sampler']!r}")
    for key in ("seed", "trials"):
        v = out[key]
        if (v is not None or key == "seed") and (not is_int(v) or (key == "trials" and v < 1)):
            problems.append(f"{named(key)}: an integer{' of at least 1' if key == 'trials' else ''}, got {v!r}")
    seed = out["seed"]
    if is_int(seed) and not 0 <= seed < SEED_LIMIT:
        problems.append(f"{named('seed')}: an integer from 0 to 2**32 - 1 (4294967295), got {seed!r}")
    if out["storage"] is not None and not (isinstance(out["storage"], str) and is_file_name(out["storage"])):
        problems.append(f"{named('storage')}: a file path, got {out['storage']!r}")
    if problems:
        raise ConfigError(problems, cfg.source)
    return out


@dataclass
class Estimate:
    """Seconds estimated before any tensor is read (lower bounds, from measured rates)."""

    read: float  # the inputs, at READ_CEILING
    trial: float  # one evaluation of the objective at the device's matrix-product rate
    per_token: float  # the same, per token fed
    write: float  # the best merge, at the output disk's measured write rate


def estimate_seconds(plan, memory, objective, device, out_dir: str) -> Estimate:
    params = sum(math.prod(shape) for _, _, shape in plan.entries())
    out_bytes = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in plan.entries())
    dtype = output_dtype(plan)
    # the faster of fp32 and the model's dtype: a CPU's bare bf16 matmul can be 10x slower than the model's layers
    per_token = 2 * params / max(matmul_rate(device, torch.float32), matmul_rate(device, dtype))
    return Estimate(input_bytes(plan.jobs) / READ_CEILING, objective.tokens() * per_token, per_token,
                    memory.model_bytes / write_rate(os.path.dirname(os.path.abspath(out_dir)),
                                                    min(PROBE_BYTES, out_bytes)))


def check_budget_fits(budget: Budget, estimate: Estimate, objective, test, in_bytes: int) -> None:
    """Refuse, before any tensor is read, a budget below a lower bound of reading the inputs, one trial and
    the final write (and test evaluation)."""
    spent = budget.elapsed()  # the budget starts with the process: importing torch and planning count
    floor = (spent + estimate.read + estimate.trial
             + reserve_seconds(estimate.write, test.tokens() * estimate.per_token if test else 0.0))
    if budget.seconds < floor:
        rest = floor - spent - estimate.read - estimate.trial - estimate.write
        raise ConfigError([f"budget: {budget.seconds:.3g} s cannot fit one trial: at least {floor:.1f} s are needed "
                           f"({spent:.1f} s already spent starting up, reading {in_bytes / 1e9:.2f} GB of inputs "
                           f"{estimate.read:.1f} s, evaluating {objective.tokens()} tokens {estimate.trial:.1f} s, "
                           f"writing the result {estimate.write:.1f} s, {rest:.1f} s of margins"
                           f"{' and test evaluation' if test else ''})"])


# ---- the inputs and the journal, checked before anything is read ----

def search_inputs(cfg: SearchConfig, settings: dict, plan, base_dir: str) -> list[str]:
    """Every file and folder the search reads: SEARCH.yml, the objective's and test's data files (and an lm-eval
    include_path), the plan's model, adapter, patch, side input and tokenizer folders."""
    paths = [cfg.source] if cfg.source else []
    for spec in (settings["objective"], settings["test"]):
        for key in PATH_KEYS if isinstance(spec, dict) else ():
            if isinstance(spec.get(key), str):  # as evaluator_from_spec resolves it; a bad value is its to name
                paths.append(spec_path(base_dir, spec[key]))
    return paths + sorted(input_folders(plan))


def storage_key(options: SearchOptions) -> str:
    return "--storage" if options.storage else "search.storage"


def check_storage(path: str | None, key: str, out_dir: str, inputs: list[str], source: str | None) -> None:
    """A journal the user named: outside OUT_DIR (the output replaces that folder at the end: the search would
    fail after its whole budget, or with --overwrite delete the journal) and apart from every input; a regular
    file when it exists (a FIFO would block the read forever). Its content is checked when the search holds it
    (open_study), before anything is appended to it."""
    if path is None:
        return  # .OUT_DIR.search/journal.log, beside the output
    real, out = os.path.realpath(path), os.path.realpath(out_dir)
    problems = []
    if os.path.commonpath([out, real]) == out:
        problems.append(f"{key}: the journal {path} is inside the output folder {out_dir}, which the output replaces; "
                        "give a path outside it")
    for inp in inputs:
        folder = os.path.realpath(inp)
        if real == folder:
            problems.append(f"{key}: the journal {path} is the search's input {inp}; give another path")
        elif os.path.isdir(folder) and os.path.commonpath([folder, real]) == folder:
            problems.append(f"{key}: the journal {path} is inside the input folder {inp}; give a path outside it")
    if problems:
        raise ConfigError(problems[:1], source)
    check_regular(path, key, source)


def check_regular(path: str, key: str, source: str | None) -> None:
    """ConfigError when an existing journal is not a regular file (a FIFO would block its opening forever)."""
    try:
        what = not_regular(os.stat(path).st_mode)
    except FileNotFoundError:
        return  # created by the search
    except OSError as e:
        raise ConfigError([f"{key}: cannot read the journal {path} ({e.strerror or e})"], source) from None
    if what:
        raise ConfigError([f"{key}: the journal {path} is {what}, not a regular file"], source)


def check_journal(path: str, key: str, source: str | None) -> int | None:
    """ConfigError naming the file and line when a journal (a regular file) does not hold optuna's JournalStorage
    log; nothing is written. Returns, where its last line was cut short after journal entries (a search stopped
    while writing it: that entry never took effect), the size of its whole lines (open_study removes the rest once
    the journal is known to be this search's); else None."""
    complete, operations = 0, journal_operations()
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.endswith(b"\n") or (complete == 0 and not line.startswith(ENTRY_START)):
                    try:
                        entry = json.loads(line)
                    except (ValueError, RecursionError):  # not UTF-8, not JSON, absurdly nested
                        entry = None
                    if not isinstance(entry, dict) or entry.get("op_code") not in operations:
                        raise ConfigError([f"{key}: {path}:{number}: not a search journal, or a corrupt one (not an "
                                           "optuna journal entry): give another storage path, or remove it to start "
                                           "afresh"], source)
                if not line.endswith(b"\n"):
                    return complete
                complete += len(line)
    except OSError as e:
        raise ConfigError([f"{key}: cannot read the journal {path} ({e.strerror or e})"], source) from None
    return None


ENTRY_START = b'{"op_code": '  # how optuna writes an entry: a first line cut short is a journal's only if so


def journal_operations() -> set[int]:
    """The op_codes of optuna's journal entries (an entry of any other makes its replay fail an assertion)."""
    from optuna.storages.journal._storage import JournalOperation
    return {int(op) for op in JournalOperation}


# ---- the study ----

def fingerprint(cfg: SearchConfig, settings: dict, direction: str, random_seed: int, base_dir: str) -> str:
    """What a journal's trials mean: the merge config with its spaces, the merge's random seed (DARE's and DELLA's
    drops), and the objective with the content of its data file."""
    spec = settings["objective"]
    data = spec.get("data") if isinstance(spec, dict) else None
    digest = None
    if isinstance(data, str) and os.path.isfile(path := spec_path(base_dir, data)):
        digest = file_sha256(path)
    return _hash_of({"config": cfg.raw, "objective": spec, "direction": direction, "random_seed": random_seed,
                     "data": digest})


def file_sha256(path: str) -> str:
    """The file's SHA-256, read in blocks (hashlib.file_digest is Python 3.11's; the package supports 3.10)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def earlier_fingerprint(cfg: SearchConfig, settings: dict, direction: str) -> str:
    """The fingerprint of journals written before the seed and the data were part of it (merge_engine 0.1.0 until
    2026-12-05): resumed with a warning, as neither can be checked."""
    return _hash_of({"config": cfg.raw, "objective": settings["objective"], "direction": direction})


def _hash_of(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def work_folder(out_dir: str) -> str:
    """Beside the output, where a search keeps its journal until the output is complete."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    return os.path.join(parent, f".{name}.search")


def open_study(optuna, cfg: SearchConfig, settings: dict, direction: str, mark: str, out_dir: str, key: str,
               held: contextlib.ExitStack):
    """The study of the journal (created, or resumed when it holds this search's trials), and its path. A journal
    of another search, or one another search holds, is refused before anything is written to it; this search
    holds the journal until `held` closes."""
    path = os.path.abspath(settings["storage"] or os.path.join(work_folder(out_dir), "journal.log"))
    folder = os.path.dirname(path)
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise ConfigError([f"{key}: {folder}, where the journal goes, is in the way: not a folder"], cfg.source)
    os.makedirs(folder, exist_ok=True)
    check_regular(path, key, cfg.source)
    hold_alone(path, key, cfg.source, held)  # first: a search that ends meanwhile would append after the check
    remove_stale_optuna_lock(path)
    cut = check_journal(path, key, cfg.source)
    storage = journal_storage(optuna, path)
    study = load_study(optuna, storage, path, cfg.source)
    found = study.user_attrs.get(FINGERPRINT) if study is not None else None
    if found is not None and found == earlier_fingerprint(cfg, settings, direction):
        log.warning("%s was written by an earlier merge_engine, which did not record the merge's random seed and the "
                    "objective data's content: resuming it assumes both are the same as then", path)
    elif found not in (None, mark):
        raise ConfigError([f"{path} journals another search (other spaces, models, objective, objective data or "
                           "--random-seed): remove it or give another storage path"], cfg.source)
    if cut is not None:  # optuna would append after the cut line and make the next one unreadable
        log.warning("%s: removing an incomplete last journal entry (written when the search stopped; it never took "
                    "effect)", path)
        os.truncate(path, cut)
        storage = journal_storage(optuna, path)
        study = load_study(optuna, storage, path, cfg.source)
    if study is None:
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=direction)
    study.set_user_attr(FINGERPRINT, mark)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)  # a killed run's last trial
    if not study.trials:
        study.enqueue_trial(cfg.start())  # the spaces' middle: the session is opened on it
    # a resumed sampler seeded anew, so its first random proposals are not the earlier run's again
    study.sampler = make_sampler(optuna, settings["sampler"], (settings["seed"] + len(study.trials)) % SEED_LIMIT)
    return study, path


def hold_alone(path: str, key: str, source: str | None, held: contextlib.ExitStack) -> None:
    """An exclusive lock (flock) on the journal while held: two searches on one journal would fail each other's
    running trials and delete each other's files. The lock goes with the process, however it ends."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    held.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError([f"{key}: another search is running with the journal {path}: wait for it to end, or give "
                           "this one another output folder or storage path"], source) from None


def remove_stale_optuna_lock(path: str) -> None:
    """Remove the lock optuna makes beside the journal for each access (PATH.lock, a symbolic link) where a killed
    search left it: it is stale, as this search holds the journal alone, and optuna would wait 30 s, out of the
    budget, before forcing it."""
    lock = path + ".lock"
    if os.path.islink(lock):
        os.unlink(lock)
        log.warning("removed %s, the journal's lock, which a search killed while writing the journal left", lock)


def journal_storage(optuna, path: str):
    backend = optuna.storages.journal.JournalFileBackend(path)
    append = backend.append_logs

    def append_naming_the_journal(logs: list[dict]) -> None:  # a full disk's OSError (a buffered write's) names no file
        try:
            append(logs)
        except OSError as e:
            if e.filename is None:
                raise OSError(e.errno, e.strerror, path) from e
            raise
    backend.append_logs = append_naming_the_journal
    return optuna.storages.JournalStorage(backend)


def load_study(optuna, storage, path: str, source: str | None):
    """This search's study in the journal at path (its storage), None where it holds none; reads only."""
    try:
        if STUDY_NAME not in optuna.study.get_all_study_names(storage):
            return None
        return optuna.load_study(study_name=STUDY_NAME, storage=storage)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, AssertionError) as e:  # entries that
        # check_journal let through
        raise ConfigError([f"{path}: a corrupt search journal ({type(e).__name__}: {e}): give another storage "
                           "path, or remove it to start afresh"], source) from None
def make_sampler(optuna, name: str, seed: int):
    if name == "cmaes":
        require("cmaes", "tune", "the CMA-ES sampler")
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        require("scipy", "tune", "the Gaussian-process sampler")
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


# ---- trials ----

def run_trials(optuna, study, cfg: SearchConfig, session: MergeSession, objective, test, max_trials: int | None,
               budget: Budget, estimate: Estimate, options: SearchOptions) -> int:
    """Trials while one more (as long as the longest so far; the first as estimated) and the reserve for the end
    fit the budget."""
    durations: list[float] = []  # measured trials (until the first, the estimate's lower bound stands in)
    merges: list[float] = []  # their merges: the end merges the best trial's config again
    eval_per_token: list[float] = []
    done = 0
    with progress_bar(total=round(budget.seconds), unit="s", desc="search", disable=not options.progress,
                      bar_format="{desc}: {bar} {n_fmt}/{total_fmt} s {postfix}") as bar:
        while max_trials is None or done < max_trials:
            per_token = max(eval_per_token, default=estimate.per_token)
            reserve = reserve_seconds(estimate.write + max(merges, default=0.0),
                                      per_token * test.tokens() if test else 0.0)
            if budget.left() < max(durations, default=estimate.trial) + reserve:
                break
            began = budget.clock()  # a trial's time includes the sampler's (a GP's can take seconds)
            trial = study.ask()
            for space in cfg.spaces:
                space.suggest(trial)
            asked = budget.clock()
            step = session.merge(cfg.merge_config(trial.params))
            merged = budget.clock()
            try:  # the first trial's evaluation is known only by a lower bound, and any can slow down
                with stopped_after(budget.left() - reserve):
                    score = float(objective(session.model))
            except BudgetSpent:
                log.warning("trial %d stopped: its evaluation ran into the time kept for the end of the search",
                            trial.number)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                break
            scored = budget.clock()
            for key, value in (("merge_seconds", merged - asked), ("eval_seconds", scored - merged),
                               ("tensors_merged", step.tensors)):
                trial.set_user_attr(key, value)
            study.tell(trial, score if math.isfinite(score) else None,
                       state=None if math.isfinite(score) else optuna.trial.TrialState.FAIL)
            ended = budget.clock()
            eval_per_token.append((scored - merged) / max(objective.tokens(), 1))
            merges.append(merged - asked)
            durations.append(ended - began)
            done += 1
            bar.n = min(round(budget.elapsed()), bar.total)
            bar.set_postfix_str(f"trials {done}, best {best_value(study):.4g}, {max(budget.left(), 0):.0f} s left")
    return done


class BudgetSpent(BaseException):
    """An evaluation stopped by stopped_after (a BaseException, so that no evaluator's `except Exception` takes it)."""


@contextlib.contextmanager
def stopped_after(seconds: float):
    """Raise BudgetSpent in the block once `seconds` of wall clock have passed (SIGALRM: in the main thread, where
    Python delivers signals; elsewhere the block runs unbounded). The model is only read meanwhile, so stopping it
    leaves the session as it was."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def spent(signum, frame):
        raise BudgetSpent
    previous = signal.signal(signal.SIGALRM, spent)
    began = time.monotonic()
    callers_delay, callers_interval = signal.setitimer(signal.ITIMER_REAL, min(max(seconds, 1e-3), ALARM_LIMIT))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)
        if callers_delay:  # the caller's own timer (an alarm() watchdog), with the time it had left: due now if it
            # came due in the block, where it could not run
            left = callers_delay - (time.monotonic() - began)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6), callers_interval)


def best_value(study) -> float:
    try:
        return study.best_value
    except ValueError:
        return math.nan


# ---- the end ----

def finish(optuna, study, cfg: SearchConfig, session: MergeSession, objective, test, out_dir: str, storage_path: str,
           settings: dict, budget: Budget, options: SearchOptions, ran: int, estimate: Estimate) -> SearchResult:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise SearchError(f"no trial finished within the budget of {budget.seconds:.0f} s (the journal {storage_path} "
                          "keeps what ran: run again with a larger budget to resume)")
    best = study.best_trial
    best_config = cfg.concrete(best.params)
    session.merge(best_config)
    test_score = test_in_time(test, session, budget, estimate) if test else None
    summary = {"objective": objective.name, "direction": objective.direction, "score": best.value,
               "test": test.name if test else None, "test_score": test_score, "best_trial": best.number,
               "params": best.params, "trials": len(complete), "budget_seconds": budget.seconds,
               "seconds": budget.elapsed(), "sampler": settings["sampler"],
               "random_seed": options.random_seed}  # the merge's: DARE and DELLA need it to reproduce the model
    extra = {"trials.csv": trials_table(study, cfg), "search.json": json.dumps(summary, indent=2, default=str) + "\n"}
    with open(storage_path, "rb") as f:
        extra[JOURNAL_COPY] = f.read()
    history = study.get_trials(deepcopy=True)
    session.save(out_dir, MergeOptions(overwrite=options.overwrite, quiet=True), extra_files=extra)
    if not options.storage and not settings["storage"]:
        shutil.rmtree(work_folder(out_dir), ignore_errors=True)  # the journal lives on in the output
    return SearchResult(os.path.abspath(out_dir), best.params, best_config, best.value, test_score, len(complete),
                        ran, budget.elapsed(), history)


def test_in_time(test, session: MergeSession, budget: Budget, estimate: Estimate) -> float | None:
    """The best merge's test score; None where its evaluation runs into the time kept for the write (the reserve
    counted it at the objective's rate per token, or, after one trial, at a lower bound)."""
    try:
        with stopped_after(budget.left() - reserve_seconds(estimate.write, 0.0)):
            return float(test(session.model))
    except BudgetSpent:
        log.warning("the test evaluation stopped: it ran into the time kept for writing the best merge (search.json "
                    "has no test score)")
        return None


def trials_table(study, cfg: SearchConfig) -> str:
    """CSV: one row per trial with its state, score, seconds and sampler parameters."""
    names = [n for space in cfg.spaces for n in (
        [f"{space.name}[{k}]" for k in range(space.knots)] if space.knots else [space.name])]
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["trial", "state", "score", "merge_seconds", "eval_seconds", "tensors_merged", *names])
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        w.writerow([t.number, t.state.name, "" if t.value is None else repr(t.value),
                    *(_fmt(attrs.get(k)) for k in ("merge_seconds", "eval_seconds", "tensors_merged")),
                    *(repr(t.params[n]) if n in t.params else "" for n in names)])
    return out.getvalue()


def _fmt(v) -> str:
    return "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
