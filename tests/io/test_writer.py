"""Sharded output: layout, index, atomic move into place, refusal to overwrite, and the removal of
the partial folders that killed runs leave."""
import errno
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from merge_engine.errors import OutputError
from merge_engine.io.writer import ShardedWriter, check_output_dir, plan_shards
from tests.conftest import refuse_to_unlink


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(10, 10, generator=g), "b": torch.randn(3, generator=g).bfloat16(),
            "c": torch.randn(50, generator=g), "d": torch.randn(1, generator=g).half()}


def entries(ts):
    return [(n, t.dtype, tuple(t.shape)) for n, t in ts.items()]


def test_plan_shards_respects_size_and_order():
    e = [("a", torch.float32, (10,)), ("b", torch.float32, (10,)), ("c", torch.float32, (30,)), ("d", torch.float32, (1,))]
    assert plan_shards(e, 80) == [[0, 1], [2], [3]]  # c (120 B) is larger than a shard: alone
    assert plan_shards(e, 10**9) == [[0, 1, 2, 3]]
    assert plan_shards(e, 0) == [[0, 1, 2, 3]]  # 0: no limit, as mergekit's --out-shard-size 0


@pytest.mark.parametrize("shard_size", [10**9, 250])
def test_written_shards_and_index(tmp_path, shard_size):
    ts = tensors()
    out = tmp_path / "out"
    w = ShardedWriter(str(out), entries(ts), shard_size)
    for name in reversed(list(ts)):  # any write order
        w.write(name, ts[name])
    assert not out.exists()  # nothing visible before commit
    w.commit()
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    loaded = {}
    for f in files:
        loaded.update(load_file(str(out / f)))
    assert set(loaded) == set(ts) and all(torch.equal(loaded[n], ts[n]) for n in ts)
    if shard_size == 10**9:
        assert files == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(files) > 1
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
        assert set(index["weight_map"]) == set(ts)
        for name, f in index["weight_map"].items():
            assert name in load_file(str(out / f))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folder left


def test_commit_refuses_incomplete_output_and_abort_leaves_nothing(tmp_path):
    ts = tensors()
    w = ShardedWriter(str(tmp_path / "out"), entries(ts), 10**9)
    w.write("a", ts["a"])
    with pytest.raises(RuntimeError, match="never written"):
        w.commit()
    w.abort()
    assert os.listdir(tmp_path) == []


def test_wrong_shape_or_dtype_is_rejected(tmp_path):
    ts = tensors()
    w = ShardedWriter(str(tmp_path / "out"), entries(ts), 10**9)
    with pytest.raises(ValueError, match="'a'"):
        w.write("a", ts["a"].double())
    w.abort()


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    ts = tensors()
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match=r"not empty; pass --overwrite \(overwrite=True\) to replace it"):
        ShardedWriter(str(out), entries(ts), 10**9)
    assert (out / "precious.txt").read_text() == "keep me"
    w = ShardedWriter(str(out), entries(ts), 10**9, overwrite=True)
    for n, t in ts.items():
        w.write(n, t)
    w.commit()
    assert sorted(os.listdir(out)) == ["model.safetensors"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_replaced_output_folder_keeps_its_permissions(tmp_path, overwrite):
    """An existing output folder (empty, or any with overwrite) is replaced by the written one, with its mode."""
    ts, out = tensors(), tmp_path / "out"
    out.mkdir()
    if overwrite:
        (out / "old.txt").write_text("replaced")
    out.chmod(0o2750)  # a group's folder: read by the group, new files in the group (setgid)
    w = ShardedWriter(str(out), entries(ts), 10**9, overwrite=overwrite)
    for n, t in ts.items():
        w.write(n, t)
    w.commit()
    assert os.listdir(out) == ["model.safetensors"] and oct(stat.S_IMODE(out.stat().st_mode)) == oct(0o2750)


def test_an_old_output_that_cannot_all_be_deleted_is_left_with_a_warning(tmp_path, monkeypatch, caplog):
    """With overwrite, the old output is deleted once the new one is in place: a file that cannot be (read-only,
    busy) is left, named, and the run has not failed."""
    ts, out = tensors(), tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "stuck.txt").write_text("an immutable file")
    (out / "old.txt").write_text("deleted")
    refuse_to_unlink(monkeypatch, "stuck.txt")
    w = ShardedWriter(str(out), entries(ts), 10**9, overwrite=True)
    for n, t in ts.items():
        w.write(n, t)
    with caplog.at_level("WARNING", logger="merge_engine"):
        w.commit()
    assert os.listdir(out) == ["model.safetensors"]
    left = [p for p in os.listdir(tmp_path) if p != "out"]
    assert len(left) == 1 and os.listdir(tmp_path / left[0]) == ["sub"]  # all that could go went
    assert f"what is left is in {tmp_path / left[0]}" in caplog.text and "Operation not permitted" in caplog.text


