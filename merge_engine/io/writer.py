"""Streaming, crash-safe writer for sharded safetensors output.

The whole output layout (tensor order, shard boundaries, headers) is fixed from the merge plan
before any tensor is computed, so each merged tensor is written straight to its final offset and
dropped: memory never holds more than the tensor in hand, whatever the shard size. Everything is
written into a hidden temporary folder beside the output and renamed into place only when every
shard, the index and the side files are complete. With direct=True, the tensors' whole blocks are
written with O_DIRECT (ShardedWriter._write_direct).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import socket
import stat
import threading
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

import torch

from merge_engine.errors import OutputError
from merge_engine.interrupts import signals_deferred
from merge_engine.io.raw import DIRECT_ALIGN, fsync_path, tensor_bytes
from merge_engine.io.safetensors_format import build_header

log = logging.getLogger("merge_engine")
LOCK_FILE = ".lock"  # inside a partial folder, flock-ed by the process writing it until it ends
_JOINED_LOCK = ".lock-"  # + host and process id: flock-ed by each other process writing shards into it
_MOVING = threading.Lock()  # moving outputs into place, in this process
_MADE_HERE: set[str] = set()  # the partial folders (and replaced outputs) this process made (remove_stale_partials)
_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")  # how /proc/self/mountinfo writes a space, a tab, a newline, a backslash

_WRITE_CHUNK = 1 << 30
_BOUNCE = 16 << 20  # bytes staged per direct write
_MIN_DIRECT = 1 << 20  # smaller tensors are written plainly
_NAME_MAX = 255  # bytes in one file name (Linux's filesystems)
_PATH_MAX = 4096  # bytes in a path given to the kernel, its ending NUL included (Linux)
_PID_DIGITS = 7  # Linux's largest process id, 2**22


@dataclass
class ShardLayout:
    """One output file: its name, its header bytes, its total size, and where each tensor's data starts."""

    filename: str
    header: bytes
    size: int
    offsets: dict[str, int]  # tensor name -> byte offset of its data in the file
    fd: int = -1
    direct_fd: int = -1  # the same file opened with O_DIRECT (-1: not asked for, or refused)


def _open_direct(path: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except (OSError, AttributeError):  # tmpfs and some network filesystems refuse it; not every OS has it
        return -1


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + _WRITE_CHUNK], offset + done)


def _joined_lock_name() -> str:
    return f"{_JOINED_LOCK}{socket.gethostname()}-{os.getpid()}"


def output_folder(out_dir: str) -> str:
    """The absolute folder an output path names: where it is a symbolic link, the folder it points to (which the
    output becomes, so the link then points to the output), else the path."""
    path = _trimmed(out_dir)
    return os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path)


def _trimmed(path: str) -> str:
    """path without trailing slashes and "/." (os.path.islink("link/") is False: it names the folder the link points
    to, so the link itself would be taken for the output). Not os.path.normpath: "link/.." is not the link's folder."""
    return re.sub(r"(?<=.)(/+\.?)+$", "", path)


