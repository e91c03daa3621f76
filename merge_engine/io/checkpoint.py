"""Read-only access to a Hugging Face model folder of safetensors (or torch.save pickle) files.

Opening a checkpoint reads only headers (validated, see safetensors_format and torch_pickle); tensor bytes are read
one tensor at a time with positional reads straight into a caller-chosen buffer (pinned host memory
when the merge runs on CUDA), so a model is never held in RAM and the engine's prefetch threads, not
the compute thread, wait on the disk. The engine reads with O_DIRECT where the filesystem allows and
the page cache does not already hold the bytes (read_pooled, io/page_cache.py): the disk fills its
buffer without a trip through the page cache, whose copy took a third of all CPU time of a 1.1B merge
on 2 cores, and a merge does not evict the machine's cache.
"""
from __future__ import annotations

import os
import re
import reprlib
import stat
import threading
import warnings
from functools import cached_property
from typing import Callable

import torch

from merge_engine.errors import CheckpointError
from merge_engine.io.page_cache import ResidencyMaps
from merge_engine.io.raw import DIRECT_ALIGN, tensor_bytes
from merge_engine.io.safetensors_format import TensorInfo, file_identity, read_header_and_identity
from merge_engine.io.torch_pickle import read_pickle_header_and_identity
from merge_engine.io.untrusted import inside_folder, is_int, read_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"  # read where there is no model.safetensors[.index.json], as mergekit
PICKLE_FILE = "pytorch_model.bin"
OTHER_PICKLE_FILES = ("model.pt", "model.ckpt")  # not Hugging Face layouts, not read (nor by mergekit)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
PATCH_CONFIG = "patch_config.json"  # a merge_engine weight patch folder (patches/format.py)
IN_PLACE_JOURNAL = ".merge_engine-key-journal"  # an in-place key or patch rewrite's undo log (tiers/journal.py)
# "model.layers.12.mlp.up_proj.weight" -> ("model.layers", 12, "mlp.up_proj.weight"); GPT-2 uses "h", others
# "blocks" or "block", Qwen3-VL's projector "deepstack_merger_list" (a merger per tapped vision layer: a stack of its
# own in mergekit, t over its entries). The first such component is the stack: T5's "encoder.block.3.layer.1.
# DenseReluDense..." is block 3 of "encoder.block", not sub-layer 1. Layer numbers are written as Python writes them
# (ASCII digits, no leading zero): "layers.01" or a non-ASCII digit would otherwise name layer 1 a second time.
_LAYER_RE = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|h|blocks|block|layer|deepstack_merger_list))"
                       r"\.(?P<index>0|[1-9][0-9]*)\.(?P<rest>.+)$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_READ_CHUNK = 1 << 30  # Linux caps one pread at ~2 GiB
DIRECT_IO_MODES = ("auto", "on", "off")


def refuse_pending_journal(model_dir: str) -> None:
    """A folder an in-place key or patch rewrite was interrupted in holds a half-rewritten model: no command
    reads it until the rewrite is rolled back (the in-place commands roll back first, then open it)."""
    if os.path.exists(os.path.join(model_dir, IN_PLACE_JOURNAL)):
        raise CheckpointError(f"{model_dir}: an in-place key or patch operation was interrupted here "
                              f"({IN_PLACE_JOURNAL}); run `merge-engine key recover` (or `patch recover`) on it first")


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """Split a per-layer tensor name into (prefix, layer index, suffix); None for embeddings, norms, heads."""
    m = _LAYER_RE.match(name)
    return (m["prefix"], int(m["index"]), m["rest"]) if m else None


def read_weight_header(path: str) -> tuple[dict[str, TensorInfo], tuple[int, ...]]:
    """A weight file's tensors and identity: a .safetensors file by its header, any other by torch.save's zip
    format (as mergekit tells them apart: by the name's suffix)."""
    return read_header_and_identity(path) if _is_safetensors(path) else read_pickle_header_and_identity(path)


def _is_safetensors(path: str) -> bool:
    return path.lower().endswith(".safetensors")


def require_safetensors(ckpt: "Checkpoint", rewrite: str) -> None:
    """CheckpointError where the checkpoint's weights are torch.save pickle files, which `rewrite` (an operation that
    keeps the model's own files and offsets) cannot write."""
    pickled = sorted({info.file for info in ckpt.tensors.values() if not _is_safetensors(info.file)})
    if pickled:
        raise CheckpointError(f"{pickled[0]}: a torch.save pickle file; {rewrite} keeps a model's own safetensors "
                              "files and cannot rewrite it. Merge it once into safetensors (a passthrough merge "
                              "of this model) and use that folder")


