"""Reading what a model folder says about itself, which nothing vouches for.

parse_json: JSON with every way it can be hostile turned into one CheckpointError naming the file
(invalid text, duplicate keys, nesting deep enough to exhaust the parser's stack, numbers too large).

inside_folder: the one rule for files that a folder's own metadata names (shard indexes, adapter and
tokenizer files, journal entries): they must lie inside that folder. A hostile index naming `../../x.safetensors`
or `/etc/...` would otherwise make a merge read, copy or rewrite files elsewhere.

The rule: the name is a relative path without `..` components (also after Unicode NFKC normalisation,
so a look-alike never means the parent to a tool that normalises), and the file it reaches, after
symlinks, lies inside the folder after symlinks. So a symlinked model folder works, and so do
symlinks inside it that point within it; a symlink out of it is refused. One exception keeps the
Hugging Face cache usable: in a snapshot folder (`.../snapshots/<revision>/` beside a `blobs/` folder)
the files are symlinks into the repository's `blobs/`, so there the boundary is the repository folder.
"""
from __future__ import annotations

import json
import math
import os
import stat
import unicodedata
from pathlib import PurePosixPath

from merge_engine.errors import CheckpointError


def inside_folder(folder: str, name: object, what: str) -> str:
    """The path of `name` in `folder`, or CheckpointError naming `what` (the file that named it)."""
    if not isinstance(name, str) or not name or not is_file_name(name):
        raise CheckpointError(f"{what}: names {name!r}, which is not a file name")
    for form in (name, unicodedata.normalize("NFKC", name)):
        if os.path.isabs(form) or ".." in PurePosixPath(form.replace("\\", "/")).parts:
            raise CheckpointError(f"{what}: names '{name}', a path outside {folder}")
    path = os.path.join(folder, name)
    boundary = containment_boundary(folder)
    real = os.path.realpath(path)
    if os.path.commonpath([real, boundary]) != boundary:
        raise CheckpointError(f"{what}: '{name}' leads to {real}, outside {boundary} (a symlink out of the folder)")
    return path


def containment_boundary(folder: str) -> str:
    """The folder after symlinks, or for a Hugging Face cache snapshot, its repository folder."""
    real = os.path.realpath(folder)
    snapshots = os.path.dirname(real)
    repository = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and os.path.isdir(os.path.join(repository, "blobs")):
        return repository
    return real


def parse_json(raw: bytes | str, what: str, **number_hooks):
    """The JSON value of raw, or CheckpointError naming `what`: duplicate keys are refused (a later one
    would silently win), as are values nested too deep to parse. number_hooks: json.loads' parse_int,
    parse_float, parse_constant."""
    try:
        return json.loads(raw, object_pairs_hook=refuse_repeated_keys, **number_hooks)
    except RecursionError:
        raise CheckpointError(f"{what}: JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{what}: invalid JSON ({e})") from None


def is_text(s: str) -> bool:
    """Whether s can be encoded (and so written or tokenized): JSON's \\u escapes can name half a surrogate pair
    alone, which json.loads takes."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_file_name(text: str) -> bool:
    """Whether text can name a file: YAML's and JSON's escapes can write a NUL or a lone surrogate (\\ud800), which
    no file name holds (the file system calls raise ValueError)."""
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return "\0" not in text


def is_int(value) -> bool:
    """A JSON integer: Python's bool is an int, JSON's true is not."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A JSON number (not a bool) that is finite as a float: json.loads takes NaN, Infinity and integers past
    float's range."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float (1e400 written out in full)
        return False


def not_regular(mode: int) -> str | None:
    """What a file of this st_mode is when it is not a regular file ("a FIFO", ...), else None."""
    if stat.S_ISREG(mode):
        return None
    return "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a device or socket"


def open_regular(path: str):
    """path opened for binary reading, or CheckpointError when it is not a regular file: a FIFO named where a
    file belongs would block the read forever, a device would stream without end. The open does not block."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    what = not_regular(os.fstat(fd).st_mode)
    if what:
        os.close(fd)
        raise CheckpointError(f"{path}: is {what}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


MAX_JSON_BYTES = 64 * 1024 * 1024  # a model folder's JSON files (configs, indexes, manifests) hold kilobytes


def read_json(path: str):
    """A model folder's JSON file (config, index, manifest), read whole: at most MAX_JSON_BYTES (its parsed form
    takes many times its size in memory)."""
    with open_regular(path) as f:
        try:
            raw = f.read(MAX_JSON_BYTES + 1)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: more than {MAX_JSON_BYTES // 2**20} MiB, not a JSON file of a model folder")
    return parse_json(raw, path)


class RepeatedKeyError(ValueError):
    """A JSON object names a key twice (json.loads would keep the later value silently)."""


def refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads' object_pairs_hook refusing a key given twice in one object."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise RepeatedKeyError(f"the key {key!r} appears twice")
        seen[key] = value
    return seen