def check_output_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse an existing non-empty output folder unless overwriting was asked for, an empty path (the
    working folder, which an overwrite would replace), a mount point, and a path under a file."""
    _check_named(out_dir)
    if os.path.islink(_trimmed(out_dir)):
        try:
            os.stat(out_dir)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputError(f"{out_dir}: the output path is a symbolic link that loops") from None
    folder = output_folder(out_dir)
    if os.path.exists(folder):
        if not os.path.isdir(folder):
            raise OutputError(f"{out_dir}: output path exists and is not a folder")
        if _is_mount_point(folder):  # the kernel refuses to rename onto it (EBUSY), after the whole merge
            raise OutputError(f"{out_dir}: the output folder is a mount point, which the output (written beside "
                              "it, then renamed into place) cannot replace; name a folder inside it, e.g. "
                              + os.path.join(_trimmed(out_dir), "merged"))
        if os.listdir(folder) and not overwrite:
            raise OutputError(f"{out_dir}: output folder exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    else:
        _check_can_be_made(out_dir, folder)
    _check_path_length(out_dir, folder)
    _check_writable(out_dir, folder)


def _check_named(out_dir: str) -> None:
    if not out_dir:
        raise OutputError("the output path is empty (an unset variable?); name the output folder")


def _check_can_be_made(out_dir: str, folder: str) -> None:
    """A folder that does not exist yet can be made: its nearest existing parent is a folder."""
    parent = _nearest_existing_parent(folder)
    if not os.path.isdir(parent):
        raise OutputError(f"{out_dir}: {parent} is not a folder, so the output folder cannot be made in it")
    # the temporary folder's name is cut to fit (_within_name_limit): a longer name would fail the final rename
    name, limit = os.fsencode(os.path.basename(folder)), _name_limit(parent)
    if len(name) > limit:
        raise OutputError(f"{out_dir}: the output folder's name is {len(name)} bytes long, more than the {limit} its "
                          "file system allows")


def _nearest_existing_parent(folder: str) -> str:
    parent = os.path.dirname(folder)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    return parent


def _check_path_length(out_dir: str, folder: str) -> None:
    """The longest folder path the writer makes (the old output moved aside, beside the temporary folder) is one the
    kernel takes: a longer one failed the merge (ENAMETOOLONG) once its folders were made, or at its end."""
    parent, prefix = _partial_prefix(folder)
    longest = len(os.fsencode(os.path.join(parent, prefix))) + _PID_DIGITS + len(".xxxxxxxx.old")
    limit = _path_limit(_nearest_existing_parent(folder)) - 1  # less the ending NUL
    if longest > limit:
        raise OutputError(f"{out_dir}: the output path is {len(os.fsencode(folder))} bytes long: the temporary "
                          f"folder beside it ({longest} bytes) would pass the {limit} its file system allows in a "
                          "path; name a shorter one")


def _path_limit(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):  # not reported
        return _PATH_MAX


def _name_limit(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):  # not reported
        return _NAME_MAX


def _check_writable(out_dir: str, folder: str) -> None:
    """The folder the output is made in (its temporary folder, renamed into place) can be written: said before a
    command computes (fisher writes only once its whole computation is done), not after."""
    parent = _nearest_existing_parent(folder)  # a folder: check_output_dir's earlier checks
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "a read-only file system" if os.statvfs(parent).f_flag & os.ST_RDONLY else "no permission to write there"
        raise OutputError(f"{out_dir}: the output cannot be made in {parent} ({why})")


def _is_mount_point(folder: str) -> bool:
    """os.path.ismount misses a bind mount of a folder of the same filesystem: the kernel's list has it."""
    return os.path.ismount(folder) or os.path.realpath(folder) in _mount_points()