def _old_output_and_writer(tmp_path):
    ts, out = tensors(), tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous output")
    w = ShardedWriter(str(out), entries(ts), 10**9, overwrite=True)
    for n, t in ts.items():
        w.write(n, t)
    return out, w


def _after_the_first_rename(monkeypatch, then):
    """os.rename calls then() once it has moved the old output aside: between the two renames of the move."""
    rename = os.rename

    def first_then(src, dst):
        rename(src, dst)
        monkeypatch.setattr(os, "rename", rename)
        then()
    monkeypatch.setattr(os, "rename", first_then)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_between_the_renames_takes_effect_once_the_new_output_is_in_place(tmp_path, monkeypatch, signum):
    # before, Ctrl-C there left no output folder: the old one hidden beside it, the new one deleted by the abort
    out, w = _old_output_and_writer(tmp_path)
    interrupted = type("Interrupted", (Exception,), {})

    def interrupt(*_):
        raise interrupted()
    previous = signal.signal(signum, interrupt)
    try:
        _after_the_first_rename(monkeypatch, lambda: os.kill(os.getpid(), signum))
        with pytest.raises(interrupted):
            w.commit()
        assert signal.getsignal(signum) is interrupt
    finally:
        signal.signal(signum, previous)
    w.abort()  # as the caller's clean-up does
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["model.safetensors"]


def test_the_old_output_is_moved_back_where_the_new_one_cannot_take_its_place(tmp_path, monkeypatch):
    out, w = _old_output_and_writer(tmp_path)
    rename = os.rename

    def refuse_once(*_):
        monkeypatch.setattr(os, "rename", rename)
        raise OSError(errno.EIO, "Input/output error")
    _after_the_first_rename(monkeypatch, lambda: monkeypatch.setattr(os, "rename", refuse_once))
    with pytest.raises(OSError, match="Input/output error"):
        w.commit()
    w.abort()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["old.txt"]


def test_an_output_path_that_is_a_symlink_writes_the_folder_it_points_to(tmp_path):
    ts = tensors()
    target, link = tmp_path / "disk" / "out", tmp_path / "out"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("replaced with --overwrite")
    link.symlink_to(target)
    with pytest.raises(OutputError, match="not empty"):
        ShardedWriter(str(link), entries(ts), 10**9)
    w = ShardedWriter(str(link), entries(ts), 10**9, overwrite=True)
    for n, t in ts.items():
        w.write(n, t)
    w.commit()
    assert link.is_symlink() and os.listdir(target) == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["disk", "out"] and os.listdir(tmp_path / "disk") == ["out"]
    dangling = tmp_path / "later"
    dangling.symlink_to(tmp_path / "disk" / "new")
    w = ShardedWriter(str(dangling), entries(ts), 10**9)
    for n, t in ts.items():
        w.write(n, t)
    w.commit()
    assert os.listdir(tmp_path / "disk" / "new") == ["model.safetensors"]


@pytest.mark.parametrize("suffix", ["/", "//", "/.", "/./"])
def test_a_symlinked_output_path_ending_in_a_slash_writes_where_the_link_points(tmp_path, suffix):
    """"link/" names the folder the link points to, as "link" does: the link is kept, not replaced by the output."""
    ts = tensors()
    target, link = tmp_path / "disk" / "out", tmp_path / "out"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("replaced with --overwrite")
    link.symlink_to(target)
    dangling = tmp_path / "later"
    dangling.symlink_to(tmp_path / "disk" / "new")
    for path, overwrite in ((link, True), (dangling, False)):
        w = ShardedWriter(str(path) + suffix, entries(ts), 10**9, overwrite=overwrite)
        for n, t in ts.items():
            w.write(n, t)
        w.commit()
        assert path.is_symlink()
    assert os.listdir(target) == os.listdir(tmp_path / "disk" / "new") == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["disk", "later", "out"]
    assert sorted(os.listdir(tmp_path / "disk")) == ["new", "out"]


