"""Pickled PyTorch checkpoints (`torch.save`'s zip format: pytorch_model.bin), read in place, unpickling no code.

A torch.save file is a zip archive: `<archive>/data.pkl` pickles the state dict, each tensor as a call
torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...) whose storage is a persistent id naming the
uncompressed record `<archive>/data/<key>`. data.pkl is read here by an unpickler that knows only the globals
a state dict of tensors needs (its dict type, the tensor and parameter rebuild functions, storage types, dtypes),
each standing for a layout, not the real function: any other global, the code a hostile pickle would run, is
refused by name before it is looked up, and what that check cannot see (copyreg extension codes, objects nested
deep enough to overflow the C stack) is refused before unpickling. Each tensor becomes a TensorInfo (file, byte
offset, dtype, shape) as a safetensors entry does, so the engine reads its bytes with the same positional reads;
opening reads no tensor data.

Not read (refused by name): torch's legacy pre-1.6 format (not a zip), big-endian files, compressed records,
tensors of dtypes merge_engine does not read (uint16, complex64, ...), and tensors that are not
contiguous views of their storage. Entries that are not tensors are passed over, as mergekit passes them over.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import reprlib
import struct
import warnings
import zipfile
from dataclasses import dataclass

import torch

from merge_engine.dtypes import SAFETENSORS_DTYPES, dtype_name
from merge_engine.errors import CheckpointError
from merge_engine.io.safetensors_format import (
    GIT_LFS_POINTER,
    TensorInfo,
    element_count,
    file_identity,
    is_count,
    torch_can_lay_out,
)
from merge_engine.io.untrusted import is_text, open_regular

MAX_PICKLE_BYTES = 100_000_000  # data.pkl of a state dict holds ~150 bytes a tensor
# torch.save's central directory takes ~60 bytes a record, MAX_PICKLE_BYTES of pickle names ~700k storages;
# zipfile makes a ~450-byte object of each entry, so a larger directory is refused before it is parsed
MAX_DIRECTORY_BYTES = 48 * 1024 * 1024
MAX_NESTING = 100  # a state dict's objects nest ~10 deep; hashing a dict key nested ~10**5 deep overflows the C stack
# EXT1/2/4 take an object from copyreg's process-wide extension cache without asking find_class, and cache what
# find_class gives for every later unpickle in the process; torch.save never writes them
_EXTENSION_OPCODES = ("EXT1", "EXT2", "EXT4")
_MEMO_PUTS, _MEMO_GETS = ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"), ("GET", "BINGET", "LONG_BINGET")
_IN_PLACE_OPCODES = ("SETITEM", "SETITEMS", "APPEND", "APPENDS", "ADDITEMS", "BUILD")  # add to the object below
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local file header: signature, ..., name length, extra length
_LOCAL_SIGNATURE = b"PK\x03\x04"
_DOS_DIRECTORY = 0x10  # an external attribute bit; torch's zip reader (miniz) skips such a record's bytes
# the legacy storage type names torch pickles (TypedStorage), and UntypedStorage (bytes) for dtypes added since
_STORAGE_DTYPES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool, "UntypedStorage": torch.uint8}


class _Malformed(Exception):
    """A pickled value that is not what torch.save writes (named in the CheckpointError that reports it)."""


class _Sealed:
    """Pickle's BUILD opcode sets state on any object it has: refused on ours (the globals are shared by every read,
    and a hostile pickle must not change how the next file is read)."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Malformed("state set on a tensor's layout")


@dataclass(frozen=True)
class _StorageType(_Sealed):
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage(_Sealed):
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _TensorView(_Sealed):
    storage: _Storage
    offset: int  # in elements of dtype
    shape: tuple
    stride: tuple
    dtype: torch.dtype


@dataclass(frozen=True)
class _Rebuild(_Sealed):
    """A rebuild function of torch._utils, standing for the layout it would build."""

    build: object

    def __call__(self, *args):
        return self.build(*args)


@dataclass(frozen=True)
class _TensorType(_Sealed):
    """torch.Tensor, the type _rebuild_from_type_v2 names for a tensor saved with Python attributes (nn.Buffer)."""


