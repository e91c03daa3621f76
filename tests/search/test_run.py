"""The search (merge_engine/search/run.py): the budget with a fake clock (trials stop in time to write the best
merge), resuming a killed search from its journal, the written config reproducing the best model bit for bit,
each sampler, and bad input refused before any tensor is read."""
from __future__ import annotations

import concurrent.futures
import csv
import io
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

import merge_engine.search.run as run_module
from merge_engine.config import load_config
from merge_engine.engine import MergeOptions, merge
from merge_engine.errors import ConfigError
from merge_engine.evaluation import MultipleChoice
from merge_engine.search import SearchError, SearchOptions, search
from merge_engine.session import MemoryPlanError, MergeSession
from tests.evaluation.conftest import word_tokenizer
from tests.search.conftest import search_config


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TimedEvaluator:
    """An objective that takes `seconds` of the fake clock per call and scores the live model's mean weight."""

    direction = "maximize"

    def __init__(self, clock: FakeClock, seconds: float, tokens: int = 100, fail_on_call: int | None = None,
                 memory: int = 0):
        self.clock, self.seconds, self._tokens, self.fail_on_call = clock, seconds, tokens, fail_on_call
        self.name, self.calls, self.memory = "fake", 0, memory

    def tokens(self) -> int:
        return self._tokens

    def memory_bytes(self, model) -> int:
        assert next(model.parameters()).device.type == "meta"  # asked before any weight is read
        return self.memory

    def check_model(self, config) -> None:
        pass

    def __call__(self, model) -> float:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # the search killed mid-trial
        self.clock.now += self.seconds
        return float(sum(p.double().sum() for p in model.parameters()))


@pytest.fixture
def fake_rates(monkeypatch):
    """Measured rates replaced: writing the best merge costs `write_seconds` of the (fake) clock, an evaluated
    token costs nothing before a trial measures it."""
    def use(clock: FakeClock, write_seconds: float, objective, test=None):
        model_bytes = {}
        monkeypatch.setattr(run_module, "matmul_rate", lambda device, dtype: 1e30)

        def rate(folder, probe_bytes):
            return model_bytes["n"] / write_seconds
        original_estimate = run_module.estimate_seconds

        def estimate(plan, memory, objective_, device, out_dir):
            model_bytes["n"] = memory.model_bytes
            return original_estimate(plan, memory, objective_, device, out_dir)
        monkeypatch.setattr(run_module, "write_rate", rate)
        monkeypatch.setattr(run_module, "estimate_seconds", estimate)
        specs = iter([objective, test])
        monkeypatch.setattr(run_module, "evaluator_from_spec", lambda spec, tok, where, base_dir: next(specs))
        saves = []
        real_save = MergeSession.save

        def save(self, out_dir, options=None, extra_files=None):
            clock.now += write_seconds
            saves.append(clock.now)
            return real_save(self, out_dir, options, extra_files)
        monkeypatch.setattr(MergeSession, "save", save)
        return saves
    return use


def test_the_budget_stops_trials_in_time_for_the_final_write(search_models, fake_rates, tmp_path):
    paths, val, _ = search_models
    clock = FakeClock()
    saves = fake_rates(clock, write_seconds=5.0, objective=TimedEvaluator(clock, 10.0))
    result = search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(
        budget=100, device="cpu", progress=False, clock=clock))
    # each trial takes 10 s and the end keeps 1.5 * 5 + 2 = 9.5 s: a trial starts while 19.5 s are left
    assert result.trials_this_run == 9
    assert saves == [clock.now] and clock.now - 1000.0 <= 100
    assert os.path.exists(tmp_path / "out" / "model.safetensors")


def test_a_budget_counts_from_when_it_started(search_models, fake_rates, tmp_path):
    # the command starts the budget at its process' start: 30 s of start-up leave 70 s of a 100 s budget
    paths, val, _ = search_models
    clock = FakeClock()
    fake_rates(clock, write_seconds=5.0, objective=TimedEvaluator(clock, 10.0))
    result = search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(
        budget=100, device="cpu", progress=False, clock=clock, started=clock.now - 30))
    assert result.trials_this_run == 6 and clock.now - (1000.0 - 30) <= 100  # 9 trials from a budget's start


def test_the_reserve_covers_the_test_evaluation(search_models, fake_rates, tmp_path):
    paths, val, test = search_models
    clock = FakeClock()
    # the test file has twice the validation's tokens: its evaluation is estimated at 20 s of the fake clock
    fake_rates(clock, write_seconds=5.0, objective=TimedEvaluator(clock, 10.0, tokens=100),
               test=TimedEvaluator(clock, 20.0, tokens=200))
    result = search(search_config(paths, val, test={"kind": "multiple_choice", "data": test}), str(tmp_path / "out"),
                    SearchOptions(budget=200, device="cpu", progress=False, clock=clock))
    assert result.test_score is not None
    assert clock.now - 1000.0 <= 200
    # a trial starts while 10 + 1.5 * (5 + 20) + 2 = 49.5 s are left: at 0, 10, ..., 150
    assert result.trials_this_run == 16


