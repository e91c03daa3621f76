"""merge_engine as a library in a caller's threads and processes: merges and ops called from several threads at once
give the bits one call alone gives, a merge in a spawned child gives the parent's, and a merge leaves the process
as it found it (signal handlers, torch's settings, warnings, logging, environment, umask, folder, threads, open
files)."""
from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import multiprocessing
import os
import signal
import threading
import warnings

import pytest
import torch

from merge_engine import MergeOptions, merge, ops
from merge_engine.demo import make_synthetic_llama
from tests.lora_adapters import write_adapter

SHAPE = dict(layers=2, hidden=64, intermediate=128, vocab=256, heads=4, kv_heads=4)


@pytest.fixture(scope="module")
def dare_config(tmp_path_factory):
    """A DARE-TIES config (random drops: the seeded generator's draws must not depend on the thread) on tiny models."""
    root = tmp_path_factory.mktemp("concurrency")
    base = make_synthetic_llama(str(root / "base"), **SHAPE)
    experts = [make_synthetic_llama(str(root / f"ft{i}"), **SHAPE, base=base, seed=i) for i in (1, 2)]
    return {"merge_method": "dare_ties", "base_model": base, "dtype": "bfloat16",
            "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.3}} for e in experts]}


def merged_digest(config: dict, out_dir) -> str:
    merge(config, str(out_dir), MergeOptions(device="cpu", quiet=True, overwrite=True))
    digest = hashlib.sha256()
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".safetensors"):
            digest.update(name.encode() + open(os.path.join(out_dir, name), "rb").read())
    return digest.hexdigest()


def process_state() -> dict:
    umask = os.umask(0o022)
    os.umask(umask)
    return {"signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGPIPE)},
            "torch": (torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()),
            "warnings": list(warnings.filters), "environment": dict(os.environ), "umask": umask, "cwd": os.getcwd(),
            "logging": [(name, list(log.handlers), log.level, log.propagate) for name, log in
                        [("", logging.getLogger()), ("merge_engine", logging.getLogger("merge_engine"))]],
            "threads": set(threading.enumerate()), "open files": sorted(os.listdir("/proc/self/fd"))}


def test_merges_in_threads_at_once_give_a_merge_alone_and_leave_the_process_as_it_was(dare_config, tmp_path):
    alone = merged_digest(dare_config, tmp_path / "alone")
    before = process_state()
    outputs = [tmp_path / "a", tmp_path / "b", tmp_path / "a"]  # two outputs, one of them written twice at once
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        digests = list(pool.map(lambda out: merged_digest(dare_config, out), outputs))
    assert digests == [alone] * 3
    assert process_state() == before
    assert sorted(os.listdir(tmp_path)) == ["a", "alone", "b"]  # no partial folder left


def test_a_merge_in_a_spawned_child_gives_the_parents(dare_config, tmp_path):
    parent = merged_digest(dare_config, tmp_path / "parent")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(merged_digest, dare_config, tmp_path / "child").result(timeout=120) == parent


def op_calls():
    """Ops on the compiled CPU kernels (bf16) and on the PyTorch references (fp64, which no kernel serves)."""
    g = torch.Generator().manual_seed(0)
    calls = []
    for dtype in (torch.bfloat16, torch.float64):
        base, *experts = (torch.randn(200, 129, generator=g).to(dtype) for _ in range(4))
        calls += [lambda b=base, e=experts: ops.merge_task_vectors(b, e, [0.3, 0.5, 0.2], [0.4, 0.5, 0.6], "magnitude",
                                                                   True, True),
                  lambda b=base, e=experts: ops.merge_task_vectors(b, e, [0.3, 0.5, 0.2], [0.4, 0.5, 0.6], "random",
                                                                   True, rescale=True, seed=3, tensor_name="t"),
                  lambda b=base, e=experts: ops.merge_task_vectors(b, e, [0.3, 0.5, 0.2], [0.4, 0.5, 0.6], "rank",
                                                                   rescale=True, epsilons=[0.1] * 3, seed=3),
                  lambda e=experts: ops.fisher_merge(e, [x.abs() for x in e], [1.0, 2.0, 3.0], [0.0] * 3),
                  lambda b=base, e=experts: ops.slerp(0.3, b, e[0]),
                  lambda e=experts: ops.magnitude_cutoff(e[0], 1000)]
    return calls


def test_ops_called_from_threads_at_once_give_the_serial_results():
    calls = op_calls()
    serial = [call() for call in calls]
    start = threading.Barrier(4)

    def all_calls(reverse: bool):
        start.wait()
        order = range(len(calls) - 1, -1, -1) if reverse else range(len(calls))
        return {i: calls[i]() for i in order}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(all_calls, [False, True, False, True]))
    for got in results:
        assert all(torch.equal(got[i], want) for i, want in enumerate(serial))


def folder_digest_of_merge(config: dict, out_dir) -> str:
    """Every file of the merge's output (tokenizer and side files too)."""
    merge(config, str(out_dir), MergeOptions(device="cpu", quiet=True))
    digest = hashlib.sha256()
    for name in sorted(os.listdir(out_dir)):
        digest.update(name.encode() + open(os.path.join(out_dir, name), "rb").read())
    return digest.hexdigest()


def test_merges_with_tokenizers_and_adapters_in_threads_at_once_give_a_merge_alone(vocab_models, model_sets, tmp_path):
    """A union vocabulary with a chat template (transformers' tokenizers, loaded and saved in each thread) and
    BASE+ADAPTER inputs (each read thread's scratch buffers) beside each other."""
    union = {"merge_method": "linear", "tokenizer": {"source": "union"}, "chat_template": "chatml",
             "models": [{"model": vocab_models[n], "parameters": {"weight": 1.0}} for n in ("base", "extra", "other")]}
    base = model_sets("llama")[0]
    for seed in (1, 2):
        write_adapter(str(tmp_path / f"adapter{seed}"), base, seed=seed)
    adapters = {"merge_method": "ties", "base_model": base, "dtype": "bfloat16",
                "models": [{"model": f"{base}+{tmp_path / f'adapter{seed}'}", "parameters": {"weight": 0.5, "density": 0.5}}
                           for seed in (1, 2)]}
    alone = [folder_digest_of_merge(union, tmp_path / "union"), folder_digest_of_merge(adapters, tmp_path / "adapters")]
    runs = [(union, "u1"), (adapters, "a1"), (union, "u2"), (adapters, "a2")]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda run: folder_digest_of_merge(run[0], tmp_path / run[1]), runs))
    assert got == alone * 2