def test_abort_removes_the_folders_it_made_above_the_output(tmp_path):
    (tmp_path / "kept").mkdir()
    w = ShardedWriter(str(tmp_path / "kept" / "new1" / "new2" / "out"), entries(tensors()), 10**9)
    assert os.path.isdir(tmp_path / "kept" / "new1" / "new2")
    w.abort()
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []


KILLED_WRITER = """
import os, signal, sys, torch
from merge_engine.io.writer import ShardedWriter
w = ShardedWriter(sys.argv[1], [("a", torch.float32, (1000,))], 10**9)
w.write("a", torch.ones(1000))
os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would: no cleanup runs
"""


def partials(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-"))


def dead_pid():
    pid = 4_000_000  # no process has it: walk down from just below the largest pid_max
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_a_killed_writers_partial_folder_is_removed_by_the_next_run(tmp_path, caplog):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True, text=True)
    assert res.returncode == -9, res.stderr
    left = partials(out)
    assert len(left) == 1 and (out.parent / left[0] / "model.safetensors").exists()
    ts = tensors()
    with caplog.at_level("WARNING", logger="merge_engine"):
        w = ShardedWriter(str(out), entries(ts), 10**9)
    assert left[0] not in partials(out) and "was killed" in caplog.text
    for n, t in ts.items():
        w.write(n, t)
    w.commit()
    assert partials(out) == [] and sorted(os.listdir(out)) == ["model.safetensors"]  # no lock file


@pytest.mark.parametrize("name", ["y" * 229, "y" * 255, "\u00e9" * 127])
def test_an_output_name_of_up_to_255_bytes_is_written_and_replaced(tmp_path, caplog, name):
    """The partial folder beside it, and the old output moved aside with --overwrite, have longer names: kept within
    the 255-byte limit on a name, and a killed run's still found by the next run."""
    out = tmp_path / name
    assert subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)]).returncode == -9
    ts = tensors()
    for overwrite in (False, True):
        w = ShardedWriter(str(out), entries(ts), 10**9, overwrite=overwrite)
        for n, t in ts.items():
            w.write(n, t)
        w.commit()
        assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert os.listdir(tmp_path) == [name] and "was killed" in caplog.text