def _view(storage, offset, size, stride, dtype) -> _TensorView:
    if not (isinstance(storage, _Storage) and is_count(offset) and isinstance(size, tuple)
            and isinstance(stride, tuple) and len(size) == len(stride) and all(is_count(s) for s in size + stride)):
        raise _Malformed("a tensor's storage, offset, size or stride")
    return _TensorView(storage, offset, size, stride, dtype)


def _tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _view(storage, offset, size, stride, getattr(storage, "dtype", None))


def _tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if getattr(storage, "dtype", None) != torch.uint8 or not isinstance(dtype, torch.dtype):
        raise _Malformed("a tensor rebuilt from untyped storage")
    return _view(storage, offset, size, stride, dtype)


def _parameter(data, requires_grad, backward_hooks, state=None):
    return data


def _from_type(rebuild, new_type, args, state):
    """A tensor with Python attributes (state): the tensor `rebuild` lays out; the attributes hold no weights."""
    if not (isinstance(rebuild, _Rebuild) and isinstance(new_type, _TensorType) and isinstance(args, tuple)):
        raise _Malformed("a tensor rebuilt with Python attributes from other than a tensor's layout")
    return rebuild(*args)


# everything data.pkl may name; a dtype and the OrderedDict type take no state (BUILD on them fails)
_GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _Rebuild(_tensor_v2),
            ("torch._utils", "_rebuild_tensor_v3"): _Rebuild(_tensor_v3),
            ("torch._utils", "_rebuild_parameter"): _Rebuild(_parameter),
            ("torch._utils", "_rebuild_parameter_with_state"): _Rebuild(_parameter),
            ("torch._tensor", "_rebuild_from_type_v2"): _Rebuild(_from_type),
            ("torch", "Tensor"): _TensorType(),
            **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
            ("torch.storage", "UntypedStorage"): _StorageType(torch.uint8),  # where torch >= 2.0 pickles it from
            **{("torch", dtype_name(dtype)): dtype for dtype in SAFETENSORS_DTYPES.values()}}

# the globals naming a tensor dtype merge_engine does not read, refused as such
_UNREAD_DTYPES = {**{("torch", f"{kind}Storage"): name for kind, name in (
                      ("ComplexDouble", "complex128"), ("ComplexFloat", "complex64"), ("QUInt8", "quint8"),
                      ("QInt8", "qint8"), ("QInt32", "qint32"), ("QUInt4x2", "quint4x2"), ("QUInt2x4", "quint2x4"))},
                  **{("torch", name): dtype_name(dtype) for name, dtype in vars(torch).items()
                     if isinstance(dtype, torch.dtype) and dtype not in SAFETENSORS_DTYPES.values()}}


class _LayoutUnpickler(pickle.Unpickler):
    """Unpickles a state dict's structure: tensors become _TensorView, storages _Storage; nothing else runs."""

    def __init__(self, raw: bytes, path: str):
        super().__init__(io.BytesIO(raw))
        self._path = path
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _UNREAD_DTYPES:
            raise CheckpointError(f"{self._path}: holds tensors of dtype {_UNREAD_DTYPES[module, name]}, which "
                                  "merge_engine does not read (it reads "
                                  f"{', '.join(map(dtype_name, SAFETENSORS_DTYPES.values()))})")
        found = _GLOBALS.get((module, name))
        if found is None:
            raise CheckpointError(f"{self._path}: its pickle refers to {module}.{name}, which a checkpoint of tensors "
                                  "does not need; it is not unpickled (only dicts of tensors are read, as "
                                  "torch.load(weights_only=True) would, and without running any of its code)")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and is_count(pid[4])):
            raise _Malformed(f"a storage reference {reprlib.repr(pid)}")
        storage = self._storages.setdefault(pid[2], _Storage(pid[2], pid[1].dtype, pid[4]))
        if storage.dtype != pid[1].dtype:  # torch.load reads it as the first reference's dtype
            raise _Malformed(f"storage {reprlib.repr(pid[2])} named as {storage.dtype} and {pid[1].dtype}")
        return storage