def _mount_points() -> set[str]:
    """The mount points this process sees (none where /proc is not mounted)."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    return {os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), line.split()[4])) for line in lines}


def check_output_apart(out_dir: str, inputs: Iterable[str]) -> None:
    """OutputError when the output folder lies inside an input folder (a second model among the first one's
    files, and --overwrite could replace the input itself) or an input file or folder lies inside the output
    folder (it would be deleted with the folder the output replaces). Checked before anything is read."""
    _check_named(out_dir)  # first: "" would be the working folder, which holds every input given by a relative path
    out = os.path.realpath(out_dir)
    for path in inputs:
        real = os.path.realpath(path)
        if os.path.isdir(real) and os.path.commonpath([out, real]) == real:
            raise OutputError(f"output folder {out_dir} is inside the input folder {path}; write it elsewhere")
        if real == out and os.path.isfile(real):  # nothing is inside a file: it is the input itself
            raise OutputError(f"the output path {out_dir} is the input {path}, a file; name a folder to write")
        if os.path.commonpath([out, real]) == out:
            kind = "input folder" if os.path.isdir(real) else "input"
            raise OutputError(f"the {kind} {path} is inside the output folder {out_dir}, which the output would "
                              "replace; write it elsewhere")


def _partial_prefix(out_dir: str) -> tuple[str, str]:
    parent, base = os.path.split(output_folder(out_dir))
    return parent, f".{_within_name_limit(base)}.partial-"


def _within_name_limit(base: str) -> str:
    """base, or where the partial folder's name (".BASE.partial-PID.XXXXXXXX.old") would pass the file system's
    255-byte limit on a name, its start and a digest of the whole: an output name of 226 to 255 bytes is valid,
    but the merge could not make its partial folder (or, with --overwrite, only once done, move the old one aside)."""
    budget = _NAME_MAX - len(".") - len(".partial-") - _PID_DIGITS - len(".xxxxxxxx.old")
    if len(os.fsencode(base)) <= budget:
        return base
    digest = "~" + hashlib.sha256(os.fsencode(base)).hexdigest()[:16]
    while len(os.fsencode(base + digest)) > budget:
        base = base[:-1]
    return base + digest


def remove_stale_partials(out_dir: str) -> list[str]:
    """Remove the temporary folders that killed runs writing out_dir left beside it (a merge killed by
    the OOM killer or SIGKILL cannot clean up, and its folder may hold a whole model). A folder is stale
    when its writer's lock is free (a kernel lock, released when the process ends, so one on another
    host that shares the disk keeps its folder) and its process id is not running here (or is this process', which
    did not make it). Returns the removed paths."""
    parent, prefix = _partial_prefix(out_dir)
    removed = []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        path = os.path.join(parent, name)
        pid = name[len(prefix):].split(".")[0]
        if not name.startswith(prefix) or not pid.isdigit() or not os.path.isdir(path):
            continue
        # a folder named with this process' id and not made by it is a killed run's that had the same id (a
        # container's runs all get the same one)
        running = path in _MADE_HERE if int(pid) == os.getpid() else process_running(int(pid))
        if running:
            continue
        if not _lock_files(path):
            _warn_moved_aside(path, out_dir)
        elif _locks_are_free(path):
            _remove_partial(path)
            log.warning("removed %s, the unfinished output of an earlier run that was killed", path)
            removed.append(path)
    return removed


def _remove_partial(path: str) -> None:
    """Delete a partial folder, its lock files last: a deletion cut short (a kill) leaves a folder that still reads
    as unfinished, not one without locks, which the next run takes for a finished output (_warn_moved_aside)."""
    with contextlib.suppress(OSError), os.scandir(path) as entries:
        locks = set(_lock_files(path))
        for entry in entries:
            if entry.name in locks:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    shutil.rmtree(path, ignore_errors=True)


def _warn_moved_aside(path: str, out_dir: str) -> None:
    """A folder without locks is one a run was moving into place, or the output it replaced (.old), when it was
    killed (or whose deletion failed): possibly the user's only copy, so named, not removed."""
    if path.endswith(".old"):
        log.warning("%s is the folder a killed or failed run moved aside to replace %s; where %s is missing, move it "
                    "back, else delete it", path, out_dir, out_dir)
    else:
        log.warning("%s is the complete output of a run killed while moving it into place as %s; move it there or "
                    "delete it", path, out_dir)


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, as another user
        return True
    return True


def _locks_are_free(folder: str) -> bool:
    """Whether no process holds the folder's locks: its maker's and those of the processes that joined it
    (the ranks of a distributed merge, on this host or another that shares the disk)."""
    locks = _lock_files(folder)
    return LOCK_FILE in locks and all(lock_is_free(os.path.join(folder, f)) for f in locks)


def _lock_files(folder: str) -> list[str]:
    return [f for f in os.listdir(folder) if f == LOCK_FILE or f.startswith(_JOINED_LOCK)]