def test_a_partial_folder_whose_writer_holds_its_lock_is_kept(tmp_path):
    out = tmp_path / "out"
    other = tmp_path / f".out.partial-{dead_pid()}"  # as from a writer on another host sharing the disk
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"in progress")
    fd = os.open(other / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    ts = tensors()
    try:
        ShardedWriter(str(out), entries(ts), 10**9).abort()
        assert other.exists()
    finally:
        os.close(fd)  # the writer ends: its folder is stale from now on
    ShardedWriter(str(out), entries(ts), 10**9).abort()
    assert not other.exists() and partials(out) == []


def test_a_partial_folder_whose_joined_writer_holds_its_lock_is_kept(tmp_path):
    """A distributed merge's folder: its maker's lock is free (rank 0 died) but a rank that joined it
    still writes; stale once every lock is free."""
    out = tmp_path / "out"
    other = tmp_path / f".out.partial-{dead_pid()}"
    other.mkdir()
    os.close(os.open(other / ".lock", os.O_RDWR | os.O_CREAT))
    fd = os.open(other / ".lock-otherhost-123", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        ShardedWriter(str(out), entries(tensors()), 10**9).abort()
        assert other.exists()
    finally:
        os.close(fd)
    ShardedWriter(str(out), entries(tensors()), 10**9).abort()
    assert not other.exists()


def test_writers_sharing_a_folder_write_one_output(tmp_path):
    """The ranks of a distributed merge: each writes its own shards into the maker's folder; only the
    maker writes the index and commits; the joiners' lock files are not in the output."""
    ts = tensors()
    out = tmp_path / "out"
    maker = ShardedWriter(str(out), entries(ts), 200, own_shards=[0, 2])  # a, c
    joiner = ShardedWriter(str(out), entries(ts), 200, own_shards=[1, 3], join=maker.tmp_dir)  # b, d
    assert len(maker.shard_files) == 4
    for name, t in ts.items():
        (joiner if name in ("b", "d") else maker).write(name, t)
    with pytest.raises(KeyError):  # a tensor of another writer's shard
        joiner.write("a", ts["a"])
    joiner.flush()
    assert not (out.parent / os.path.basename(maker.tmp_dir) / "model.safetensors.index.json").exists()
    maker.commit()
    joiner.release()
    assert sorted(os.listdir(out)) == sorted([*maker.shard_files, "model.safetensors.index.json"])
    got = {}
    for f in maker.shard_files:
        got.update(load_file(out / f))
    assert got.keys() == ts.keys() and all(torch.equal(got[n], ts[n]) for n in ts)
    assert partials(out) == []


def test_a_partial_folder_without_a_lock_is_left_alone(tmp_path, caplog):
    out = tmp_path / "out"
    # not made by this writer (or the previous output, renamed while a run was killed mid-move)
    kept = tmp_path / f".out.partial-{dead_pid()}.old"
    kept.mkdir()
    (kept / "model.safetensors").write_bytes(b"the user's previous output")
    with caplog.at_level("WARNING", logger="merge_engine"):
        ShardedWriter(str(out), entries(tensors()), 10**9).abort()
    assert kept.exists() and f"{kept} is the folder a killed or failed run moved aside to replace {out}" in caplog.text


def test_an_output_replaced_while_another_thread_starts_a_writer_is_not_named_as_a_killed_runs(tmp_path, caplog,
                                                                                                 monkeypatch):
    # before, the other thread's writer took the replaced output, moved aside for a moment, for one a killed run left,
    # and warned the user to move it back (two threads merging into one output with overwrite=True)
    out = tmp_path / "out"
    write_whole(ShardedWriter(str(out), entries(tensors()), 10**9))
    others = []
    remove_replaced = ShardedWriter._remove_replaced

    def another_thread_starts_a_writer(self, old):
        others.append(threading_writer(out))
        remove_replaced(self, old)
    monkeypatch.setattr(ShardedWriter, "_remove_replaced", another_thread_starts_a_writer)
    with caplog.at_level("WARNING", logger="merge_engine"):
        write_whole(ShardedWriter(str(out), entries(tensors()), 10**9, overwrite=True))
    assert len(others) == 1 and "moved aside" not in caplog.text and "killed" not in caplog.text
    others[0].abort()
    assert partials(out) == [] and sorted(load_file(out / "model.safetensors")) == sorted(tensors())


def write_whole(writer: ShardedWriter) -> None:
    for name, t in tensors().items():
        writer.write(name, t)
    writer.commit()


def threading_writer(out) -> ShardedWriter:
    """A writer of out made in another thread (which removes the partial folders of killed runs beside out)."""
    made = []
    thread = threading.Thread(target=lambda: made.append(ShardedWriter(str(out), entries(tensors()), 10**9,
                                                                      overwrite=True)))
    thread.start()
    thread.join()
    return made[0]


KILLED_BETWEEN_THE_RENAMES = """
import os, signal, sys, torch
from merge_engine.io.writer import ShardedWriter
w = ShardedWriter(sys.argv[1], [("a", torch.float32, (1000,))], 10**9, overwrite=True)
w.write("a", torch.ones(1000))
rename = os.rename
def rename_then_die(src, dst):
    rename(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename_then_die
w.commit()
"""


def test_the_folders_of_a_run_killed_between_the_renames_are_kept_and_named_by_the_next_run(tmp_path, caplog):
    # before, they stayed hidden beside the output without a word: the user's previous output among them
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous output")
    res = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_THE_RENAMES, str(out)], capture_output=True, text=True)
    assert res.returncode == -9, res.stderr
    new, old = (tmp_path / p for p in partials(out))
    assert not out.exists() and os.listdir(old) == ["old.txt"] and os.listdir(new) == ["model.safetensors"]
    with caplog.at_level("WARNING", logger="merge_engine"):
        ShardedWriter(str(out), entries(tensors()), 10**9).abort()
    assert f"{old} is the folder a killed or failed run moved aside to replace {out}" in caplog.text
    assert f"{new} is the complete output of a run killed while moving it into place as {out}" in caplog.text
    assert os.listdir(old) == ["old.txt"] and os.listdir(new) == ["model.safetensors"]