class SleepingEvaluator(TimedEvaluator):
    """An objective that takes `seconds` of the real clock per call, and `slow_seconds` on call `slow_call`."""

    def __init__(self, seconds: float, slow_call: int, slow_seconds: float):
        super().__init__(FakeClock(), seconds)
        self.slow_call, self.slow_seconds = slow_call, slow_seconds

    def __call__(self, model) -> float:
        self.calls += 1
        time.sleep(self.slow_seconds if self.calls == self.slow_call else self.seconds)
        return float(sum(p.double().sum() for p in model.parameters()))


@pytest.mark.parametrize("slow_call", [1, 3])
def test_an_evaluation_that_runs_past_the_budget_is_stopped(slow_call, search_models, monkeypatch, tmp_path):
    # the real clock: the first trial's evaluation is known only by a lower bound, and any can slow down; one that
    # would run 60 s is stopped when only the reserve for the end is left, failed, and the best finished one saved
    paths, val, _ = search_models
    objective = SleepingEvaluator(0.05, slow_call, 60.0)
    monkeypatch.setattr(run_module, "evaluator_from_spec", lambda spec, tok, where, base_dir: objective)
    began = time.monotonic()
    if slow_call == 1:  # nothing finished: no result, but in time
        with pytest.raises(SearchError, match="no trial finished"):
            search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=8, device="cpu",
                                                                                progress=False))
    else:
        result = search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=8, device="cpu",
                                                                                         progress=False))
        states = [t.state.name for t in result.history]
        assert states == ["COMPLETE", "COMPLETE", "FAIL"] and result.trials == 2
        assert os.path.exists(tmp_path / "out" / "model.safetensors")
    assert time.monotonic() - began <= 8


def test_a_test_evaluation_that_runs_past_the_budget_is_stopped(search_models, monkeypatch, tmp_path):
    # the reserve counts the test at the objective's measured rate: a test slower per token is stopped when only
    # the write's reserve is left, and the best merge saved without a test score
    paths, val, test = search_models
    evaluators = iter([SleepingEvaluator(0.05, 0, 0.0), SleepingEvaluator(60.0, 0, 0.0)])
    monkeypatch.setattr(run_module, "evaluator_from_spec", lambda spec, tok, where, base_dir: next(evaluators))
    began = time.monotonic()
    result = search(search_config(paths, val, test={"kind": "multiple_choice", "data": test}), str(tmp_path / "out"),
                    SearchOptions(budget=8, device="cpu", progress=False))
    assert time.monotonic() - began <= 8
    assert result.test_score is None and os.path.exists(tmp_path / "out" / "model.safetensors")
    assert json.loads((tmp_path / "out" / "search.json").read_text())["test_score"] is None


def test_a_budget_beyond_the_alarm_clock_runs(search_models, fake_rates, tmp_path):
    paths, val, _ = search_models
    clock = FakeClock()
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0))
    result = search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(
        budget="300000000h", device="cpu", progress=False, clock=clock, trials=2))
    assert result.trials_this_run == 2


def test_a_budget_too_small_for_one_trial_is_refused_before_reading(search_models, fake_rates, monkeypatch, tmp_path):
    paths, val, _ = search_models
    clock = FakeClock()
    fake_rates(clock, write_seconds=30.0, objective=TimedEvaluator(clock, 10.0))
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
    # every part of the floor is named, the time already spent (planning) and the margins too: 47 = 0 + 0 + 30 + 17
    with pytest.raises(ConfigError, match=r"budget: 40 s cannot fit one trial: at least 47\.0 s are needed \(0\.0 s "
                                          r"already spent starting up, .* writing the result 30\.0 s, 17\.0 s of "
                                          r"margins\)"):
        search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=40, device="cpu", progress=False,
                                                                            clock=clock))
    assert not os.path.exists(tmp_path / "out")


def test_the_memory_plan_keeps_room_for_the_larger_evaluation(search_models, fake_rates, monkeypatch, tmp_path):
    paths, val, test = search_models
    clock = FakeClock()
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0, memory=1000),
               test=TimedEvaluator(clock, 1.0, memory=3000))
    opened = []
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: opened.append(k) or MergeSession(*a, **k))
    search(search_config(paths, val, test={"kind": "multiple_choice", "data": test}), str(tmp_path / "out"),
           SearchOptions(budget=100, device="cpu", progress=False, clock=clock, trials=1))
    assert opened[0]["evaluation_bytes"] == 3000


