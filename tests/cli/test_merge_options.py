"""The merge command's performance options, as users run it (`python -m merge_engine`, a process of its own):
--direct-io, -v's account of where the time went, and what it writes to a log."""
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file

STEPS = ["process start", "imports", "config", "plan", "kernel load", "merge", "side files", "fsync", "rename"]


def ties(base, experts):
    return {"merge_method": "ties", "base_model": base, "dtype": "bfloat16",
            "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.5}} for e in experts]}


def run(*args):
    return subprocess.run([sys.executable, "-m", "merge_engine", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_verbose_prints_the_time_of_each_step_and_the_output_is_complete(model_sets, write_yaml, tmp_path):
    base, *experts = model_sets("llama_bf16_sharded")
    done = run(write_yaml(ties(base, experts)), tmp_path / "out", "-v")
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if x.startswith("time: "))
    steps, total = line.removeprefix("time: ").split("; total ")
    seconds = {name: float(value) for name, value, _ in (step.rsplit(" ", 2) for step in steps.split(", "))}
    assert list(seconds) == STEPS, line
    assert seconds["imports"] > 0 and seconds["merge"] > 0
    assert abs(sum(seconds.values()) - float(total.removesuffix(" s"))) <= 0.01 * len(STEPS), line
    # the command leaves without the interpreter's teardown: its summary and its files are complete
    assert len(re.findall(r"merged \d+ tensors", done.stdout + done.stderr)) == 1, done.stdout + done.stderr
    assert load_file(str(next((tmp_path / "out").glob("*.safetensors"))))


@pytest.mark.parametrize("mode", ["on", "off"])
def test_direct_io_modes_give_the_default_output(model_sets, write_yaml, tmp_path, mode):
    base, *experts = model_sets("llama_bf16_sharded")
    config = write_yaml(ties(base, experts))
    assert run(config, tmp_path / "auto").returncode == 0
    assert run(config, tmp_path / mode, "--direct-io", mode).returncode == 0
    files = sorted(p.name for p in (tmp_path / "auto").glob("*.safetensors"))
    assert files and all((tmp_path / "auto" / f).read_bytes() == (tmp_path / mode / f).read_bytes() for f in files)


def test_direct_io_refuses_other_values(tmp_path):
    done = run(tmp_path / "c.yml", tmp_path / "out", "--direct-io", "yes")
    assert done.returncode == 2 and "--direct-io" in done.stderr and "invalid choice" in done.stderr


@pytest.mark.parametrize("layout", ["fused", "checkpoint"])
def test_expert_layout_chooses_the_output_names_of_moe_experts(write_yaml, tmp_path, layout):
    from tests.io.test_experts import mixtral_tensors, write_model
    folders = [write_model(tmp_path / f"m{i}", mixtral_tensors(i)) for i in range(2)]
    config = write_yaml({"merge_method": "linear", "dtype": "float32",
                         "models": [{"model": f, "parameters": {"weight": 0.5}} for f in folders]})
    done = run(config, tmp_path / "out", "--expert-layout", layout, "-q")
    assert done.returncode == 0, done.stderr
    names = set(load_file(str(next((tmp_path / "out").glob("*.safetensors")))))
    fused = "model.layers.1.mlp.experts.gate_up_proj" in names
    assert fused == (layout == "fused")
    assert ("model.layers.1.block_sparse_moe.experts.3.w3.weight" in names) == (layout == "checkpoint")


@pytest.mark.parametrize("threads, accepted", [("1", True), ("4096", True), ("4097", False), ("100000", False)])
def test_a_thread_count_no_machine_has_is_refused(threads, accepted, capsys):
    """torch would start that many threads: past the system's limit, the merge ended in a traceback and a crash."""
    from merge_engine.cli.merge import build_parser
    if accepted:
        assert build_parser().parse_args(["c.yml", "out", "-j", threads]).num_threads == int(threads)
        return
    with pytest.raises(SystemExit):
        build_parser().parse_args(["c.yml", "out", "-j", threads])
    assert f"-j/--num-threads: expected at most 4096 threads, got {threads}" in capsys.readouterr().err


def test_a_merge_into_a_log_writes_its_progress_as_lines_and_its_summary_on_standard_output(model_sets, write_yaml,
                                                                                            tmp_path):
    """Standard error a pipe (CI, nohup, a job scheduler's file): the progress bar's start and end as two lines,
    where tqdm's redraws, carriage-return-separated, made one line growing through the merge."""
    base, *experts = model_sets("llama_bf16_sharded")
    done = run(write_yaml(ties(base, experts)), tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and [line[:13] for line in done.stderr.splitlines()] == [
        "merging:   0%", "merging: 100%"], done.stderr
    assert re.fullmatch(r"merged \d+ tensors: .*\n", done.stdout), done.stdout