def _direct_write_cases():
    """Tensors whose bytes start and end at every kind of offset: tiny, under the direct-write minimum,
    over the staging buffer, with header lengths that shift every offset."""
    g = torch.Generator().manual_seed(3)
    sizes = [3, 1 << 20, (1 << 20) + 1, 4097, (17 << 20) + 5, 7, 2 << 20]
    return {f"t{i}.{'x' * i}": torch.randn(n, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
            for i, n in enumerate(sizes)}


def _write_all(folder, tensors, direct):
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    w = ShardedWriter(str(folder), entries, shard_size=30 << 20, direct=direct)
    for n, t in tensors.items():
        w.write(n, t)
    w.commit()


def test_direct_writes_give_the_same_files_as_plain_writes(tmp_path, monkeypatch):
    tensors = _direct_write_cases()
    _write_all(tmp_path / "plain", tensors, direct=False)
    written = []
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        written.append((bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT), offset, len(data)))
        return real_pwrite(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    _write_all(tmp_path / "direct", tensors, direct=True)
    monkeypatch.undo()
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "direct").iterdir()) and len(files) > 2
    for f in files:
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "direct" / f).read_bytes(), f
    direct = [(off, n) for is_direct, off, n in written if is_direct]
    if not direct:
        pytest.skip("this filesystem refuses O_DIRECT (tmpfs?): the writer wrote plainly, as it should")
    assert all(off % 4096 == 0 and n % 4096 == 0 for off, n in direct)
    big = sum(t.nbytes for t in tensors.values() if t.nbytes >= 1 << 20)
    assert big - 8192 * len(tensors) < sum(n for _, n in direct) <= big
    assert max(n for _, n in direct) == 16 << 20  # the 68 MB tensor went through the staging buffer in parts


def test_direct_writes_refused_at_the_first_write_fall_back(tmp_path, monkeypatch):
    tensors = _direct_write_cases()
    real_pwrite = os.pwrite

    def refuse_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_pwrite(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", refuse_direct)
    _write_all(tmp_path / "refused", tensors, direct=True)
    monkeypatch.undo()
    _write_all(tmp_path / "plain", tensors, direct=False)
    for f in os.listdir(tmp_path / "plain"):
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "refused" / f).read_bytes(), f


def test_two_writers_of_one_output_in_one_process_keep_apart(tmp_path):
    """merge() called twice at once on one output (two threads): each writes its own temporary folder; the
    first to commit places its output, the second is refused, or with overwrite replaces it whole."""
    out, ts = tmp_path / "out", tensors()
    for overwrite in (False, True):
        writers = [ShardedWriter(str(out), entries(ts), 10**9, overwrite) for _ in range(2)]
        assert writers[0].tmp_dir != writers[1].tmp_dir and len(partials(out)) == 2
        for i, w in enumerate(writers):
            for n, t in ts.items():
                w.write(n, t + (i + 2 * overwrite))
        writers[0].commit()
        if overwrite:
            writers[1].commit()
        else:
            with pytest.raises(OutputError, match="output folder exists and is not empty"):
                writers[1].commit()
            writers[1].abort()
        assert partials(out) == []
        last = 3 if overwrite else 0  # the second writer's, or the first's
        assert torch.equal(load_file(str(out / "model.safetensors"))["c"], ts["c"] + last)


def test_an_output_path_that_is_a_looping_symlink_is_refused_at_once(tmp_path):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(OutputError, match="loop: the output path is a symbolic link that loops"):
        ShardedWriter(str(loop), entries(tensors()), 10**9)
    assert os.listdir(tmp_path) == ["loop"]