def test_a_search_whose_evaluation_cannot_fit_is_refused_before_reading(search_models, fake_rates, monkeypatch,
                                                                       tmp_path):
    paths, val, _ = search_models
    clock = FakeClock()
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0, memory=10**15))
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
    with pytest.raises(MemoryPlanError, match=r"evaluation 1e\+06 GB.*a smaller evaluation batch_size would fit"):
        search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=100, device="cpu",
                                                                            progress=False, clock=clock))
    assert not os.path.exists(tmp_path / "out")


def test_a_killed_search_resumes_from_its_journal(search_models, fake_rates, tmp_path):
    paths, val, _ = search_models
    clock = FakeClock()
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0, fail_on_call=4))
    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        search(search_config(paths, val), out, SearchOptions(budget=1000, device="cpu", progress=False, clock=clock))
    journal = tmp_path / ".out.search" / "journal.log"
    assert journal.exists() and not os.path.exists(out)
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0))
    result = search(search_config(paths, val), out, SearchOptions(budget=1000, device="cpu", progress=False,
                                                                   clock=clock, trials=4))
    states = [t.state.name for t in result.history]
    assert states == ["COMPLETE"] * 3 + ["FAIL"] + ["COMPLETE"] * 4  # the killed trial is failed, not re-run
    assert result.trials == 7 and result.trials_this_run == 4
    finished = [tuple(sorted(t.params.items())) for t in result.history if t.state.name == "COMPLETE"]
    assert len(set(finished)) == len(finished)  # no finished trial repeated
    assert not journal.exists() and os.path.exists(os.path.join(out, "search_journal.log"))
    rows = list(csv.DictReader(io.StringIO(open(os.path.join(out, "trials.csv")).read())))
    assert [r["state"] for r in rows] == states


def test_the_journal_lock_a_killed_search_left_is_removed_on_resume(search_models, fake_rates, tmp_path, caplog):
    # before, optuna waited 30 s for it (out of the budget, with a warning every 10 s), then forced it
    import optuna
    paths, val, _ = search_models
    clock = FakeClock()
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0, fail_on_call=2))
    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        search(search_config(paths, val), out, SearchOptions(budget=1000, device="cpu", progress=False, clock=clock))
    journal = str(tmp_path / ".out.search" / "journal.log")
    lock = optuna.storages.journal.JournalFileSymlinkLock(journal)
    assert lock.acquire()  # held, as by a search killed while writing its journal
    acquire = optuna.storages.journal.JournalFileSymlinkLock.acquire

    def acquire_at_once(self):
        if os.path.lexists(self._lock_file):
            raise AssertionError(f"{self._lock_file} is held")  # in place of optuna's 30 s wait
        return acquire(self)
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0))
    with pytest.MonkeyPatch.context() as patch, caplog.at_level("WARNING", logger="merge_engine"):
        patch.setattr(optuna.storages.journal.JournalFileSymlinkLock, "acquire", acquire_at_once)
        result = search(search_config(paths, val), out, SearchOptions(budget=1000, device="cpu", progress=False,
                                                                       clock=clock, trials=1))
    assert result.trials_this_run == 1 and f"removed {journal}.lock" in caplog.text


def test_a_journal_of_another_search_is_refused(search_models, fake_rates, tmp_path):
    paths, val, _ = search_models
    clock = FakeClock()
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0, fail_on_call=2))
    with pytest.raises(KeyboardInterrupt):
        search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=100, device="cpu",
                                                                            progress=False, clock=clock))
    other = search_config(paths, val)
    other["parameters"]["normalize"] = True  # one space fewer
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0))
    journal = tmp_path / ".out.search" / "journal.log"
    before = journal.read_bytes()
    with pytest.raises(ConfigError, match="journals another search"):
        search(other, str(tmp_path / "out"), SearchOptions(budget=100, device="cpu", progress=False, clock=clock))
    # the merge's random seed (DARE's drops) and the objective data's content also decide what a score means
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0))
    with pytest.raises(ConfigError, match="journals another search"):
        search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=100, device="cpu",
                                                                            progress=False, clock=clock,
                                                                            random_seed=1))
    edited = tmp_path / "edited.jsonl"
    edited.write_text(open(val).read() + "\n")
    shutil.copy(val, tmp_path / "original.jsonl")
    shutil.copy(edited, val)
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0))
    try:
        with pytest.raises(ConfigError, match="journals another search"):
            search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=100, device="cpu",
                                                                                progress=False, clock=clock))
    finally:
        shutil.copy(tmp_path / "original.jsonl", val)
    assert journal.read_bytes() == before  # refused before anything is written to it