def pread_into(fd: int, view: memoryview, offset: int, need: int, file: str, name: str) -> None:
    """Positional reads into view from offset until at least `need` bytes have arrived."""
    done = 0
    while done < need:
        n = os.preadv(fd, [view[done:done + _READ_CHUNK]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{file}: tensor {name!r}: file ended early (truncated while reading?)")
        done += n


def _config_problem(config: dict) -> str | None:
    """What is wrong with the type of a config.json key the merge reads (None: nothing)."""
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        return f"'architectures' must be a list of class names, got {reprlib.repr(architectures)}"
    text_config = config.get("text_config")
    if text_config is not None and not isinstance(text_config, dict):
        return f"'text_config' must be a JSON object, got {reprlib.repr(text_config)}"
    for scope, where in ((config, ""), (text_config or {}, "text_config.")):
        model_type = scope.get("model_type")  # looked up in tables of model types
        if model_type is not None and not isinstance(model_type, str):
            return f"'{where}model_type' must be a model type name, got {reprlib.repr(model_type)}"
        for key in (*LAYER_COUNT_KEYS, "vocab_size"):  # counts the merge plans with (true would count as 1)
            value = scope.get(key)
            if value is not None and not (is_int(value) and value >= 0):
                return f"'{where}{key}' must be a non-negative integer, got {reprlib.repr(value)}"
    return None


def read_buffer(name: str, info: TensorInfo, out: torch.Tensor | None) -> torch.Tensor:
    """out, checked to be a contiguous tensor of info's shape and dtype, or a fresh one (viewed in that shape:
    torch.empty cannot stride an empty shape such as [0, 2**62, 2**62], which the format allows)."""
    if out is None:
        return torch.empty(info.numel, dtype=info.dtype).view(info.shape)
    if out.dtype != info.dtype or tuple(out.shape) != info.shape or not out.is_contiguous():
        raise ValueError(f"buffer for '{name}' must be a contiguous {info.dtype} {list(info.shape)} tensor")
    return out


class Checkpoint:
    """A model folder: its config.json and the headers of its safetensors files."""

    holds_patch = False  # a dense patch folder's shards are read as a Checkpoint too (patches/format.py)

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._no_files_open()
        self._check_folder()
        self.tensors: dict[str, TensorInfo] = self._read_headers()
        _ = self.config  # checked now, so that its problems are listed with the merge config's

    def _no_files_open(self) -> None:
        self._identities: dict[str, tuple[int, ...]] = {}  # file -> its file_identity when its header was read
        self._fds: dict[str, int] = {}
        self._direct_fds: dict[str, int | None] = {}  # None: the file's filesystem refuses O_DIRECT
        self._refused_fds: list[int] = []  # direct descriptors whose reads failed: another read thread may hold one
        self._fds_lock = threading.Lock()  # the prefetch threads open files on first use: each file once
        self._residency = ResidencyMaps()

    def _check_folder(self) -> None:
        p = self.path
        if not os.path.exists(p):
            raise CheckpointError(f"{p}: model path does not exist (only local folders can be merged; "
                                  "nothing is downloaded)")
        if not os.path.isdir(p):
            raise CheckpointError(f"{p}: expected a model folder (config.json + *.safetensors), got a file")
        if any(os.path.exists(os.path.join(p, f)) for f in ADAPTER_FILES):
            raise CheckpointError(f"{p}: this is a LoRA/PEFT adapter folder; name it with its base model, as "
                                  "BASE_FOLDER+ADAPTER_FOLDER")
        if not self.holds_patch and os.path.exists(os.path.join(p, PATCH_CONFIG)):
            raise CheckpointError(f"{p}: this is a merge_engine patch folder ({PATCH_CONFIG}), not a model; name it "
                                  "with its base model, as BASE_FOLDER+PATCH_FOLDER, or apply it to its base with "
                                  "`merge-engine patch apply`")
        refuse_pending_journal(p)

    def _read_headers(self) -> dict[str, TensorInfo]:
        """The tensors of the folder's weight files, chosen as mergekit chooses: model.safetensors's index or the
        file, else pytorch_model.bin's, else (where mergekit refuses) every .safetensors file."""
        pickle_index = () if os.path.exists(os.path.join(self.path, SINGLE_FILE)) else (PICKLE_INDEX_FILE,)
        for index in (INDEX_FILE, *pickle_index):
            if os.path.lexists(os.path.join(self.path, index)):  # a dangling link too: refused, not passed over
                return self._read_sharded(inside_folder(self.path, index, self.path))
        files = _weight_files(self.path)
        if not files:
            other = [f for f in OTHER_PICKLE_FILES if os.path.exists(os.path.join(self.path, f))]
            hint = (f" It holds {other[0]}, which is not a Hugging Face weights file name (pytorch_model.bin "
                    "and model.safetensors are)." if other else "")
            raise CheckpointError(f"{self.path}: no weights found (model.safetensors, its shards with "
                                  f"{INDEX_FILE}, {PICKLE_FILE} or its shards with {PICKLE_INDEX_FILE}).{hint}")
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in self._read_header(inside_folder(self.path, f, self.path)).items():
                if name in tensors:
                    raise CheckpointError(f"{info.file}: tensor {name!r} also appears in {tensors[name].file}")
                tensors[name] = info
        return tensors

    def _read_sharded(self, index_path: str) -> dict[str, TensorInfo]:
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise CheckpointError(f"{index_path}: unreadable shard index (its weight_map must map tensor names "
                                  "to shard file names)")
        headers: dict[str, dict[str, TensorInfo]] = {}
        tensors: dict[str, TensorInfo] = {}
        for name, shard in weight_map.items():
            shard_path = inside_folder(self.path, shard, index_path)
            if shard not in headers:
                if not os.path.exists(shard_path):
                    raise CheckpointError(f"{index_path}: shard '{shard}' (holding {name!r}) is missing")
                headers[shard] = self._read_header(shard_path)
            if name not in headers[shard]:
                raise CheckpointError(f"{shard_path}: tensor {name!r} is listed in {os.path.basename(index_path)} "
                                      "but absent from the shard")
            tensors[name] = headers[shard][name]
        return tensors

    def _read_header(self, path: str) -> dict[str, TensorInfo]:
        infos, self._identities[path] = read_weight_header(path)
        return infos

    @cached_property
    def config(self) -> dict:
        """config.json as a dict ({} when the folder has none)."""
        path = os.path.join(self.path, "config.json")
        if not os.path.lexists(path):  # (a dangling link is refused by read_json)
            return {}
        config = read_json(inside_folder(self.path, "config.json", self.path))
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: unreadable config.json (not a JSON object)")
        problem = _config_problem(config)
        if problem:
            raise CheckpointError(f"{path}: {problem}")
        return config

    @cached_property
    def num_layers(self) -> int:
        """Layer count from config.json, else from the tensor names."""
        cfg = self.config.get("text_config") or self.config
        for key in LAYER_COUNT_KEYS:
            if isinstance(cfg.get(key), int):
                return cfg[key]
        indices = [s[1] for s in map(split_layer_name, self.tensors) if s]
        return max(indices) + 1 if indices else 0

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor's bytes from disk into `out` (allocated if None) and return it."""
        return self._read_bytes(name, out)

    @property
    def folders(self) -> list[str]:
        """Every folder reading this checkpoint reads (a LoRA adapter's or patch's too)."""
        return [self.path]

    def non_finite(self, name: str, count: int) -> str:
        """What to blame for tensor `name` read with `count` NaN or Inf values (a subclass that changes tensors
        while reading may be the culprit)."""
        return f"{self.path}: tensor '{name}' has {count} NaN or Inf value(s) (a corrupt checkpoint?)"

    def stored(self, name: str) -> TensorInfo:
        """Where and how tensor `name` is stored (`tensors` may describe it as a subclass reads it instead)."""
        return self.tensors[name]

    def _read_bytes(self, name: str, out: torch.Tensor | None) -> torch.Tensor:
        info = self.stored(name)
        out = read_buffer(name, info, out)
        self._read_into(info, tensor_bytes(out), name)
        return out

    def _read_into(self, info: TensorInfo, view: memoryview, name: str) -> None:
        """Tensor `name`'s bytes (where info says) into view; CheckpointError naming the file and the tensor when
        they cannot be read (the file deleted since its header was read, an I/O error)."""
        try:
            pread_into(self._fd(info.file), view, info.data_start, info.nbytes, info.file, name)
        except OSError as e:
            raise CheckpointError(f"{info.file}: tensor {name!r}: cannot read ({e.strerror or e})") from None

    def read_pooled(self, name: str, take_bytes: Callable[[int], torch.Tensor], direct_io: str = "auto") -> torch.Tensor:
        """Read one tensor into a buffer from take_bytes(n) (a flat uint8 CPU tensor of n bytes) and
        return it as a view of that buffer. direct_io: "on" reads with O_DIRECT, "off" with plain reads,
        "auto" each range the way io/page_cache.py chooses (plainly what the page cache holds).

        Direct reads cover the tensor's bytes widened to whole blocks, into a block-aligned window of
        the buffer. Where direct I/O is refused (tmpfs, some network filesystems) or the tensor's offset
        does not suit its dtype's alignment, the whole tensor is read plainly into the same kind of buffer."""
        if direct_io not in DIRECT_IO_MODES:
            raise ValueError(f"direct_io must be one of {', '.join(DIRECT_IO_MODES)}, not {direct_io!r}")
        info = self.stored(name)
        aligned = info.nbytes and info.data_start % info.dtype.itemsize == 0
        fd = self._direct_fd(info.file) if direct_io != "off" and aligned else None
        if fd is None:
            return self._read_bytes(name, take_bytes(info.nbytes).view(info.dtype).view(info.shape))
        first = info.data_start - info.data_start % DIRECT_ALIGN
        last = -(-(info.data_start + info.nbytes) // DIRECT_ALIGN) * DIRECT_ALIGN
        raw = take_bytes(last - first + DIRECT_ALIGN)
        pad = -raw.data_ptr() % DIRECT_ALIGN
        window = tensor_bytes(raw[pad:pad + last - first])
        data_end = info.data_start + info.nbytes
        spans = self._residency.spans(info.file, first, last) if direct_io == "auto" else [(first, last, False)]
        try:
            for lo, hi, plain in spans:
                if plain:  # only the tensor's own bytes: plain reads need no alignment
                    lo, hi = max(lo, info.data_start), min(hi, data_end)
                    pread_into(self._fd(info.file), window[lo - first:hi - first], lo, hi - lo, info.file, name)
                else:  # the block-rounded span may pass the file's end: only the tensor's bytes must arrive
                    pread_into(fd, window[lo - first:hi - first], lo, min(hi, data_end) - lo, info.file, name)
        except OSError:  # EINVAL: this file's filesystem takes no direct reads after all
            self._refuse_direct_fd(info.file, fd)
            return self._read_bytes(name, raw[:info.nbytes].view(info.dtype).view(info.shape))
        start = pad + info.data_start - first
        return raw[start:start + info.nbytes].view(info.dtype).view(info.shape)

    def _direct_fd(self, file: str) -> int | None:
        with self._fds_lock:
            if file not in self._direct_fds:
                try:
                    self._direct_fds[file] = self._open_checked(file, os.O_DIRECT)
                except OSError:  # this filesystem takes no direct reads
                    self._direct_fds[file] = None
            return self._direct_fds[file]

    def _refuse_direct_fd(self, file: str, fd: int) -> None:
        """No more direct reads of file; fd is closed with the others, as a read thread may still be using it."""
        with self._fds_lock:
            if self._direct_fds.get(file) == fd:
                self._direct_fds[file] = None
                self._refused_fds.append(fd)

    def _fd(self, file: str) -> int:
        with self._fds_lock:
            fd = self._fds.get(file)
            if fd is None:  # pread on one shared descriptor is thread-safe
                fd = self._fds[file] = self._open_checked(file)
            return fd

    def _open_checked(self, file: str, flags: int = 0) -> int:
        """A descriptor of file, which must still be the file whose header was read: a file replaced or rewritten
        since would be read at the old header's offsets, into a wrong output. Opened without blocking (a FIFO put
        in its place would wait forever)."""
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | flags)
        st = os.fstat(fd)
        if (file in self._identities and file_identity(st) != self._identities[file]) or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise CheckpointError(f"{file}: the file changed after its header was read (replaced or rewritten "
                                  "during the merge); its tensors are not read")
        os.set_blocking(fd, True)
        return fd

    def check_unchanged(self) -> None:
        """CheckpointError naming a file read since its header was that has changed meanwhile: a write into the open
        file (`cp` over it, an in-place rewrite) changes what later reads return, unseen by _open_checked. Its
        caller, once done reading, publishes nothing then."""
        open_fds = {**{f: fd for f, fd in self._direct_fds.items() if fd is not None}, **self._fds}
        for file, fd in open_fds.items():
            if file in self._identities and file_identity(os.fstat(fd)) != self._identities[file]:
                raise CheckpointError(f"{file}: the file changed while it was being read (rewritten in place?); "
                                      "what was read from it cannot be trusted")

    def close(self) -> None:
        with self._fds_lock:
            for fd in [*self._fds.values(), *self._direct_fds.values(), *self._refused_fds]:
                if fd is not None:
                    os.close(fd)
            self._fds.clear()
            self._direct_fds.clear()
            self._refused_fds.clear()
        self._residency.close()

    def __del__(self):
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, {len(self.tensors)} tensors)"


def _weight_files(folder: str) -> list[str]:
    """The weight files of a folder without an index: model.safetensors where it is there, else pytorch_model.bin,
    as mergekit reads (a Mistral folder's consolidated.safetensors beside them holds the same weights under other
    names), else every .safetensors file (shards whose index is missing; mergekit refuses such a folder)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    chosen = next((f for f in (SINGLE_FILE, PICKLE_FILE) if os.path.exists(os.path.join(folder, f))), None)
    if chosen is None:
        return files
    passed_over = [f for f in files if f != chosen]
    if passed_over:
        warnings.warn(f"{folder}: reading {chosen} only, as mergekit does; not {', '.join(passed_over)}", stacklevel=3)
    return [chosen]