def read_pickle_header_and_identity(path: str) -> tuple[dict[str, TensorInfo], tuple[int, ...]]:
    """Every tensor of a torch.save zip file as a TensorInfo, and the file's identity; CheckpointError naming the
    file (and the tensor) for anything that is not a contiguous tensor of a state dict this format holds."""
    try:
        with open_regular(path) as f:
            st = os.fstat(f.fileno())
            _refuse_not_zip(f, path)
            _refuse_huge_directory(f, path)
            with zipfile.ZipFile(f) as archive:
                records = _records(archive, path)
                prefix = _archive_prefix(records, path)
                _refuse_big_endian(archive, records, prefix, path)
                state = _unpickle(_read_record(archive, records[prefix + "data.pkl"], path), path)
                starts: dict[str, int] = {}
                infos = {name: _tensor_info(path, name, view, records, prefix, starts, f, st.st_size)
                         for name, view in _tensors(state, path).items()}
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: corrupt torch.save zip archive ({e})") from None
    return infos, file_identity(st)


def _refuse_not_zip(f, path: str) -> None:
    head = f.read(len(GIT_LFS_POINTER))
    if head == GIT_LFS_POINTER:
        raise CheckpointError(f"{path}: is a Git LFS pointer, not the weights (the repository was cloned without "
                              "git-lfs: run `git lfs pull` in it, or download the model)")
    f.seek(0)
    if not zipfile.is_zipfile(f):
        legacy = " It looks like torch's legacy (pre-1.6) format, whose tensors cannot be read in place." \
            if head.startswith(b"\x80\x02") else ""
        raise CheckpointError(f"{path}: not a torch.save zip archive (truncated or corrupt?).{legacy} Convert it "
                              "once to safetensors: load it with torch.load(..., weights_only=True) and save with "
                              "safetensors.torch.save_file")
    f.seek(0)


def _refuse_huge_directory(f, path: str) -> None:
    end_record = getattr(zipfile, "_EndRecData", None)  # the end record zipfile itself reads (zip64's where there
    end = end_record(f) if end_record else None  # is one): private, so a Python without it goes unchecked
    if end is not None and end[zipfile._ECD_SIZE] > MAX_DIRECTORY_BYTES:
        raise CheckpointError(f"{path}: its zip directory holds {end[zipfile._ECD_SIZE]} bytes, more than a state "
                              f"dict's records take (at most {MAX_DIRECTORY_BYTES}): corrupt file?")
    f.seek(0)


def _records(archive: zipfile.ZipFile, path: str) -> dict[str, zipfile.ZipInfo]:
    records: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        if info.filename in records:  # which one a reader takes is the reader's choice: refused
            raise CheckpointError(f"{path}: the archive holds two records named {info.filename!r} (corrupt file)")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            # zipfile would read the compressed size before cutting it to the size; torch refuses the archive
            raise CheckpointError(f"{path}: record {info.filename!r} declares {info.file_size} bytes stored in "
                                  f"{info.compress_size} (corrupt file)")
        records[info.filename] = info
    return records


def _archive_prefix(records: dict[str, zipfile.ZipInfo], path: str) -> str:
    """'<archive>/', the folder torch.save puts every record in; the one holding data.pkl."""
    prefixes = [name[:-len("data.pkl")] for name in records if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(prefixes) != 1:
        what = "no data.pkl record" if not prefixes else "several data.pkl records"
        raise CheckpointError(f"{path}: a zip archive with {what}, so not a torch.save checkpoint (a TorchScript "
                              "or other archive?)")
    if records[prefixes[0] + "data.pkl"].file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path}: its data.pkl holds more than {MAX_PICKLE_BYTES} bytes, far more than a state "
                              "dict's (corrupt file?)")
    return prefixes[0]