def lock_is_free(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # no lock file: not a folder this writer made, or one still being set up
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def plan_shards(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], shard_size: int) -> list[list[int]]:
    """Group entries (in order) into shards of at most shard_size bytes (a larger tensor gets its own); shard_size
    0 is no limit, one shard, as in mergekit."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(entries):
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and shard_size and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def planned_layout(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], shard_size: int) -> list[ShardLayout]:
    """Shards of at most shard_size bytes, in entry order, named as transformers names them."""
    groups = plan_shards(entries, shard_size)
    layout = []
    for i, group in enumerate(groups):
        items = [entries[j] for j in group]
        header, offsets = build_header(items)
        data = sum(torch.Size(shape).numel() * dtype.itemsize for _, dtype, shape in items)
        name = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        layout.append(ShardLayout(name, header, len(header) + data, offsets))
    return layout


class ShardedWriter:
    """Writes a set of tensors into shards in a temporary folder, then moves it into place.

    The shards are planned from the entries and shard_size, or given as `layout` (for example an input
    checkpoint's own files, with `index_file` its index copied verbatim).

    Several processes (the ranks of a distributed merge) can write one output: each opens only
    `own_shards` (indices into the layout; default all). One makes the folder and alone writes the index
    and side files, and commits; the others join it with `join=` its path (writer.tmp_dir), and only flush."""

    def __init__(self, out_dir: str, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 shard_size: int = 5 * 10**9, overwrite: bool = False, layout: list[ShardLayout] | None = None,
                 index_file: str | None = None, direct: bool = False, own_shards: Collection[int] | None = None,
                 join: str | None = None):
        self.out_dir = output_folder(out_dir)
        self.overwrite = overwrite
        self._made_parents: list[str] = []  # folders above the output this writer created (removed on abort)
        check_output_dir(self.out_dir, overwrite)
        self.maker = join is None
        self.tmp_dir, lock = self._make_folder() if self.maker else (join, os.path.join(join, _joined_lock_name()))
        # held until this process ends: tells later runs that this folder is still being written
        self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._entries = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
        self._all_shards = layout if layout is not None else planned_layout(entries, shard_size)
        self._shards = self._all_shards if own_shards is None else [self._all_shards[i] for i in sorted(own_shards)]
        self._index_file = index_file
        self._where = {name: (shard, off) for shard in self._shards for name, off in shard.offsets.items()}
        self.total_size = sum(torch.Size(shape).numel() * dtype.itemsize for dtype, shape in self._entries.values())
        try:  # a full disk can refuse the headers already: leave no folder behind
            for shard in self._shards:
                shard.fd = os.open(os.path.join(self.tmp_dir, shard.filename), os.O_RDWR | os.O_CREAT | os.O_TRUNC,
                                   0o644)
                with self._naming(shard.filename):
                    os.pwrite(shard.fd, shard.header, 0)
                    os.ftruncate(shard.fd, shard.size)
                if direct:
                    shard.direct_fd = _open_direct(os.path.join(self.tmp_dir, shard.filename))
        except BaseException:
            self.abort()
            raise
        self._bounce: memoryview | None = None  # block-aligned staging memory of direct writes
        self._bounce_lock = threading.Lock()
        self._pending = set(self._where)
        self._flushed = False
        self.bytes_written = 0

    def _make_folder(self) -> tuple[str, str]:
        """A fresh temporary folder beside the output (after removing killed runs' ones), and its lock path."""
        parent, prefix = _partial_prefix(self.out_dir)
        missing = parent
        while not os.path.isdir(missing):
            self._made_parents.append(missing)
            missing = os.path.dirname(missing)
        for folder in reversed(self._made_parents):  # not os.makedirs: it recurses once per missing folder
            with contextlib.suppress(FileExistsError):  # made by another process meanwhile
                os.mkdir(folder)
        remove_stale_partials(self.out_dir)
        # the process id names the folder's owner (remove_stale_partials); the rest makes it this writer's alone
        while True:  # os.mkdir, not mkdtemp (0700): the output folder keeps the mode the umask gives
            tmp_dir = os.path.join(parent, f"{prefix}{os.getpid()}.{secrets.token_hex(4)}")
            _MADE_HERE.add(tmp_dir)  # before it exists: another thread's writer must not take it for a killed run's
            try:
                os.mkdir(tmp_dir)
                return tmp_dir, os.path.join(tmp_dir, LOCK_FILE)
            except FileExistsError:
                continue

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor at its place (thread-safe: distinct tensors never overlap)."""
        dtype, shape = self._entries[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"'{name}': planned {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        shard, offset = self._where[name]
        data = tensor_bytes(tensor.detach().cpu().contiguous())
        with self._naming(shard.filename):
            if not (shard.direct_fd >= 0 and len(data) >= _MIN_DIRECT and self._write_direct(shard, data, offset)):
                _pwrite_all(shard.fd, data, offset)
        self._pending.discard(name)
        self.bytes_written += len(data)

    def _write_direct(self, shard: ShardLayout, data: memoryview, offset: int) -> bool:
        """The tensor's whole blocks with O_DIRECT, through an aligned staging buffer, and its partial first
        and last blocks (shared with its neighbours) plainly. False, and direct writes of this shard off,
        where the filesystem refuses them after all (the caller then writes the tensor plainly).

        Why: plain writes copy every byte into fresh page-cache pages, which on a VM costs more than the
        disk (a 2.2 GB output: 6-9 s of system time with fsync, against 1.2-1.7 s written directly), and
        fill the cache with a model nobody has asked to read."""
        first = -(-offset // DIRECT_ALIGN) * DIRECT_ALIGN
        last = (offset + len(data)) // DIRECT_ALIGN * DIRECT_ALIGN
        with self._bounce_lock:
            if self._bounce is None:
                self._bounce = memoryview(mmap.mmap(-1, _BOUNCE))  # page-aligned, as O_DIRECT needs
            try:
                for pos in range(first, last, _BOUNCE):
                    n = min(_BOUNCE, last - pos)
                    self._bounce[:n] = data[pos - offset:pos - offset + n]
                    _pwrite_all(shard.direct_fd, self._bounce[:n], pos)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(shard.direct_fd)
                shard.direct_fd = -1
                return False
        _pwrite_all(shard.fd, data[:first - offset], offset)
        _pwrite_all(shard.fd, data[last - offset:], last)
        return True

    def add_file(self, filename: str, content: str | bytes) -> None:
        """Add a side file (config.json, the merge config...) to the output; text as UTF-8, whatever the locale."""
        data = content if isinstance(content, bytes) else content.encode("utf-8")
        with self._naming(filename), open(os.path.join(self.tmp_dir, filename), "wb") as f:
            f.write(data)

    def copy_file(self, src: str, filename: str | None = None) -> None:
        name = filename or os.path.basename(src)
        with open(src, "rb") as f, self._naming(name), open(os.path.join(self.tmp_dir, name), "wb") as out:
            shutil.copyfileobj(f, out)  # (shutil.copyfile's full-disk error names the source)

    def flush(self) -> None:
        """Check completeness, write the index (the folder's maker) and flush this process' shards to disk
        (commit does it if not done)."""
        if self._flushed:
            return
        if self._pending:
            missing = sorted(self._pending)
            raise RuntimeError(f"{len(missing)} planned tensor(s) were never written, e.g. {missing[:3]}")
        if self.maker:
            self._write_index()
        for shard in self._shards:
            with self._naming(shard.filename):
                os.fsync(shard.fd)
        if self.maker:
            self._sync_side_files()
        self._close()
        self._flushed = True

    def _sync_side_files(self) -> None:
        """The files beside the shards (config, index, tokenizer, written through the page cache) and the folder's
        entries on disk before it is renamed into place: after a system crash, the renamed output (which may have
        replaced the previous one) could otherwise hold them empty (ext4's delayed allocation)."""
        skip = {s.filename for s in self._all_shards} | set(_lock_files(self.tmp_dir))  # shards: fsynced above
        for name in sorted(set(os.listdir(self.tmp_dir)) - skip):
            with self._naming(name):
                fsync_path(os.path.join(self.tmp_dir, name))
        fsync_path(self.tmp_dir)

    @contextlib.contextmanager
    def _naming(self, filename: str):
        """An OSError of a write to the output file (a full disk, a quota) names it: pwrite's and a buffered file's
        do not."""
        try:
            yield
        except OSError as e:
            if e.filename is None:
                raise OSError(e.errno, e.strerror, os.path.join(self.tmp_dir, filename)) from e
            raise

    def _write_index(self) -> None:
        if self._index_file:
            self.copy_file(self._index_file)
        elif len(self._all_shards) > 1:
            weight_map = {name: s.filename for s in self._all_shards for name in s.offsets}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            self.add_file("model.safetensors.index.json", json.dumps(index, indent=2) + "\n")

    def commit(self) -> None:
        """flush, then move the folder into place."""
        self.flush()
        self._move_into_place()

    @contextlib.contextmanager
    def completing(self) -> Iterator[ShardedWriter]:
        """A block that writes the output: then committed, or on any exception (Ctrl-C too) aborted, leaving nothing."""
        try:
            yield self
            self.commit()
        except BaseException:
            self.abort()
            raise

    def _move_into_place(self) -> None:
        with _MOVING:  # two writers of one output in this process: one after the other, each output whole
            check_output_dir(self.out_dir, self.overwrite)  # it may have appeared while we merged
            old = f"{self.tmp_dir}.old" if os.path.exists(self.out_dir) else None
            # while it exists, the replaced output is this process' own: another thread's writer, removing the
            # partial folders of killed runs, must not take it for one that a killed run moved aside
            if old:
                _MADE_HERE.add(old)
            try:
                self._rename_into_place(old)
            finally:
                _MADE_HERE.discard(old)  # what is left of it (a deletion that failed) is named as before

    def _rename_into_place(self, old: str | None) -> None:
        """The output moved aside to old (None: there is none), this folder renamed into its place, old deleted."""
        for lock in _lock_files(self.tmp_dir):  # not part of the output (held until the rename, or by the joiners)
            os.unlink(os.path.join(self.tmp_dir, lock))
        if old:  # the user's folder may be shared (a group's access, setgid): its replacement keeps its permissions
            os.chmod(self.tmp_dir, stat.S_IMODE(os.stat(self.out_dir).st_mode))
        # Ctrl-C between the renames would leave no output folder (abort deletes the new one), and after them the
        # replaced one, hidden beside it, for good
        with signals_deferred():
            self._swap_in(old)
            fsync_path(os.path.dirname(self.out_dir))  # the rename on disk before the replaced output is deleted
            self._release_lock()
            if old:
                self._remove_replaced(old)

    def _swap_in(self, old: str | None) -> None:
        """The output folder moved aside to old (if any), the new one renamed into its place; where that rename
        fails, the old one moved back."""
        if old:
            os.rename(self.out_dir, old)
        try:
            os.rename(self.tmp_dir, self.out_dir)
        except OSError:
            if old:
                with contextlib.suppress(OSError):  # another process' output took the path meanwhile: old is kept
                    os.rename(old, self.out_dir)
            raise

    def _remove_replaced(self, old: str) -> None:
        """Delete the folder the output replaced. The output is complete and in place by now: what cannot be deleted
        (a read-only or busy file) is left with a warning, not made a failure of the run."""
        try:
            shutil.rmtree(old)
        except OSError as e:
            shutil.rmtree(old, ignore_errors=True)  # the rest of what can go
            log.warning("%s is written, but the output it replaced could not all be deleted (%s); what is left is "
                        "in %s", self.out_dir, e.strerror, old)  # e.filename: relative to a folder rmtree had open

    def abort(self) -> None:
        """Remove the temporary folder (its maker; a joiner closes its files); the output path is left as it was.
        A second Ctrl-C (the first one's clean-up under way) takes effect once it is done, not halfway through."""
        with signals_deferred():
            self._close()
            if self.maker:
                _remove_partial(self.tmp_dir)
                for folder in self._made_parents:  # deepest first; one another process filled stays
                    try:
                        os.rmdir(folder)
                    except OSError:
                        break
            self._release_lock()

    def release(self) -> None:
        """A joiner's end, once the maker has committed: its lock (which the maker removed) is let go."""
        self._close()
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _close(self) -> None:
        for shard in self._shards:
            for attr in ("fd", "direct_fd"):
                if getattr(shard, attr) >= 0:
                    os.close(getattr(shard, attr))
                    setattr(shard, attr, -1)

    @property
    def tensor_names(self) -> list[str]:
        """The tensors this writer writes (those of its own shards)."""
        return list(self._where)

    @property
    def shard_files(self) -> list[str]:
        return [s.filename for s in self._all_shards]