def test_the_fingerprint_needs_no_python_3_11(search_models, monkeypatch):
    """requires-python is >=3.10: hashlib.file_digest (3.11) is not there; the data's digest is its content's."""
    import hashlib
    paths, val, _ = search_models
    cfg = run_module.parse_search_config(search_config(paths, val))
    settings = run_module.check_settings(cfg, SearchOptions(budget=100))
    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    with open(val, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert run_module.fingerprint(cfg, settings, "maximize", 0, os.getcwd()) == run_module._hash_of(
        {"config": cfg.raw, "objective": settings["objective"], "direction": "maximize", "random_seed": 0,
         "data": digest})


def test_a_journal_of_an_earlier_version_is_resumed_with_a_warning(search_models, fake_rates, tmp_path, caplog):
    # its fingerprint did not hold the merge's random seed and the data's digest: taken as this search's, said so
    import optuna
    paths, val, _ = search_models
    clock = FakeClock()
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0, fail_on_call=2))
    config = search_config(paths, val)
    with pytest.raises(KeyboardInterrupt):
        search(config, str(tmp_path / "out"), SearchOptions(budget=100, device="cpu", progress=False, clock=clock))
    journal = str(tmp_path / ".out.search" / "journal.log")
    study = optuna.load_study(study_name=run_module.STUDY_NAME, storage=run_module.journal_storage(optuna, journal))
    cfg = run_module.parse_search_config(config)
    settings = run_module.check_settings(cfg, SearchOptions(budget=100))
    study.set_user_attr(run_module.FINGERPRINT, run_module.earlier_fingerprint(cfg, settings, "maximize"))
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0))
    result = search(config, str(tmp_path / "out"), SearchOptions(budget=100, device="cpu", progress=False,
                                                                 clock=clock, trials=2))
    assert result.trials == 3 and "written by an earlier merge_engine" in caplog.text


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "gp"])
def test_the_best_config_reproduces_the_best_model_bit_for_bit(sampler, search_models, tmp_path):
    paths, val, test = search_models
    out = tmp_path / "out"
    result = search(search_config(paths, val, sampler=sampler, test={"kind": "multiple_choice", "data": test}),
                    str(out), SearchOptions(budget=600, device="cpu", progress=False, trials=4))
    assert result.trials == 4
    again = tmp_path / "again"
    merge(load_config(str(out / "mergekit_config.yml")), str(again), MergeOptions(device="cpu", quiet=True))
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = word_tokenizer(bos=True)
    assert MultipleChoice(val, tokenizer)(loaded) == result.score  # the saved model scores what the search saw
    assert MultipleChoice(test, tokenizer)(loaded) == result.test_score
    summary = json.loads((out / "search.json").read_text())
    assert summary["score"] == result.score and summary["params"] == result.params and summary["random_seed"] == 0
    rows = list(csv.DictReader(io.StringIO((out / "trials.csv").read_text())))
    assert max(float(r["score"]) for r in rows) == result.score


def test_a_search_over_factored_lora_experts_reproduces_its_best_model(search_models, tmp_path, monkeypatch):
    from tests.lora_adapters import write_adapter
    paths, val, _ = search_models
    for i in (1, 2):
        write_adapter(str(tmp_path / f"a{i}"), paths[0], seed=i, r=2, alpha=4)
    config = search_config([paths[0]] + [f"{paths[0]}+{tmp_path / f'a{i}'}" for i in (1, 2)], val)
    opened = []
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: opened.append(k["lora"]) or MergeSession(*a, **k))
    out = tmp_path / "out"
    result = search(config, str(out), SearchOptions(budget=600, device="cpu", progress=False, trials=3, lora="factored"))
    assert opened == ["factored"] and result.trials == 3
    again = tmp_path / "again"
    merge(load_config(str(out / "mergekit_config.yml")), str(again), MergeOptions(device="cpu", quiet=True))
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_no_finished_trial_is_an_error_that_keeps_the_journal(search_models, fake_rates, tmp_path):
    paths, val, _ = search_models
    clock = FakeClock()

    class Failing(TimedEvaluator):
        def __call__(self, model):
            self.clock.now += 1
            return float("nan")
    fake_rates(clock, write_seconds=1.0, objective=Failing(clock, 1.0))
    with pytest.raises(SearchError, match="no trial finished"):
        search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=30, device="cpu",
                                                                            progress=False, clock=clock))
    assert (tmp_path / ".out.search" / "journal.log").exists() and not (tmp_path / "out").exists()