def test_a_full_disk_is_named_by_the_file_it_stopped(tmp_path, monkeypatch):
    import errno

    from merge_engine.io import writer
    ts = tensors()
    w = ShardedWriter(str(tmp_path / "out"), entries(ts), 10**9)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer.os, "pwrite", full)
    with pytest.raises(OSError) as error:
        w.write("a", ts["a"])
    assert error.value.errno == errno.ENOSPC and error.value.filename.endswith("model.safetensors")
    assert os.path.dirname(error.value.filename) == w.tmp_dir
    w.abort()


def test_a_mount_point_is_refused_as_the_output_folder():
    """The output is written beside its folder, then renamed onto it: a mount point cannot be (EBUSY)."""
    with pytest.raises(OutputError, match="/: the output folder is a mount point, .* e.g. /merged"):
        check_output_dir("/", overwrite=True)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full (a device whose writes fail with ENOSPC)")
def test_a_full_disk_is_named_by_the_side_file_it_stopped(tmp_path, monkeypatch):
    import errno

    from merge_engine.io import writer
    w = ShardedWriter(str(tmp_path / "out"), entries(tensors()), 10**9)
    monkeypatch.setattr(writer, "open", lambda path, mode: open("/dev/full", mode), raising=False)
    with pytest.raises(OSError) as error:
        w.add_file("config.json", "{}\n")
    assert error.value.errno == errno.ENOSPC and error.value.filename == os.path.join(w.tmp_dir, "config.json")
    w.abort()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full (a device whose writes fail with ENOSPC)")
def test_a_full_disk_is_named_by_the_copied_file_it_stopped(tmp_path, monkeypatch):
    """A copied side file (tokenizer files, the index) on a full disk names the output file, not the source."""
    import errno

    from merge_engine.io import writer
    source = tmp_path / "tokenizer.json"
    source.write_text("{}" * 100)
    w = ShardedWriter(str(tmp_path / "out"), entries(tensors()), 10**9)
    real_open = open
    monkeypatch.setattr(writer, "open", lambda path, mode: real_open("/dev/full" if "w" in mode else path, mode),
                        raising=False)
    with pytest.raises(OSError) as error:
        w.copy_file(str(source))
    assert error.value.errno == errno.ENOSPC and error.value.filename == os.path.join(w.tmp_dir, "tokenizer.json")
    w.abort()


def test_every_file_and_the_folder_are_on_disk_before_the_rename_and_the_rename_before_the_old_output_goes(
        tmp_path, monkeypatch):
    # only the shards were fsynced: after a system crash the renamed output (which had replaced the old one, deleted
    # by then) could hold an empty config or index, and the rename itself could be undone
    out, w = _old_output_and_writer(tmp_path)
    w.add_file("config.json", "{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    w.copy_file(str(tmp_path / "tokenizer.json"))
    events = []
    fsync, rename = os.fsync, os.rename

    def recording_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", path, os.path.exists(f"{w.tmp_dir}.old")))
        fsync(fd)

    def recording_rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        rename(src, dst)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording_rename)
    tmp_dir = w.tmp_dir
    w.commit()
    move_in = events.index(("rename", tmp_dir, str(out)))
    synced = {path for kind, path, *_ in events[:move_in] if kind == "fsync"}
    assert {os.path.join(tmp_dir, name) for name in os.listdir(out)} | {tmp_dir} <= synced
    assert ("fsync", str(tmp_path), True) in events[move_in:]  # the old output still there to fall back on
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_a_killed_run_that_had_this_process_id_is_cleaned_up_too(tmp_path, caplog):
    # a container's runs all get the same process id (1, or the one after its init): the killed run's id was taken
    # for running, this process' own, so its folders were kept forever without a word
    out = tmp_path / "out"
    killed = tmp_path / f".out.partial-{os.getpid()}.0badf00d"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"unfinished")
    (killed / ".lock").write_bytes(b"")  # its lock, free
    moved_aside = tmp_path / f".out.partial-{os.getpid()}.0badcafe.old"
    moved_aside.mkdir()
    with caplog.at_level("WARNING", logger="merge_engine"):
        w = ShardedWriter(str(out), entries(tensors()), 10**9)
    assert not killed.exists() and f"removed {killed}" in caplog.text
    assert moved_aside.exists() and f"{moved_aside} is the folder a killed or failed run moved aside" in caplog.text
    w.abort()


