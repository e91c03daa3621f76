"""Faults end in one line and an exit status, never a traceback (unless -v), and leave nothing behind:
the version, bad devices, seeds and thread counts, a config that is not UTF-8, an output folder the disk refuses,
memory running out, Ctrl-C; and the summary is printed once."""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from merge_engine import cli
from merge_engine.demo import make_synthetic_llama
from tests.conftest import refuse_to_unlink


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    work = tmp_path_factory.mktemp("models")
    shape = dict(layers=2, hidden=32, intermediate=48, vocab=64)
    base = make_synthetic_llama(str(work / "base"), seed=0, **shape)
    expert = make_synthetic_llama(str(work / "expert"), seed=1, base=base, **shape)
    path = work / "linear.yml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": m, "parameters": {"weight": 1.0}} for m in (base, expert)]}))
    return str(path)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv", [["--version"], ["-V"], ["--version", "-q"], ["config.yml", "out", "-V"]])
def test_version(capsys, argv):
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse's version action, among other arguments
        status = e.code
    assert status == 0
    assert capsys.readouterr().out.startswith("merge-engine 0.")


@pytest.mark.parametrize("device", ["bogus", "mps", "cuda:x"])
def test_a_bad_device_is_one_line(config, tmp_path, capsys, device):
    assert cli.main([config, str(tmp_path / "out"), "--device", device]) == 2
    assert f"device '{device}': " in one_line(capsys)  # MergeOptions.device and --device alike
    assert not (tmp_path / "out").exists()