BAD_SETTINGS = {  # change to the `search:` section -> what the message names
    "unknown key": ({"trails": 3}, "search.trails: unknown setting"),
    "no objective": ({"objective": None}, "search.objective: a mapping"),
    "bad sampler": ({"sampler": "random"}, "search.sampler: one of tpe, cmaes, gp"),
    "bad trials": ({"trials": 0}, "search.trials: an integer of at least 1"),
    "null seed": ({"seed": None}, "search.seed: an integer, got None"),
    "seed past numpy's": ({"seed": 2**32}, r"search.seed: an integer from 0 to 2\*\*32 - 1 \(4294967295\), got 4294967296"),
    "bad objective kind": ({"objective": {"kind": "bleu", "data": "x"}}, "kind"),
    "storage with a NUL": ({"storage": "j\0.log"}, r"search.storage: a file path, got '.*j\\x00.log'"),
    "data with a lone surrogate": ({"objective": {"kind": "multiple_choice", "data": "v\ud800.jsonl"}},
                                   r"search.objective.data must be a file path, got 'v\\ud800.jsonl'"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_settings_are_refused_before_reading(case, search_models, monkeypatch, tmp_path):
    paths, val, _ = search_models
    change, message = BAD_SETTINGS[case]
    config = search_config(paths, val)
    config["search"].update(change)
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
    with pytest.raises(ConfigError, match=message):
        search(config, str(tmp_path / "out"), SearchOptions(budget=100, device="cpu", progress=False))


@pytest.mark.parametrize("option, message", [({"sampler": "random"}, "--sampler: one of tpe, cmaes, gp"),
                                             ({"trials": 0}, "--trials: an integer of at least 1"),
                                             ({"seed": -1}, r"--seed: an integer from 0 to 2\*\*32 - 1"),
                                             ({"storage": 7}, "--storage: a file path, got 7")])
def test_bad_options_are_named_as_options(option, message, search_models, monkeypatch, tmp_path):
    paths, val, _ = search_models
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
    with pytest.raises(ConfigError, match=message):
        search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=100, device="cpu", progress=False,
                                                                            **option))


@pytest.mark.parametrize("change, message", [
    # an lm_eval objective has no data file for --test to replace (it was refused as search.test.data, a key the
    # user never wrote)
    ({"objective": {"kind": "lm_eval", "tasks": ["a_task"]}}, r"--test: the objective's kind, lm_eval, reads no data"),
    ({"test": "test.jsonl"}, r"search.test: a mapping like the objective's, got 'test.jsonl'"),  # was a TypeError
])
def test_a_test_file_option_that_cannot_apply_is_named(change, message, search_models, monkeypatch, tmp_path):
    paths, val, _ = search_models
    config = search_config(paths, val)
    config["search"].update(change)
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
    with pytest.raises(ConfigError, match=message) as refused:
        search(config, str(tmp_path / "out"), SearchOptions(budget=100, device="cpu", progress=False, test=val))
    assert "search.test.data" not in str(refused.value)


@pytest.mark.parametrize("lines, message", [
    (['{"question": "the cat", "choices": ["sat", "ran"], "answer": 2}'], r"val\.jsonl:1"),
    (['{"question": "the cat", "choices": ["sat", "ran"], "answer": 0}', "{not json"], r"val\.jsonl:2"),
    ([], "val.jsonl"),
])
def test_bad_evaluation_files_are_refused_before_reading(lines, message, search_models, monkeypatch, tmp_path):
    paths, _, _ = search_models
    val = tmp_path / "val.jsonl"
    val.write_text("".join(line + "\n" for line in lines))
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
    with pytest.raises(ConfigError, match=message):
        search(search_config(paths, str(val)), str(tmp_path / "out"), SearchOptions(budget=100, device="cpu",
                                                                                  progress=False))


def test_data_longer_than_the_model_takes_is_refused_before_reading(search_models, monkeypatch, tmp_path):
    paths, _, _ = search_models
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the cat sat on the mat"] * 50) + "\n")  # 300 words: past the 128 positions
    config = search_config(paths, "unused")
    config["search"]["objective"] = {"kind": "perplexity", "data": str(text), "max_length": 512}
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
    with pytest.raises(ConfigError, match=r"more than its max_position_embeddings \(128\)"):
        search(config, str(tmp_path / "out"), SearchOptions(budget=100, device="cpu", progress=False))


def test_an_existing_output_is_refused_before_reading(search_models, monkeypatch, tmp_path):
    from merge_engine.errors import OutputError
    paths, val, _ = search_models
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
    with pytest.raises(OutputError):
        search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=100, device="cpu",
                                                                            progress=False))
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"


def test_a_donor_without_a_loadable_tokenizer_is_named_before_reading(search_models, monkeypatch, tmp_path):
    """The scores need the merge's tokenizer, the donor's: a donor folder without one gave transformers' traceback."""
    paths, val, _ = search_models
    config = search_config([paths[1], paths[0], paths[2]], val)  # the base, the donor, is an expert without tokenizer
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
    with pytest.raises(ConfigError, match=rf"{re.escape(paths[1])}: cannot load its tokenizer \(\w+Error: "):
        search(config, str(tmp_path / "out"), SearchOptions(budget=100, device="cpu", progress=False))


