"""The commands as users run them under torchrun (two gloo ranks on this machine): a keyed copy that is the
same bytes as one process's and a clean exit; a bad merge refused on every rank, leaving nothing."""
from __future__ import annotations

import os
import subprocess
import sys

from merge_engine.tiers import apply_key
from tests.distributed.test_key import keys_of
from tests.tiers.conftest import same_files

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "merge_engine"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, timeout=300)


def test_key_apply_under_torchrun(tier_model, tmp_path):
    model = tier_model("llama")
    key = keys_of(model)[0]
    key.save(str(tmp_path / "key.json"))
    run = torchrun("key", "apply", model, str(tmp_path / "key.json"), str(tmp_path / "keyed"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("parameters moved") == 1  # rank 0 alone prints the summary
    apply_key(model, [key], str(tmp_path / "single"))
    same_files(tmp_path / "single", tmp_path / "keyed")


def test_a_refused_merge_under_torchrun_leaves_nothing(model_sets, tmp_path, write_yaml):
    base, expert, *_ = model_sets("llama")
    config = write_yaml({"merge_method": "linear", "models": [{"model": base, "parameters": {"weight": 0.5}},
                                                              {"model": expert, "parameters": {"weight": 0.5}}]})
    out = os.path.join(base, "merged")  # inside an input folder: refused while planning, on every rank
    run = torchrun(config, out, "--device", "cpu")
    assert run.returncode != 0
    assert run.stderr.count(f"merge-engine: error: output folder {out} is inside the input folder") == 2
    assert not os.path.exists(out) and not [f for f in os.listdir(base) if "partial" in f]


def test_commands_without_a_distributed_form_are_refused_under_torchrun(model_sets, tmp_path):
    # patch and search would do the whole job on every rank (an in-place patch applied twice): refused first
    base, expert, *_ = model_sets("llama")
    for command in (["patch", "extract", base, expert, str(tmp_path / "patch")],
                    ["search", str(tmp_path / "search.yml"), str(tmp_path / "out"), "--budget", "60"],
                    ["moe", str(tmp_path / "moe.yml"), str(tmp_path / "out")],
                    ["pytorch", str(tmp_path / "flat.yml"), str(tmp_path / "out")],
                    ["extract-lora", "--model", expert, "--base-model", base, "--out-path", str(tmp_path / "out")],
                    ["tokensurgeon", base, expert, str(tmp_path / "out")],
                    ["legacy", str(tmp_path / "out"), "--merge", expert, "--base-model", base],
                    ["layershuffle", str(tmp_path / "out"), "-m", base, "-m", expert],
                    ["bakllama", str(tmp_path / "bak.yml"), str(tmp_path / "out")]):
        run = torchrun(*command)
        assert run.returncode != 0
        # each rank refuses; torchrun stops the other one as soon as the first exits, so on a loaded machine the
        # slower rank may be stopped before it says so (each rank's refusal is the same code path)
        refusals = run.stderr.count(f"merge-engine: error: merge-engine {command[0]} runs in one process, not under "
                                    "torchrun")
        assert refusals in (1, 2) and "/merge_engine/" not in run.stderr, run.stderr[-2000:]  # (no traceback of ours)
    assert sorted(os.listdir(tmp_path)) == []


def run_main(argv: list[str]) -> dict:
    """merge-engine ARGV in this process: its status and what it printed on stderr."""
    import contextlib
    import io

    from merge_engine.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(argv)
    return {"status": status, "stderr": err.getvalue()}


def linear_merge_on_two_ranks(command, model_sets, tmp_path, write_yaml):
    """command(rank, config, out) run on two ranks for a linear merge of two models: (each rank's result, out)."""
    from tests.distributed.ranks import run_ranks
    base, expert, *_ = model_sets("llama")
    config = write_yaml({"merge_method": "linear", "models": [{"model": base, "parameters": {"weight": 0.5}},
                                                              {"model": expert, "parameters": {"weight": 0.5}}]})
    out = tmp_path / "runs" / "out"
    out.parent.mkdir()
    results = run_ranks(command, 2, str(tmp_path / "results"), config, str(out))
    assert [r["error"] for r in results] == [None, None], [r.get("traceback") for r in results]
    return results, out


def merge_command(rank: int, config: str, out: str) -> dict:
    """The merge command on every rank, rank 1 given a config that does not exist; what each printed."""
    return run_main([config if rank == 0 else config + ".missing", out, "--device", "cpu", "-q"])


def test_a_config_one_rank_cannot_read_stops_every_rank_at_once(model_sets, tmp_path, write_yaml):
    # the config is read in a step: rank 0 hears of rank 1's refusal there, not by waiting in merge()'s first
    # collective until the group's timeout (torchrun would kill it after 30 s, its clean-up undone)
    results, out = linear_merge_on_two_ranks(merge_command, model_sets, tmp_path, write_yaml)
    assert [r["value"]["status"] for r in results] == [2, 2]
    assert "rank 1 (" in results[0]["value"]["stderr"] and "failed while reading the config" in \
        results[0]["value"]["stderr"], results[0]["value"]["stderr"]
    assert os.listdir(out.parent) == []


def test_the_torchrun_refusal_is_one_line_with_verbose():
    env = dict(os.environ, RANK="0", WORLD_SIZE="2")
    run = subprocess.run([sys.executable, "-m", "merge_engine", "patch", "-v", "--help"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 2
    assert run.stderr == "merge-engine: error: merge-engine patch runs in one process, not under torchrun\n"


def test_key_commands_without_a_distributed_form_are_refused_under_torchrun(tier_model, tmp_path, monkeypatch,
                                                                            capsys):
    # every rank would write the same key file (all but the first failing on it) or roll back the same folder
    from merge_engine.cli import main
    model = tier_model("llama")
    (tmp_path / "secret").write_bytes(b"a secret")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    capsys.readouterr()  # what making the model printed
    for command in (["generate", model, str(tmp_path / "key.json"), "--secret-file", str(tmp_path / "secret")],
                    ["recover", model]):
        assert main(["key", *command]) == 2
        assert capsys.readouterr().err == (f"merge-engine: error: key {command[0]} runs in one process, not under "
                                           "torchrun\n")
    assert sorted(os.listdir(tmp_path)) == ["secret"]


def merge_command_one_rank_terminated(rank: int, config: str, out: str) -> dict:
    """The merge command on every rank as torchrun starts it, rank 1 sent SIGTERM (alone) at its first write."""
    import signal

    from merge_engine.io import writer
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    if rank == 1:
        writer.ShardedWriter.write = lambda *a: os.kill(os.getpid(), signal.SIGTERM)
    return run_main([config, out, "--device", "cpu", "-q", "--out-shard-size", "100K"])


def test_the_rank_that_was_terminated_is_named_by_itself_and_the_others(model_sets, tmp_path, write_yaml):
    # the terminated rank said "terminated", the others "another rank failed" (torchrun then named rank 0, the
    # first to exit with an error, as the root cause)
    import socket

    results, out = linear_merge_on_two_ranks(merge_command_one_rank_terminated, model_sets, tmp_path, write_yaml)
    said = [r["value"] for r in results]
    assert said[1] == {"status": 143, "stderr": f"merge-engine: terminated (rank 1 on {socket.gethostname()})\n"}
    assert said[0]["status"] == 2 and f"rank 1 ({socket.gethostname()}) was terminated (SIGTERM)" in \
        said[0]["stderr"], said[0]["stderr"]
    assert os.listdir(out.parent) == []