def test_a_seed_out_of_range_is_refused_by_the_parser(config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([config, str(tmp_path / "out"), "--random-seed", str(2**70)])
    assert exit.value.code == 2 and "64-bit seed range" in capsys.readouterr().err


@pytest.mark.parametrize("threads", ["-1", "0"])
def test_a_thread_count_below_one_is_refused_by_the_parser(config, tmp_path, capsys, threads):
    for flag, name in (("-j", "-j/--num-threads"), ("--prefetch", "--prefetch")):
        with pytest.raises(SystemExit) as exit:
            cli.main([config, str(tmp_path / "out"), flag, threads])
        assert exit.value.code == 2 and f"{name}: expected an integer >= 1" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_a_shard_size_under_a_byte_is_refused_by_the_parser(config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([config, str(tmp_path / "out"), "--out-shard-size", "0.1"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "argument --out-shard-size: expected 0 (no limit) or a size of at least 1 byte, got 0.1" in err
    assert not (tmp_path / "out").exists()


def test_a_shard_size_of_0_is_no_limit_as_in_mergekit(config, tmp_path):
    """mergekit-yaml --out-shard-size 0 writes every tensor into one shard (its writer starts a new shard only
    under a limit above 0); merge_engine refused 0."""
    assert cli.main([config, str(tmp_path / "out"), "--out-shard-size", "0", "-q"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "config.json", "mergekit_config.yml", "model.safetensors"]


def test_a_config_that_is_not_utf8_names_the_file(tmp_path, capsys):
    bad = tmp_path / "latin1.yml"
    bad.write_bytes("merge_method: linear  # caf\xe9\n".encode("latin-1"))
    assert cli.main([str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "latin1.yml" in err and "not UTF-8" in err and "Traceback" not in err


def test_a_read_only_parent_is_one_line(config, tmp_path, capsys, monkeypatch):
    # the filesystem's answer is simulated: root (CI) may write into folders without write permission
    from merge_engine.io import writer

    def read_only(path, *args, **kwargs):
        raise OSError(30, "Read-only file system", path)
    monkeypatch.setattr(writer.os, "mkdir", read_only)
    assert cli.main([config, str(tmp_path / "ro" / "out"), "-q"]) == 2
    assert f"Read-only file system: {tmp_path / 'ro'}" in one_line(capsys)


def in_own_mount_namespace(shell: str, *args) -> subprocess.CompletedProcess:
    """The shell command run as root of a user and mount namespace of its own (so it may mount, and its mounts
    end with it), with args as $1, $2...; the test is skipped where the system allows no such namespace."""
    unshare = ["unshare", "--user", "--map-root-user", "--mount"]
    if not shutil.which("unshare") or subprocess.run([*unshare, "true"], capture_output=True).returncode:
        pytest.skip("no user and mount namespace for this test (unshare -rm)")
    return subprocess.run([*unshare, "sh", "-c", shell, "sh", *map(str, args)], capture_output=True, text=True)


def test_an_output_folder_that_is_a_mount_point_is_refused_before_the_merge(config, tmp_path):
    """The finished output is renamed onto its folder, which the kernel refuses for a mount point: said up front,
    not after the whole merge. A bind mount of a folder of the same filesystem, which os.path.ismount misses."""
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    done = in_own_mount_namespace('mount --bind "$1" "$2" && exec "$3" -m merge_engine "$4" "$2" -q',
                                  disk, out, sys.executable, config)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"{out}: the output folder is a mount point" in done.stderr and str(out / "merged") in done.stderr
    assert sorted(os.listdir(tmp_path)) == ["disk", "out"] and os.listdir(disk) == []


def test_an_empty_output_path_is_named_as_such(config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(config))  # "" is the working folder, which holds the config
    assert cli.main([config, ""]) == 2
    assert "the output path is empty" in one_line(capsys)


@pytest.mark.parametrize("below", ["out", "a/b/out"])
def test_an_output_under_a_file_is_refused_before_the_merge(config, tmp_path, capsys, monkeypatch, below):
    from merge_engine import engine

    def planned(*args):
        raise AssertionError("planned (read the inputs' headers) before refusing the output path")
    monkeypatch.setattr(engine, "build_plan", planned)
    (tmp_path / "file").write_text("x")
    assert cli.main([config, str(tmp_path / "file" / below)]) == 2
    assert f"{tmp_path / 'file' / below}: {tmp_path / 'file'} is not a folder" in one_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_an_old_output_that_cannot_all_be_deleted_is_a_warning_not_a_failure(config, tmp_path, monkeypatch, caplog):
    """--overwrite: the new output is in place when the old one is deleted; a file of the old one that cannot be
    (read-only, busy) is left behind, named, and the merge succeeds."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "stuck.txt").write_text("an immutable file")
    refuse_to_unlink(monkeypatch, "stuck.txt")
    with caplog.at_level("WARNING", logger="merge_engine"):
        assert cli.main([config, str(out), "--overwrite", "-q"]) == 0
    left = [p for p in os.listdir(tmp_path) if p != "out"]
    assert len(left) == 1 and f"what is left is in {tmp_path / left[0]}" in caplog.text
    assert "model.safetensors" in os.listdir(out)


@pytest.mark.parametrize("full_from", ["headers", "data"])
def test_disk_full_is_one_line_and_leaves_nothing(config, tmp_path, capsys, monkeypatch, full_from):
    from merge_engine.io import writer
    real = os.pwrite

    def pwrite(fd, data, offset):
        if full_from == "headers" or offset > 0:  # headers go at offset 0, tensor data after them
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)
    monkeypatch.setattr(writer.os, "pwrite", pwrite)
    assert cli.main([config, str(tmp_path / "out"), "-q"]) == 2  # -q: no progress bar on stderr
    said = one_line(capsys)
    assert "No space left on device" in said and said.rstrip().endswith("model.safetensors")  # the file refused
    assert os.listdir(tmp_path) == []


TORCH_CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 800006144 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("where, said", [
    ("read", "tensor 'model.embed_tokens.weight': out of memory reading it (DefaultCPUAllocator: can't allocate"),
    ("compute", "merging tensor 'model.embed_tokens.weight' failed: out of memory (DefaultCPUAllocator: can't allocate"),
    ("plan", "error: out of memory (MemoryError)"),
])
def test_out_of_memory_is_one_line_naming_the_tensor_and_leaves_nothing(config, tmp_path, capsys, monkeypatch, where,
                                                                        said):
    """torch's CPU allocator raises a RuntimeError: it ended the merge in a traceback (from the search of the inputs
    for NaN too, which allocates again)."""
    import dataclasses

    from merge_engine import engine
    from merge_engine.io.buffers import BufferPool
    from merge_engine.methods import REGISTRY

    def fail(*args, **kwargs):
        raise MemoryError() if where == "plan" else RuntimeError(TORCH_CPU_OOM)
    if where == "read":
        monkeypatch.setattr(BufferPool, "take_bytes", fail)
    elif where == "compute":
        monkeypatch.setitem(REGISTRY, "linear", dataclasses.replace(REGISTRY["linear"], merge=fail))
        monkeypatch.setattr(engine, "non_finite_inputs", lambda *a: pytest.fail("searched the inputs"))
    else:
        monkeypatch.setattr(engine, "build_plan", fail)
    assert cli.main([config, str(tmp_path / "out"), "-q"]) == 2
    assert said in one_line(capsys)
    assert os.listdir(tmp_path) == []


def test_ctrl_c_exits_130_and_leaves_nothing(config, tmp_path, capsys, monkeypatch):
    from merge_engine.io import writer
    monkeypatch.setattr(writer.ShardedWriter, "write", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert cli.main([config, str(tmp_path / "out"), "-q"]) == 130
    assert "interrupted" in one_line(capsys)
    assert os.listdir(tmp_path) == []


def test_sigterm_cleans_up_as_ctrl_c_does_and_exits_143(config, tmp_path, capsys, monkeypatch):
    import signal

    from merge_engine.io import writer
    monkeypatch.setattr(writer.ShardedWriter, "write", lambda *a: os.kill(os.getpid(), signal.SIGTERM))
    handler = signal.getsignal(signal.SIGTERM)
    assert cli.main([config, str(tmp_path / "out"), "-q"]) == 143
    assert "terminated" in one_line(capsys)
    assert os.listdir(tmp_path) == [] and signal.getsignal(signal.SIGTERM) is handler  # restored after


@pytest.mark.parametrize(("signum", "status", "said"), [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_a_signal_while_the_command_is_imported_is_not_lost(config, tmp_path, capsys, monkeypatch, signum, status, said):
    # torch's import (its C extension's initialisation) can swallow the KeyboardInterrupt: the merge then ran to
    # the end, status 0 (or the import failed, with a traceback)
    import importlib
    import signal
    import_module = importlib.import_module

    def import_losing_an_interrupt(name):
        try:
            signal.raise_signal(getattr(signal, signum))
        except KeyboardInterrupt:
            pass
        return import_module(name)
    monkeypatch.setattr(importlib, "import_module", import_losing_an_interrupt)
    assert cli.main([config, str(tmp_path / "out"), "-q"]) == status
    assert said in one_line(capsys) and os.listdir(tmp_path) == []


def test_a_second_sigterm_does_not_interrupt_the_clean_up(config, tmp_path, capsys, monkeypatch):
    # a scheduler's second SIGTERM (or a write thread's, as in the test above) arriving while the temporary
    # folder is being removed: ignored, so the folder still goes
    import signal

    from merge_engine.io import writer
    abort = writer.ShardedWriter.abort

    def abort_under_a_second_sigterm(self):
        os.kill(os.getpid(), signal.SIGTERM)
        abort(self)
    monkeypatch.setattr(writer.ShardedWriter, "write", lambda *a: os.kill(os.getpid(), signal.SIGTERM))
    monkeypatch.setattr(writer.ShardedWriter, "abort", abort_under_a_second_sigterm)
    assert cli.main([config, str(tmp_path / "out"), "-q"]) == 143
    assert "terminated" in one_line(capsys) and os.listdir(tmp_path) == []


def test_a_second_ctrl_c_does_not_interrupt_the_clean_up(config, tmp_path, capsys, monkeypatch):
    # an impatient user's second Ctrl-C, while the first one's clean-up ran, left the temporary folder behind
    import signal

    from merge_engine.io import writer
    rmtree = shutil.rmtree

    def rmtree_under_a_second_ctrl_c(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        rmtree(path, *args, **kwargs)
    monkeypatch.setattr(writer.ShardedWriter, "write", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(writer.shutil, "rmtree", rmtree_under_a_second_ctrl_c)
    assert cli.main([config, str(tmp_path / "out"), "-q"]) == 130
    assert "interrupted" in one_line(capsys) and os.listdir(tmp_path) == []


def test_an_input_rewritten_during_the_merge_is_named_and_nothing_is_published(config, tmp_path, capsys, monkeypatch):
    # before, the merge mixed the file's two versions into an output it published, with exit status 0
    from merge_engine.io import writer
    shard = os.path.join(os.path.dirname(config), "expert", "model-00001.safetensors")
    saved = tmp_path / "saved.safetensors"
    shutil.copy2(shard, saved)
    write = writer.ShardedWriter.write

    def write_then_rewrite_the_input(self, name, tensor):
        write(self, name, tensor)
        with open(shard, "r+b") as f:  # the same bytes again, as a copy over it would: a later mtime
            data = f.read()
            f.seek(0)
            f.write(data)
        st = os.stat(shard)
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # whatever the clock's resolution
    monkeypatch.setattr(writer.ShardedWriter, "write", write_then_rewrite_the_input)
    try:
        assert cli.main([config, str(tmp_path / "out"), "-q"]) == 2
    finally:
        shutil.copy2(saved, shard)  # the module's models stay as they were
    assert f"{shard}: the file changed while it was being read" in one_line(capsys)
    assert os.listdir(tmp_path) == ["saved.safetensors"]


@pytest.mark.parametrize("flags", [["-v"], ["-vv"], ["-q", "-v"], ["-qv"], ["--verbose"]])
def test_verbose_failures_show_the_traceback(config, tmp_path, capsys, monkeypatch, flags):
    from merge_engine.io import writer
    monkeypatch.setattr(writer.ShardedWriter, "write", lambda *a: (_ for _ in ()).throw(OSError(28, "No space")))
    assert cli.main([config, str(tmp_path / "out"), *flags]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_the_summary_is_printed_once(config, tmp_path, capsys):
    assert cli.main([config, str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("merged ") == 1


def test_an_output_inside_an_input_folder_is_refused(config, capsys):
    inside = os.path.join(os.path.dirname(config), "base", "merged")
    before = sorted(os.listdir(os.path.dirname(inside)))
    assert cli.main([config, inside, "-q"]) == 2
    assert "is inside the input folder" in one_line(capsys)
    assert sorted(os.listdir(os.path.dirname(inside))) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_the_config_given_as_the_output_is_named_as_such(config, capsys, overwrite):
    # it was "the input C is inside the output folder C, which the output would replace": no folder, nothing inside
    # it, and a file is never replaced
    before = open(config).read()
    assert cli.main([config, config, "-q", *overwrite]) == 2
    assert f"the output path {config} is the input {config}, a file" in one_line(capsys)
    assert open(config).read() == before


def test_a_config_inside_the_output_folder_is_kept_even_with_overwrite(config, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    kept = out / "merge.yml"
    kept.write_text(open(config).read())
    assert cli.main([str(kept), str(out), "--overwrite", "-q"]) == 2
    assert f"the input {kept} is inside the output folder {out}" in one_line(capsys)
    assert os.listdir(out) == ["merge.yml"]


def test_a_folder_given_as_the_config_is_named_as_such_though_the_output_is_inside_it(tmp_path, capsys):
    """`merge-engine . merged`, the config forgotten: the config is the fault, not where the output goes."""
    assert cli.main([str(tmp_path), str(tmp_path / "merged"), "-q"]) == 2
    said = capsys.readouterr().err
    assert f"problem(s) in {tmp_path}:\n  - is a folder, not a regular file" in said and "Traceback" not in said
    assert os.listdir(tmp_path) == []


def test_nan_in_an_input_names_the_model_folder_and_tensor(tmp_path, capsys):
    from merge_engine.io.checkpoint import Checkpoint
    shape = dict(layers=1, hidden=16, intermediate=32, vocab=32)
    base = make_synthetic_llama(str(tmp_path / "base"), seed=0, **shape)
    expert = make_synthetic_llama(str(tmp_path / "expert"), seed=1, base=base, **shape)
    info = Checkpoint(expert).tensors["model.layers.0.mlp.up_proj.weight"]
    with open(info.file, "r+b") as f:  # bf16 NaN in the first two elements
        f.seek(info.data_start)
        f.write(b"\xc0\x7f\xc0\x7f")
    config = tmp_path / "ties.yml"
    config.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": base, "models": [
        {"model": expert, "parameters": {"weight": 1.0, "density": 0.5}}]}))
    assert cli.main([str(config), str(tmp_path / "out"), "-q"]) == 2
    err = one_line(capsys)
    assert f"{expert}: tensor 'model.layers.0.mlp.up_proj.weight' has 2 NaN or Inf value(s)" in err
    assert not (tmp_path / "out").exists()


def test_config_and_input_problems_are_reported_in_one_round(config, tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    models = yaml.safe_load(open(config))["models"]
    bad.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": models[0]["model"], "models": [
        {"model": models[1]["model"], "parameters": {"weight": 1.0, "density": "dense"}},
        {"model": str(tmp_path / "missing"), "parameters": {"weight": 1.0, "density": 0.5}}]}))
    assert cli.main([str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "density" in err and "missing: model path does not exist" in err and "2 problem(s)" in err



def test_the_folders_of_a_modules_config_are_reported_with_its_problems(config, tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    models = yaml.safe_load(open(config))["models"]
    bad.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": models[0]["model"], "modules": {
        "default": {"slices": [{"sources": [
            {"model": models[1]["model"], "layer_range": [0, 1], "parameters": {"weight": 1.0, "density": "dense"}},
            {"model": str(tmp_path / "missing"), "layer_range": [0, 1]}]}]}}}))
    assert cli.main([str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "density" in err and "missing: model path does not exist" in err

def test_a_malformed_config_json_is_reported_with_the_config_problems(config, tmp_path, capsys):
    base, expert = (m["model"] for m in yaml.safe_load(open(config))["models"])
    shutil.copytree(expert, tmp_path / "expert")
    (tmp_path / "expert" / "config.json").write_text("{bad")
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": base, "models": [
        {"model": str(tmp_path / "expert"), "parameters": {"weight": 1.0, "density": "dense"}}]}))
    assert cli.main([str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "density" in err and f"{tmp_path / 'expert' / 'config.json'}: invalid JSON" in err and "2 problem(s)" in err


def test_a_closed_standard_output_ends_the_command_quietly(monkeypatch, capfd):
    """`merge-engine patch extract ... --table | head`: the reader leaving is no error to report (status 141, as a
    shell reports a command SIGPIPE ended), where it printed 'error: [Errno 32] Broken pipe' with status 2."""
    import merge_engine.cli.key as key

    def writes_to_a_closed_pipe(argv):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(key, "run", writes_to_a_closed_pipe)
    saved = os.dup(1)
    try:
        assert cli.main(["key", "report"]) == 141
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert capfd.readouterr().err == ""


@pytest.fixture(scope="module")
def key_file(config, tmp_path_factory):
    base = yaml.safe_load(open(config))["models"][0]["model"]
    path = tmp_path_factory.mktemp("key") / "k.json"
    subprocess.run([sys.executable, "-m", "merge_engine", "key", "generate", base, str(path), "--passphrase-env",
                    "SECRET"], env={**os.environ, "SECRET": "s"}, check=True, capture_output=True)
    return base, str(path)


def run_into_closed_pipe(argv: list[str], buffered: bool = True, errors_too: bool = False) -> subprocess.CompletedProcess:
    """`merge-engine ARGV | head -1` (errors_too: `2>&1 | head -1`) where head has gone before the command prints:
    its standard output a pipe nobody reads. Buffered as a command's output into a pipe is (PYTHONUNBUFFERED
    unset): the failed write comes at the last flush."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    try:
        return subprocess.run([sys.executable, "-m", "merge_engine", *argv], stdout=write_end, text=True, env=env,
                              stderr=write_end if errors_too else subprocess.PIPE)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("command", ["--version", "--help", "key --help", "key report", "merge"])
def test_a_reader_gone_before_the_output_is_printed_ends_the_command_quietly(command, config, key_file, tmp_path):
    """`merge-engine key report ... | head -1`: status 141, as a shell reports a command SIGPIPE ended, and nothing
    on standard error, where the buffered output's flush at the interpreter's exit printed 'Exception ignored ...
    BrokenPipeError' (status 120; a merge, a traceback too) and a subcommand's unbuffered print 'error: [Errno 32]
    Broken pipe' (status 2)."""
    argv = {"key report": ["key", "report", *key_file], "merge": [config, str(tmp_path / "out")]}.get(
        command, command.split())
    for buffered in (True, False) if command == "key report" else (True,):
        run = run_into_closed_pipe(argv, buffered)
        # (standard error: a merge's progress bar, nothing else)
        assert run.returncode == 141 and "Error" not in run.stderr and "merge-engine:" not in run.stderr, run.stderr


def test_names_the_locale_cannot_encode_are_escaped_on_standard_output(key_file, tmp_path):
    """A non-UTF-8 locale (here PYTHONIOENCODING=ascii) and a model folder named in another script: `key report`
    printed its table's title with a UnicodeEncodeError traceback (status 1; a merge, after writing its output)."""
    base, key = key_file
    model = tmp_path / "mod\u00e8le"
    shutil.copytree(base, model)
    run = subprocess.run([sys.executable, "-m", "merge_engine", "key", "report", str(model), key], capture_output=True,
                         env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert (run.returncode, run.stderr) == (0, b""), run.stderr
    assert f"{tmp_path}/mod\\xe8le (llama)".encode() in run.stdout


def test_a_reader_of_both_outputs_gone_ends_the_command_with_the_pipes_status(config, tmp_path):
    """`merge-engine CONFIG OUT 2>&1 | head -1` with head gone: the config's first warning met the closed pipe, and
    standard error's unwritten line failed again at the interpreter's exit (status 120)."""
    warned = tmp_path / "warned.yml"
    warned.write_text(open(config).read() + "unknown_key: 1\n")
    assert run_into_closed_pipe([str(warned), str(tmp_path / "out")], errors_too=True).returncode == 141


def test_side_files_are_utf8_whatever_the_locale(config, tmp_path):
    """The output's text files (the merge config, the model card) were written in the locale's encoding: in an ASCII
    locale a config holding text in another script (a comment here; a chat template, a token) failed the merge with
    UnicodeEncodeError once every tensor was written."""
    commented = tmp_path / "c.yml"
    commented.write_bytes("# m\u00e9lange de deux mod\u00e8les\n".encode() + open(config, "rb").read())
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    run = subprocess.run([sys.executable, "-m", "merge_engine", str(commented), str(tmp_path / "out"), "-q"],
                         capture_output=True, env=env)
    assert (run.returncode, run.stderr) == (0, b""), run.stderr
    assert (tmp_path / "out" / "mergekit_config.yml").read_bytes() == commented.read_bytes()
    assert "m\u00e9lange" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")


def test_a_model_folder_whose_name_is_not_utf8_merges(config, tmp_path):
    """A folder name with bytes that are not UTF-8 (a str with surrogate escapes, as os.listdir gives it): the plan's
    fingerprint failed every merge with UnicodeEncodeError; the card shows the bytes escaped."""
    from merge_engine import MergeOptions, merge
    models = yaml.safe_load(open(config))["models"]
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/model-\xff")
    shutil.copytree(models[0]["model"], odd)
    merge({**yaml.safe_load(open(config)), "models": [{**models[0], "model": odd}, *models[1:]]},
          str(tmp_path / "out"), MergeOptions(quiet=True))
    assert "model-\\udcff" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