def test_relative_paths_are_taken_from_the_search_file(search_models, write_search, tmp_path, monkeypatch):
    paths, val, _ = search_models
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val.jsonl").write_text(open(val).read())
    path = write_search(search_config(paths, "data/val.jsonl", storage="data/journal.log"))
    monkeypatch.chdir(tmp_path / "data")  # not the search file's folder
    result = search(path, str(tmp_path / "out"), SearchOptions(budget=600, device="cpu", progress=False, trials=2))
    assert result.trials == 2
    assert (tmp_path / "data" / "journal.log").exists()  # a storage the user named is left where it is
    assert torch.isfinite(torch.tensor(result.score))


def test_the_search_file_and_output_may_be_path_objects(search_models, write_search, fake_rates, tmp_path):
    """As merge() takes them: SEARCH.yml as a pathlib.Path was taken for a config mapping, OUT_DIR as one failed in a
    regular expression."""
    paths, val, _ = search_models
    path = pathlib.Path(write_search(search_config(paths, val)))
    result = search(path, tmp_path / "out", SearchOptions(budget=600, device="cpu", progress=False, trials=1))
    assert result.trials == 1 and result.out_dir == str(tmp_path / "out")
    assert (tmp_path / "out" / "mergekit_config.yml").is_file()


def test_inputs_inside_the_output_are_refused_and_kept_even_with_overwrite(search_models, monkeypatch, tmp_path):
    from merge_engine.errors import OutputError
    paths, val, _ = search_models
    out = tmp_path / "out"
    out.mkdir()
    (out / "val.jsonl").write_text(open(val).read())
    (out / "search.yml").write_text(yaml.safe_dump(search_config(paths, "val.jsonl")))
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
    with pytest.raises(OutputError, match=r"search\.yml is inside the output folder"):
        search(str(out / "search.yml"), str(out), SearchOptions(budget=100, device="cpu", progress=False,
                                                                overwrite=True))
    (out / "search.yml").write_text(yaml.safe_dump(search_config(paths, str(out / "val.jsonl"))))
    os.rename(out / "search.yml", tmp_path / "search.yml")  # only the data inside
    with pytest.raises(OutputError, match=r"val\.jsonl is inside the output folder"):
        search(str(tmp_path / "search.yml"), str(out), SearchOptions(budget=100, device="cpu", progress=False,
                                                                     overwrite=True))
    assert sorted(os.listdir(out)) == ["val.jsonl"]


def test_an_output_inside_a_model_folder_is_refused(search_models, monkeypatch, tmp_path):
    from merge_engine.errors import OutputError
    paths, val, _ = search_models
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
    with pytest.raises(OutputError, match="is inside the input folder"):
        search(search_config(paths, val), os.path.join(paths[1], "best"), SearchOptions(budget=100, device="cpu",
                                                                                        progress=False))
    assert not os.path.exists(os.path.join(paths[1], "best"))


@pytest.mark.parametrize("where, message", [("out/journal.log", "inside the output folder"),
                                            ("model/journal.log", "inside the input folder"),
                                            ("val", "is the search's input")])
def test_a_journal_inside_the_output_or_an_input_is_refused_up_front(where, message, search_models, monkeypatch,
                                                                     tmp_path):
    paths, val, _ = search_models
    storage = {"out/journal.log": str(tmp_path / "out" / "journal.log"),
               "model/journal.log": os.path.join(paths[1], "journal.log"), "val": val}[where]
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
    with pytest.raises(ConfigError, match=f"--storage: the journal .* {message}"):
        search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=100, device="cpu",
                                                                            progress=False, storage=storage))
    assert not (tmp_path / "out").exists() and not os.path.exists(os.path.join(paths[1], "journal.log"))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_a_journal_that_is_a_fifo_is_refused(search_models, tmp_path):
    paths, val, _ = search_models
    os.mkfifo(tmp_path / "journal.log")
    config = search_config(paths, val, storage=str(tmp_path / "journal.log"))
    with pytest.raises(ConfigError, match=r"search\.storage: the journal .*journal\.log is a FIFO"):
        search(config, str(tmp_path / "out"), SearchOptions(budget=100, device="cpu", progress=False))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_a_fifo_in_place_of_the_default_journal_is_refused_without_blocking(search_models, fake_rates, tmp_path):
    paths, val, _ = search_models
    clock = FakeClock()
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0))
    (tmp_path / ".out.search").mkdir()
    os.mkfifo(tmp_path / ".out.search" / "journal.log")
    with pytest.raises(ConfigError, match=r"the search's journal: the journal .*journal\.log is a FIFO"):
        search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=100, device="cpu",
                                                                            progress=False, clock=clock))