def _refuse_big_endian(archive: zipfile.ZipFile, records: dict[str, zipfile.ZipInfo], prefix: str, path: str) -> None:
    record = records.get(prefix + "byteorder")  # absent in files of torch < 2.1: little-endian
    if record is not None and (record.file_size > 16 or _read_record(archive, record, path) != b"little"):
        raise CheckpointError(f"{path}: tensors stored big-endian (or an unreadable byteorder record); only "
                              "little-endian checkpoints are read")


def _read_record(archive: zipfile.ZipFile, record: zipfile.ZipInfo, path: str) -> bytes:
    """A record zipfile reads whole: stored plainly, as torch.save writes it (zipfile raises RuntimeError for an
    encrypted record, and inflates a bzip2 or lzma one whole, whatever size it declares)."""
    if record.compress_type != zipfile.ZIP_STORED or record.flag_bits & 0x1:
        raise CheckpointError(f"{path}: record {record.filename!r} is compressed or encrypted (torch.save stores "
                              "its records plainly; was the file re-zipped?)")
    return archive.read(record)


def _unpickle(raw: bytes, path: str):
    try:
        _refuse_unguarded_opcodes(raw)
        return _LayoutUnpickler(raw, path).load()
    except CheckpointError:
        raise
    except _Malformed as e:
        raise CheckpointError(f"{path}: data.pkl holds {e}, not what torch.save writes (corrupt file?)") from None
    except Exception as e:  # a hostile pickle's wrong arguments, opcodes, memo references, depth
        raise CheckpointError(f"{path}: data.pkl cannot be read as a state dict ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None


def _refuse_unguarded_opcodes(raw: bytes) -> None:
    """What find_class cannot guard, refused before the unpickler meets it: EXT opcodes, and objects nested past
    MAX_NESTING. Each object's depth is followed as the pickle's stack machine runs: one more than the deepest
    object it is built from (an object added to in place: at least that)."""
    stack: list[int] = []
    marks: list[int] = []
    memo: dict = {}
    for op, arg, _ in pickletools.genops(raw):
        if op.name in _EXTENSION_OPCODES:
            raise _Malformed(f"an {op.name} opcode (copyreg's extension registry), which torch.save never writes")
        if op.name in _MEMO_PUTS:
            memo[len(memo) if op.name == "MEMOIZE" else arg] = stack[-1] if stack else 0
        elif op.name in _MEMO_GETS or op.name == "DUP":
            stack.append(memo.get(arg, 0) if op.name != "DUP" else stack[-1] if stack else 0)
        elif op.name == "POP" and marks and marks[-1] == len(stack):
            marks.pop()
        else:
            _run_on_depths(op, stack, marks)


def _run_on_depths(op: pickletools.OpcodeInfo, stack: list[int], marks: list[int]) -> None:
    """One opcode's effect on the depths of the objects on the stack (a malformed pickle's underflow is left for
    the unpickler to refuse)."""
    before = op.stack_before
    if pickletools.markobject in before:
        mark = marks.pop() if marks else len(stack)
        used, below = stack[mark:], before.index(pickletools.markobject)
        del stack[mark:]
    else:
        used, below = [], len(before)
    used = [stack.pop() if stack else 0 for _ in range(below)][::-1] + used
    depth = 1 + max(used, default=-1)
    if op.name in _IN_PLACE_OPCODES and used:
        depth = max(used[0], 1 + max(used[1:], default=-1))
    if depth > MAX_NESTING:
        raise _Malformed(f"objects nested more than {MAX_NESTING} deep")
    for pushed in op.stack_after:
        if pushed is pickletools.markobject:
            marks.append(len(stack))
        else:
            stack.append(depth)


def _tensors(state, path: str) -> dict[str, _TensorView]:
    """The state dict's tensors by name. Entries that are not a tensor under a name (a training step, a config
    dict) are passed over with a warning, as mergekit passes them over (it reads only the names a merge asks for);
    a dict with no tensor is refused (a state dict nested under 'state_dict' or 'model': mergekit fails on it)."""
    if not isinstance(state, dict):
        what = "a tensor" if isinstance(state, _TensorView) else f"a pickled {type(state).__name__}"
        raise CheckpointError(f"{path}: holds {what}, not a state dict (a dict of tensor names to tensors)")
    tensors, others = {}, []
    for name, value in dict.items(state):  # not state.items: BUILD may have set an attribute of that name
        if isinstance(name, str) and is_text(name) and isinstance(value, _TensorView):
            tensors[name] = value
        else:
            others.append(name)
    if others and not tensors:
        raise CheckpointError(f"{path}: {reprlib.repr(others[0])} holds a {type(state[others[0]]).__name__}, not a "
                              "tensor, and no entry is one (a state dict nested in a training checkpoint? mergekit "
                              "does not read it either)")
    if others:
        shown = ", ".join(map(reprlib.repr, others[:3])) + (", ..." if len(others) > 3 else "")
        warnings.warn(f"{path}: passes over {len(others)} entries that are not tensors under a name ({shown}), as "
                      "mergekit-yaml does", stacklevel=2)
    return tensors


def _tensor_info(path: str, name: str, view: _TensorView, records: dict[str, zipfile.ZipInfo], prefix: str,
                 starts: dict[str, int], f, file_size: int) -> TensorInfo:
    """Where tensor `name`'s bytes lie in the file: its storage record's data, from the view's offset."""
    numel = element_count(view.shape)
    if (view.dtype not in SAFETENSORS_DTYPES.values() or numel is None
            or (numel == 0 and not torch_can_lay_out(view.dtype, view.shape))):
        raise CheckpointError(f"{path}: tensor {name!r}: unsupported dtype or shape ({view.dtype}, {list(view.shape)})")
    if numel and not _is_contiguous(view.shape, view.stride):  # torch lays an empty tensor over any strides
        raise CheckpointError(f"{path}: tensor {name!r} is a strided view of its storage (shape {list(view.shape)}, "
                              f"stride {list(view.stride)}), which cannot be read in place; save it contiguous")
    record = records.get(f"{prefix}data/{view.storage.key}")
    if record is None:
        raise CheckpointError(f"{path}: tensor {name!r}: its storage record data/{view.storage.key} is missing")
    if record.external_attr & _DOS_DIRECTORY or record.is_dir():
        raise CheckpointError(f"{path}: tensor {name!r}: its storage record is marked a directory, whose bytes "
                              "torch.load does not read (it gives uninitialized memory): corrupt file")
    if record.compress_type != zipfile.ZIP_STORED or record.flag_bits & 0x1:
        raise CheckpointError(f"{path}: tensor {name!r}: its storage record is compressed or encrypted (torch.save "
                              "stores them plainly; was the file re-zipped?)")
    storage_bytes = view.storage.numel * view.storage.dtype.itemsize
    # an empty tensor's offset is any count (torch.load reads it): it has no bytes to place
    first, nbytes = view.offset * view.dtype.itemsize if numel else 0, numel * view.dtype.itemsize
    if record.file_size != storage_bytes or (numel and first + nbytes > storage_bytes):
        raise CheckpointError(f"{path}: tensor {name!r}: its bytes [{first}, {first + nbytes}) do not lie in its "
                              f"storage record of {record.file_size} bytes ({storage_bytes} declared): corrupt file")
    if record.filename not in starts:
        starts[record.filename] = _data_start(f, record, file_size, path)
    return TensorInfo(name, path, view.dtype, view.shape, starts[record.filename] + first, nbytes)


def _is_contiguous(shape: tuple, stride: tuple) -> bool:
    expected = 1
    for size, step in reversed(tuple(zip(shape, stride))):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _data_start(f, record: zipfile.ZipInfo, file_size: int, path: str) -> int:
    """The offset of a record's bytes: past its local header, whose extra field (torch's alignment padding) the
    central directory does not repeat."""
    f.seek(record.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(header)[0] != _LOCAL_SIGNATURE:
        raise CheckpointError(f"{path}: record {record.filename!r}: no local header where the archive says "
                              "(corrupt file)")
    _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    start = record.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    if start + record.file_size > file_size:
        raise CheckpointError(f"{path}: record {record.filename!r} runs past the end of the file (truncated file?)")
    return start