@pytest.mark.parametrize("who", ["the next run", "abort"])
def test_a_partial_folder_loses_its_lock_last(tmp_path, monkeypatch, who):
    # rmtree removed the lock when the directory listed it first: a deletion cut short there (a kill) left a folder
    # without a lock, which the next run names as a finished output to move into place
    out = tmp_path / "out"
    if who == "the next run":
        assert subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)]).returncode == -9
    else:
        w = ShardedWriter(str(out), entries(tensors()), 10**9)
    (tmp_path / partials(out)[0] / "config.json").write_text("{}")
    removed = []
    unlink = os.unlink

    def recording_unlink(path, *args, **kwargs):
        removed.append(os.path.basename(path))
        unlink(path, *args, **kwargs)
    monkeypatch.setattr(os, "unlink", recording_unlink)
    if who == "the next run":
        w = ShardedWriter(str(out), entries(tensors()), 10**9)
        monkeypatch.undo()
    w.abort()
    assert sorted(removed) == [".lock", "config.json", "model.safetensors"] and removed[-1] == ".lock"
    assert partials(out) == []


def test_a_folder_another_writer_of_this_process_is_setting_up_is_kept(tmp_path):
    # its lock not taken yet (another thread's writer between making its folder and locking it): this process' id,
    # which no longer marks a running writer (a killed run's in a container has it too), must not make it stale
    out = tmp_path / "out"
    first = ShardedWriter(str(out), entries(tensors()), 10**9)
    os.close(first._lock_fd)  # as before flock
    first._lock_fd = -1
    ShardedWriter(str(out), entries(tensors()), 10**9).abort()
    assert os.path.isdir(first.tmp_dir)
    first.abort()


def test_an_output_name_longer_than_the_file_system_allows_is_refused_up_front(tmp_path):
    # the temporary folder's name is cut to fit: the merge ran to its end and failed at the final rename, naming
    # that folder ("File name too long: .../.yyy~digest.partial-...")
    with pytest.raises(OutputError, match=r"the output folder's name is 256 bytes long, more than the 255 its file"):
        ShardedWriter(str(tmp_path / ("y" * 256)), entries(tensors()), 10**9)
    assert os.listdir(tmp_path) == []


def test_an_output_below_more_missing_folders_than_the_recursion_limit_is_written(tmp_path):
    # os.makedirs recursed once per missing folder: RecursionError
    depth = sys.getrecursionlimit() + 100
    out = tmp_path.joinpath(*["d"] * depth, "out")
    ts = tensors()
    try:
        w = ShardedWriter(str(out), entries(ts), 10**9)
        for n, t in ts.items():
            w.write(n, t)
        w.commit()
        assert sorted(os.listdir(out)) == ["model.safetensors"]
    finally:  # removed level by level: pytest's own clean-up (shutil.rmtree) recurses once per folder too
        for folder in [out, *out.parents][:depth + 1]:
            for name in os.listdir(folder) if folder.exists() else ():
                if not (folder / name).is_dir():
                    os.unlink(folder / name)
            if folder.exists():
                os.rmdir(folder)


def test_an_output_path_longer_than_the_kernel_takes_is_refused_up_front(tmp_path):
    # the folders above it were made, then mkdir failed with ENAMETOOLONG ("File name too long")
    out = tmp_path.joinpath(*["d" * 200] * 21, "out")
    with pytest.raises(OutputError, match=r"the output path is \d+ bytes long: the temporary folder beside it \(\d+ "
                                          r"bytes\) would pass the 4095 its file system allows in a path"):
        ShardedWriter(str(out), entries(tensors()), 10**9)
    assert os.listdir(tmp_path) == []


def test_completing_commits_the_block_or_leaves_nothing(tmp_path):
    entries = [("w", torch.float32, (2, 3))]
    with ShardedWriter(str(tmp_path / "out"), entries).completing() as writer:
        writer.write("w", torch.ones(2, 3))
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]
    with pytest.raises(KeyboardInterrupt):
        with ShardedWriter(str(tmp_path / "broken"), entries).completing() as writer:
            writer.write("w", torch.ones(2, 3))
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["out"]  # neither the output nor its temporary folder