def test_a_journal_another_search_holds_is_refused(search_models, fake_rates, monkeypatch, tmp_path):
    import fcntl
    paths, val, _ = search_models
    clock = FakeClock()
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0))
    journal = tmp_path / "journal.log"
    journal.write_bytes(b"")
    with open(journal, "rb") as other:  # a search running on it
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
        with pytest.raises(ConfigError, match=r"--storage: another search is running with the journal"):
            search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(
                budget=100, device="cpu", progress=False, clock=clock, storage=str(journal)))
    assert journal.read_bytes() == b""
    monkeypatch.undo()
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0))  # released: this search runs
    result = search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(
        budget=100, device="cpu", progress=False, clock=clock, storage=str(journal), trials=2))
    assert result.trials == 2


def test_a_file_in_place_of_the_journal_folder_is_refused(search_models, fake_rates, tmp_path):
    paths, val, _ = search_models
    clock = FakeClock()
    fake_rates(clock, write_seconds=1.0, objective=TimedEvaluator(clock, 1.0))
    (tmp_path / ".out.search").write_text("mine")
    with pytest.raises(ConfigError, match=r"\.out\.search, where the journal goes, is in the way: not a folder"):
        search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=100, device="cpu",
                                                                            progress=False, clock=clock))
    assert (tmp_path / ".out.search").read_text() == "mine"


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -5.0, "5x"])
def test_a_budget_that_is_no_duration_is_refused_before_reading(budget, search_models, monkeypatch, tmp_path):
    paths, val, _ = search_models
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
    with pytest.raises(ConfigError, match="budget: "):
        search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=budget, device="cpu",
                                                                            progress=False))


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00binary\n", r"journal\.log:1: not a search journal"),
    (b'{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}\n{"op_code": 1, "wor\n',
     r"journal\.log:2: not a search journal, or a corrupt one"),
    (b'{"question": "q", "choices": ["a", "b"], "answer": 0}\n', r"journal\.log:1: not a search journal"),
    (b"my notes, no newline at the end", r"journal\.log:1: not a search journal"),  # not an entry cut short
    (b'{"op_code": 99, "worker_id": "w"}\n', r"journal\.log:1: not a search journal"),  # optuna would assert
])
def test_a_corrupt_or_foreign_journal_is_refused_and_left_alone(content, message, search_models, monkeypatch,
                                                                tmp_path):
    paths, val, _ = search_models
    journal = tmp_path / "journal.log"
    journal.write_bytes(content)
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
    with pytest.raises(ConfigError, match=message):
        search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=100, device="cpu",
                                                                            progress=False, storage=str(journal)))
    assert journal.read_bytes() == content


class Opened(Exception):
    """Raised where the search would open its session: what came before it (the checks) has run."""


@pytest.mark.parametrize("whole", [b"", b'{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}\n'])
def test_an_incomplete_last_journal_entry_is_removed_so_that_the_search_resumes(whole, search_models, monkeypatch,
                                                                                tmp_path, caplog):
    """A search stopped while writing an entry leaves it cut short; optuna would append after it."""
    paths, val, _ = search_models
    journal = tmp_path / "journal.log"
    journal.write_bytes(whole + b'{"op_code": 1, "wor')
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: (_ for _ in ()).throw(Opened()))
    with pytest.raises(Opened):
        search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=100, device="cpu",
                                                                            progress=False, storage=str(journal)))
    kept = journal.read_bytes()  # the whole lines, then what the resumed search wrote: every line whole JSON
    assert kept.startswith(whole) and all(json.loads(line) for line in kept.splitlines())
    assert "removing an incomplete last journal entry" in caplog.text


@pytest.mark.parametrize("seed", [2**32, -1, 99999999999999])
def test_a_seed_out_of_numpy_range_is_refused_before_anything_is_written(seed, search_models, tmp_path):
    paths, val, _ = search_models
    with pytest.raises(ConfigError, match=r"--seed: an integer from 0 to 2\*\*32 - 1"):
        search(search_config(paths, val), str(tmp_path / "out"), SearchOptions(budget=100, device="cpu",
                                                                            progress=False, seed=seed))
    assert os.listdir(tmp_path) == []  # no .out.search/ left behind


def test_an_empty_data_path_is_named_before_the_output_checks(search_models, write_search, tmp_path):
    """"" joined to SEARCH.yml's folder is that folder: the output beside it would be refused as inside an input."""
    paths, val, _ = search_models
    config = search_config(paths, val)
    config["search"]["objective"]["data"] = ""
    with pytest.raises(ConfigError, match=r"search\.objective\.data must be a file path, got ''"):
        search(write_search(config), str(tmp_path / "out"), SearchOptions(budget=100, device="cpu", progress=False))


@pytest.mark.parametrize("density, name", [
    # Mixtral's checkpoint name: the merge's tensors are transformers 5's (mlp.experts.gate_up_proj)
    ([{"filter": "block_sparse_moe", "value": {"search": [0.3, 0.9]}}, {"value": 0.6}], "block_sparse_moe"),
    # an earlier entry takes every tensor the space's filter matches (the first match wins)
    ([{"filter": "mlp", "value": 0.5}, {"filter": "mlp.up_proj", "value": {"search": [0.3, 0.9]}}, {"value": 0.6}],
     r"mlp\.up_proj"),
])
def test_a_space_whose_filter_takes_no_tensor_is_refused_before_reading(density, name, search_models, monkeypatch,
                                                                        tmp_path):
    paths, val, _ = search_models
    config = search_config(paths, val)
    config["models"][0]["parameters"]["density"] = density
    monkeypatch.setattr(run_module, "MergeSession", lambda *a, **k: pytest.fail("inputs read"))
    with pytest.raises(ConfigError, match=rf"models\[0\].density\[filter={name}\]: no tensor of the merge takes this "
                                          "setting"):
        search(config, str(tmp_path / "out"), SearchOptions(budget=100, device="cpu", progress=False))


FIRST_SEARCH = """
import gc, json, os, sys
assert "optuna" not in sys.modules  # this search imports it
from merge_engine.search import SearchOptions, search
from merge_engine.session import MergeSession
config, out = json.loads(sys.argv[1]), sys.argv[2]
descriptors = lambda: len(os.listdir("/proc/self/fd"))
before = descriptors()
search(config, out, SearchOptions(budget=1000, device="cpu", progress=False, trials=2))
gc.collect()
print(json.dumps([before, descriptors(), sum(isinstance(o, MergeSession) for o in gc.get_objects())]))
"""


def test_the_first_search_of_a_process_leaves_nothing_held_once_it_returns(search_models, tmp_path):
    """optuna keeps the traceback of its optional imports that fail (redis) for the life of the process, and with it
    every frame that was on the stack when it was first imported: the search's session (inputs, live model) and its
    open input files must not be among them."""
    paths, val, _ = search_models
    ran = subprocess.run([sys.executable, "-c", FIRST_SEARCH, json.dumps(search_config(paths, val)),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert ran.returncode == 0, ran.stderr
    before, after, sessions = json.loads(ran.stdout.splitlines()[-1])
    assert (after, sessions) == (before, 0)


FULL_JOURNAL = """
import resource, sys, optuna
from merge_engine.search.run import journal_storage
study = optuna.create_study(storage=journal_storage(optuna, sys.argv[1]))
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # writes past it fail as a full disk's do
try:
    for _ in range(100):
        study.enqueue_trial({"x": 1.0})
except OSError as e:
    print(e.filename)
"""


def test_a_full_disk_under_the_journal_names_it(tmp_path):
    # the search ended in "merge-engine: error: No space left on device", naming no file
    journal = tmp_path / "journal.log"
    run = subprocess.run([sys.executable, "-c", FULL_JOURNAL, str(journal)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout == f"{journal}\n", run.stderr


def test_an_evaluation_deadline_puts_back_the_callers_timer():
    # before, the caller's own timer (a signal.alarm() watchdog around a search) was cancelled for good
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 1000)
        with run_module.stopped_after(500):
            pass
        assert 900 < signal.getitimer(signal.ITIMER_REAL)[0] <= 1000
        signal.setitimer(signal.ITIMER_REAL, 0.01)  # due within the block: it runs once the block ends
        with run_module.stopped_after(500):
            time.sleep(0.05)
        for _ in range(500):  # (it is due: the wait ends at once but on a stalled machine)
            if fired:
                break
            time.sleep(0.01)
        assert fired == [signal.SIGALRM]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_searches_in_threads_at_once_find_the_main_threads_best_merge(search_models, tmp_path):
    """Outside the main thread an evaluation has no deadline (SIGALRM), and nothing else changes: two searches at once
    find what one in the main thread finds, and leave optuna's log level, signal handlers and threads as they were."""
    paths, val, _ = search_models
    optuna = pytest.importorskip("optuna")
    before = optuna.logging.get_verbosity(), signal.getsignal(signal.SIGALRM), set(threading.enumerate())

    def run(name: str):
        return search(search_config(paths, val), str(tmp_path / name),
                      SearchOptions(budget=600, device="cpu", progress=False, trials=3))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        found = list(pool.map(run, ["a", "b"])) + [run("main")]
    assert [(r.trials, r.params, r.score) for r in found] == [(3, found[2].params, found[2].score)] * 3
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "main" / "model.safetensors").read_bytes()
    assert (optuna.logging.get_verbosity(), signal.getsignal(signal.SIGALRM), set(threading.enumerate())) == before
