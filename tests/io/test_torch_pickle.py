"""torch.save zip files read in place: layouts against torch.load's tensors, and the files refused without running
any of their code."""
import copyreg
import io
import os
import pickletools
import random
import tracemalloc
import warnings
import zipfile
from collections import OrderedDict

import pytest
import torch

from merge_engine.errors import CheckpointError
from merge_engine.io.torch_pickle import MAX_DIRECTORY_BYTES, read_pickle_header_and_identity


def read_all(path) -> dict[str, torch.Tensor]:
    """Every tensor as the engine reads it: the bytes where its TensorInfo says."""
    infos, _ = read_pickle_header_and_identity(str(path))
    out = {}
    with open(path, "rb") as f:
        for name, info in infos.items():
            f.seek(info.data_start)
            raw = bytearray(f.read(info.nbytes))
            out[name] = torch.frombuffer(raw, dtype=info.dtype).view(info.shape) if raw else \
                torch.empty(info.shape, dtype=info.dtype)
    return out


def assert_reads_as_torch_load(path) -> None:
    want = torch.load(path, weights_only=True)
    got = read_all(path)
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                                   torch.int32, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_reads_every_dtype_as_torch_load(tmp_path, dtype):
    g = torch.Generator().manual_seed(5)
    values = torch.randn(7, 13, generator=g) * 3
    state = {"w": values.to(dtype), "b": values[0].to(dtype), "empty": torch.zeros(0, 3, dtype=dtype),
             "scalar": values[1, 2].to(dtype)}
    torch.save(state, tmp_path / "p.bin")
    assert_reads_as_torch_load(tmp_path / "p.bin")


def test_state_dicts_with_tied_views_offsets_and_parameters(tmp_path):
    """A real module's state dict (an OrderedDict with _metadata), a head sharing its embedding's storage, slices of
    one storage at offsets, and nn.Parameter values: each tensor at its own bytes."""
    module = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 11, bias=True)).to(torch.bfloat16)
    module[1].weight = module[0].weight
    state = module.state_dict()
    assert isinstance(state, OrderedDict) and hasattr(state, "_metadata")
    whole = torch.arange(60, dtype=torch.float32)
    state.update({"rows": whole.view(6, 10)[2:5], "tail": whole[37:], "param": torch.nn.Parameter(torch.randn(3, 2))})
    torch.save(state, tmp_path / "p.bin")
    infos, _ = read_pickle_header_and_identity(str(tmp_path / "p.bin"))
    assert infos["0.weight"].data_start == infos["1.weight"].data_start
    assert infos["tail"].data_start == infos["rows"].data_start - 20 * 4 + 37 * 4
    assert_reads_as_torch_load(tmp_path / "p.bin")


def test_identity_is_the_files(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "p.bin")
    st = os.stat(tmp_path / "p.bin")
    assert read_pickle_header_and_identity(str(tmp_path / "p.bin"))[1] == (st.st_dev, st.st_ino, st.st_size,
                                                                             st.st_mtime_ns)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_code_in_the_pickle_is_refused_by_name_and_never_run(tmp_path):
    marker = str(tmp_path / "ran")
    torch.save({"w": torch.ones(2), "x": RunsCode(marker)}, tmp_path / "p.bin")
    with pytest.raises(CheckpointError, match=r"p\.bin: its pickle refers to posix\.mkdir"):
        read_pickle_header_and_identity(str(tmp_path / "p.bin"))
    assert not os.path.exists(marker)


def replace_pickle(path, data: bytes, *, compress=False, byteorder=None, drop=None) -> None:
    """Rewrite a torch.save archive with another data.pkl (and other changes to its records)."""
    with zipfile.ZipFile(path) as old:
        records = [(info, old.read(info)) for info in old.infolist()]
    with zipfile.ZipFile(path, "w") as new:
        for info, raw in records:
            if drop and info.filename.endswith(drop):
                continue
            raw = data if info.filename.endswith("/data.pkl") else \
                byteorder if byteorder and info.filename.endswith("/byteorder") else raw
            new.writestr(info.filename, raw, zipfile.ZIP_DEFLATED if compress and "/data/" in info.filename
                         else zipfile.ZIP_STORED)


def pickle_of(path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def test_state_set_on_a_shared_layout_object_is_refused_and_changes_nothing(tmp_path):
    """BUILD on the storage type object: a hostile pickle must not change how later files are read."""
    torch.save({"w": torch.arange(4.0)}, tmp_path / "good.bin")
    hostile = (b"\x80\x02ctorch\nFloatStorage\nq\x00}q\x01X\x05\x00\x00\x00dtypeq\x02ctorch\nint8\nq\x03s"
               b"b.")
    pickletools.dis(hostile, out=io.StringIO())  # a well-formed pickle: only its meaning is hostile
    torch.save({"w": torch.arange(4.0)}, tmp_path / "bad.bin")
    replace_pickle(tmp_path / "bad.bin", hostile)
    with pytest.raises(CheckpointError, match="state set on a tensor's layout"):
        read_pickle_header_and_identity(str(tmp_path / "bad.bin"))
    assert_reads_as_torch_load(tmp_path / "good.bin")


@pytest.mark.parametrize("case,match", [
    ("legacy", "legacy"),
    ("truncated", "not a torch.save zip archive"),
    ("lfs", "Git LFS pointer"),
    ("compressed", "'w': its storage record is compressed"),
    ("big_endian", "big-endian"),
    ("missing_storage", r"'w': its storage record data/0 is missing"),
    ("strided", r"'w' is a strided view"),
    ("not_dict", "holds a pickled list, not a state dict"),
    ("wrapped", r"'state_dict' holds a dict, not a tensor, and no entry is one"),
    ("short_storage", r"'w': its bytes \[0, 28\) do not lie in its storage record of 24 bytes"),
    ("script", "refers to __torch__"),
    ("no_pickle", "no data.pkl record"),
    ("garbage_pickle", "data.pkl cannot be read"),
])
def test_files_refused_name_file_and_tensor(tmp_path, case, match):
    path = tmp_path / "p.bin"
    state = {"w": torch.arange(6.0)}
    if case == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif case == "strided":
        torch.save({"w": torch.arange(6.0).view(2, 3).t()}, path)
    elif case == "not_dict":
        torch.save([torch.ones(1)], path)
    elif case == "wrapped":
        torch.save({"state_dict": state}, path)
    elif case == "script":
        with warnings.catch_warnings():  # (torch.jit is deprecated; such archives still exist)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    else:
        torch.save(state, path)
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif case == "lfs":
        path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    elif case == "compressed":
        replace_pickle(path, pickle_of(path), compress=True)
    elif case == "big_endian":
        replace_pickle(path, pickle_of(path), byteorder=b"big")
    elif case == "missing_storage":
        replace_pickle(path, pickle_of(path), drop="/data/0")
    elif case == "short_storage":  # the storage record declares 6 elements and holds them; the view asks for 7
        replace_pickle(path, pickle_of(path).replace(b"K\x06\x85", b"K\x07\x85"))
    elif case == "no_pickle":
        replace_pickle(path, b"", drop="/data.pkl")
    elif case == "garbage_pickle":
        replace_pickle(path, b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R.")
    with pytest.raises(CheckpointError, match=match) as e:
        read_pickle_header_and_identity(str(path))
    assert str(path) in str(e.value)


def test_mutated_files_are_read_exactly_or_refused(tmp_path):
    """Seeded byte mutations of a whole file and of its pickle: each is refused with a CheckpointError, or read, and
    then every tensor it lists lies within the file (nothing else escapes, nothing runs)."""
    module = torch.nn.Linear(5, 3)
    source = tmp_path / "source.bin"
    torch.save(module.state_dict(), source)
    raw, pkl = source.read_bytes(), pickle_of(source)
    rng = random.Random(11)
    outcomes = {"read": 0, "refused": 0}
    for i in range(160):
        path = tmp_path / f"m{i}.bin"
        if i % 2:
            mutant = bytearray(pkl)
            for _ in range(rng.randint(1, 3)):
                mutant[rng.randrange(len(mutant))] = rng.randrange(256)
            path.write_bytes(raw)
            replace_pickle(path, bytes(mutant))
        else:
            mutant = bytearray(raw)
            for _ in range(rng.randint(1, 4)):
                mutant[rng.randrange(len(mutant))] = rng.randrange(256)
            path.write_bytes(bytes(mutant))
        try:
            infos, _ = read_pickle_header_and_identity(str(path))
        except CheckpointError as e:
            assert str(path) in str(e)
            outcomes["refused"] += 1
            continue
        size = os.path.getsize(path)
        assert all(0 <= info.data_start and info.data_start + info.nbytes <= size for info in infos.values())
        outcomes["read"] += 1
    assert outcomes["read"] and outcomes["refused"]  # both kinds of mutant were met



def rezip(path, *, method=None, encrypt=None) -> None:
    """Rewrite a torch.save archive with the record ending in `method[0]` compressed by method[1], or with the
    record ending in `encrypt` flagged encrypted (its bytes left as they are)."""
    with zipfile.ZipFile(path) as old:
        records = [(info, old.read(info)) for info in old.infolist()]
    with zipfile.ZipFile(path, "w") as new:
        for info, raw in records:
            compress = method[1] if method and info.filename.endswith(method[0]) else zipfile.ZIP_STORED
            new.writestr(info.filename, raw, compress)
    if encrypt:
        raw = bytearray(path.read_bytes())
        for at in range(len(raw) - 46):  # central directory entries: the flag bits at +8, the name at +46
            if raw[at:at + 4] == b"PK\x01\x02":
                name_length = int.from_bytes(raw[at + 28:at + 30], "little")
                if raw[at + 46:at + 46 + name_length].endswith(encrypt.encode()):
                    raw[at + 8] |= 1
        path.write_bytes(bytes(raw))


@pytest.mark.parametrize("change", [{"encrypt": "/data.pkl"}, {"encrypt": "/byteorder"},
                                    {"method": ("/data.pkl", zipfile.ZIP_BZIP2)},
                                    {"method": ("/byteorder", zipfile.ZIP_LZMA)},
                                    {"method": ("/data.pkl", zipfile.ZIP_DEFLATED)}])
def test_pickle_and_byteorder_records_compressed_or_encrypted_are_refused_unread(tmp_path, change):
    """zipfile raises RuntimeError for an encrypted record, and inflates a bzip2 or lzma one whole whatever size it
    declares (a few kilobytes of bzip2 inflate to gigabytes): such records are refused before they are read."""
    path = tmp_path / "p.bin"
    torch.save({"w": torch.arange(6.0)}, path)
    rezip(path, **change)
    with pytest.raises(CheckpointError, match=r"p\.bin: record '.*(data\.pkl|byteorder)' is compressed or encrypted"):
        read_pickle_header_and_identity(str(path))


def test_one_storage_named_with_two_dtypes_is_refused(tmp_path):
    """torch.load reads every reference to a storage as the dtype its first one names (torch.save never writes two):
    the second tensor is refused, not read as other bytes than torch.load's."""
    path = tmp_path / "p.bin"
    torch.save({"a": torch.arange(4.0), "b": torch.arange(4, dtype=torch.int32)}, path)
    replace_pickle(path, pickle_of(path).replace(b"X\x01\x00\x00\x001", b"X\x01\x00\x00\x000"))  # b's storage: a's
    assert torch.load(path, weights_only=True)["b"].dtype == torch.float32
    with pytest.raises(CheckpointError, match=r"p\.bin: data\.pkl holds storage '0' named as torch\.float32 and "
                                              r"torch\.int32"):
        read_pickle_header_and_identity(str(path))


@pytest.mark.parametrize("where", ["storage reference", "key"])
def test_hostile_values_are_named_in_a_few_characters(tmp_path, where):
    """A 100 kB string referenced 2000 times (4 kB of pickle) is 200 MB when printed whole: the error shows its
    start only, and building it takes no more memory than the file's."""
    path = tmp_path / "p.bin"
    torch.save({"w": torch.ones(2)}, path)
    big = b"X" + (100_000).to_bytes(4, "little") + b"a" * 100_000 + b"q\x00"
    many = b"(" + b"h\x00" * 2000 + b"t"
    replace_pickle(path, b"\x80\x02}X\x01\x00\x00\x00w" + big + many + b"Qs." if where == "storage reference" else
                   b"\x80\x02}" + big + b"0" + many + b"K\x01s.")
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"p\.bin: ") as e:
            read_pickle_header_and_identity(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(str(e.value)) < 1000 and peak < 20_000_000


def test_extension_opcodes_are_refused_whatever_copyreg_holds(tmp_path, monkeypatch):
    """EXT1/2/4 look an object up in copyreg's process-wide extension cache before find_class: where another
    unpickle in the process cached a real function under a code, a hostile pickle would call it (and a code first
    seen here would cache a layout stand-in for every later unpickle)."""
    marker = str(tmp_path / "ran")
    monkeypatch.setitem(copyreg._extension_registry, ("posix", "mkdir"), 240)
    monkeypatch.setitem(copyreg._inverted_registry, 240, ("posix", "mkdir"))
    monkeypatch.setitem(copyreg._extension_cache, 240, os.mkdir)  # as an earlier pickle.loads leaves it
    monkeypatch.setitem(copyreg._extension_registry, ("torch._utils", "_rebuild_tensor_v2"), 241)
    monkeypatch.setitem(copyreg._inverted_registry, 241, ("torch._utils", "_rebuild_tensor_v2"))
    path = tmp_path / "p.bin"
    torch.save({"w": torch.ones(2)}, path)
    arg = marker.encode()
    for hostile in (b"\x80\x02}X\x01\x00\x00\x00w\x82\xf0X" + len(arg).to_bytes(4, "little") + arg + b"\x85Rs.",
                    b"\x80\x02}X\x01\x00\x00\x00w\x82\xf1s."):
        replace_pickle(path, hostile)
        with pytest.raises(CheckpointError, match=r"p\.bin: data\.pkl holds an EXT1 opcode"):
            read_pickle_header_and_identity(str(path))
    assert not os.path.exists(marker) and 241 not in copyreg._extension_cache


@pytest.mark.parametrize("nested", [b")" + b"\x85" * 1_000_000 + b"K\x01s.",  # a dict key: hashing it recurses
                                    b"X\x01\x00\x00\x00w" + b"]" * 300 + b"a" * 299 + b"s."])
def test_objects_nested_past_a_state_dicts_depth_are_refused(tmp_path, nested):
    """A key of tuples nested a million deep (1 MB of pickle) overflowed the C stack when the dict hashed it."""
    path = tmp_path / "p.bin"
    torch.save({"w": torch.ones(2)}, path)
    replace_pickle(path, b"\x80\x02}" + nested)
    with pytest.raises(CheckpointError, match=r"p\.bin: data\.pkl holds objects nested more than 100 deep"):
        read_pickle_header_and_identity(str(path))


def test_empty_tensors_read_whatever_their_strides_and_offsets(tmp_path):
    """torch lays an empty tensor over any strides and storage offset: read as torch.load reads it, its (absent)
    bytes placed at its storage record, inside the file."""
    path = tmp_path / "p.bin"
    x = torch.arange(12.0).view(3, 4)
    torch.save({"cols": x[:, :0], "rows": x[3:], "expanded": torch.ones(3).expand(2, 3)[:0], "w": x}, path)
    assert_reads_as_torch_load(path)
    torch.save({"z": torch.zeros(0)}, path)
    replace_pickle(path, pickle_of(path).replace(b"K\x00K\x00\x85", b"\x8a\x08" + b"\xff" * 7 + b"\x7fK\x00\x85"))
    assert_reads_as_torch_load(path)
    infos, _ = read_pickle_header_and_identity(str(path))
    assert infos["z"].data_start <= os.path.getsize(path)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.complex64, torch.float8_e4m3fnuz])
def test_tensors_of_dtypes_not_read_are_refused_as_such(tmp_path, dtype):
    path = tmp_path / "p.bin"
    torch.save({"w": torch.zeros(2, dtype=dtype)}, path)
    with pytest.raises(CheckpointError, match=rf"p\.bin: holds tensors of dtype {str(dtype)[6:]}, which merge_engine"
                                              " does not read"):
        read_pickle_header_and_identity(str(path))


@pytest.mark.parametrize("external_attributes", [0x10, 0xFFFF])
def test_a_storage_record_marked_a_directory_is_refused(tmp_path, external_attributes):
    """torch.load's zip reader (miniz) reads nothing into a record whose DOS attributes mark it a directory: the
    tensor it gives is uninitialized memory, not the record's bytes merge_engine would read."""
    path = tmp_path / "p.bin"
    torch.save({"w": torch.arange(6.0)}, path)
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, raw in entries:
            if info.filename.endswith("/data/0"):
                info.external_attr = external_attributes
            z.writestr(info, raw)
    with pytest.raises(CheckpointError, match=r"p\.bin: tensor 'w': its storage record is marked a directory"):
        read_pickle_header_and_identity(str(path))


def test_entries_that_are_not_tensors_are_passed_over_as_mergekit_does(tmp_path):
    """mergekit reads only the names a merge asks for, so a training step, a config dict or a tensor under a key
    that is not a name beside the weights merge as if absent: passed over, with a warning naming them."""
    path = tmp_path / "p.bin"
    torch.save({"w": torch.arange(6.0), "step": 3, "config": {"lr": 0.1}, 7: torch.ones(2)}, path)
    with pytest.warns(UserWarning, match=r"p\.bin: passes over 3 entries that are not tensors under a name "
                                         r"\('step', 'config', 7\)"):
        tensors = read_all(path)
    assert list(tensors) == ["w"] and torch.equal(tensors["w"], torch.arange(6.0))


def set_compressed_size(path, suffix: str, size: int) -> None:
    """Rewrite the compressed size the central directory and the local header give the record ending in suffix."""
    raw = bytearray(path.read_bytes())
    for signature, name_at, size_at in ((b"PK\x01\x02", 46, 20), (b"PK\x03\x04", 30, 18)):
        at = raw.find(signature)
        while at >= 0:
            name_length = int.from_bytes(raw[at + name_at - 18:at + name_at - 16], "little")
            if raw[at + name_at:at + name_at + name_length].endswith(suffix.encode()):
                raw[at + size_at:at + size_at + 4] = size.to_bytes(4, "little")
            at = raw.find(signature, at + 4)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("suffix", ["/data.pkl", "/data/0"])
def test_a_stored_record_whose_compressed_size_is_not_its_size_is_refused(tmp_path, suffix):
    """zipfile reads a stored record's compressed size from the file before cutting it to its size: a data.pkl of
    300 bytes that claims 1 MB compressed read 1 MB (2 GB in a large checkpoint); torch's reader refuses such an
    archive whole."""
    path = tmp_path / "p.bin"
    torch.save({"w": torch.zeros(1_000_000, dtype=torch.uint8)}, path)
    set_compressed_size(path, suffix, 1_000_000 - 1)
    with pytest.raises(CheckpointError, match=rf"p\.bin: record '.*{suffix}' declares \d+ bytes stored in \d+"):
        read_pickle_header_and_identity(str(path))


def test_a_central_directory_larger_than_a_state_dicts_is_refused_unparsed(tmp_path):
    """zipfile builds an object of ~450 bytes for each central directory entry of ~50: a 110 MB file of entries
    took 1 GB of memory to open. A directory past what MAX_PICKLE_BYTES of pickle can name is refused unread."""
    path = tmp_path / "p.bin"
    torch.save({"w": torch.ones(2)}, path)
    raw = path.read_bytes()
    end = raw.rindex(b"PK\x06\x06") + 40  # torch writes zip64's end record, whose directory size zipfile reads
    assert int.from_bytes(raw[end:end + 8], "little") < MAX_DIRECTORY_BYTES
    path.write_bytes(raw[:end] + (MAX_DIRECTORY_BYTES + 1).to_bytes(8, "little") + raw[end + 8:])
    with pytest.raises(CheckpointError, match=rf"p\.bin: its zip directory holds {MAX_DIRECTORY_BYTES + 1} bytes"):
        read_pickle_header_and_identity(str(path))


def test_buffers_and_tensors_with_python_attributes_read_as_torch_load(tmp_path):
    """torch.save pickles an nn.Buffer, or a tensor given Python attributes, through
    torch._tensor._rebuild_from_type_v2(rebuild, torch.Tensor, args, attributes): torch.load reads it."""
    path = tmp_path / "p.bin"
    tagged = torch.arange(4.0)
    tagged.note = "kept by torch.load, not read here"
    torch.save({"buffer": torch.nn.Buffer(torch.arange(6, dtype=torch.int32)), "tagged": tagged}, path)
    assert_reads_as_torch_load(path)


def test_attributes_set_on_the_state_dict_do_not_change_what_it_holds(tmp_path):
    """BUILD sets attributes on the state dict (torch.save's _metadata; torch.load sets any): one named `items`
    shadowed the method, and the dict read as empty. Its entries are read as the dict holds them."""
    path = tmp_path / "p.bin"
    torch.save(OrderedDict(w=torch.arange(6.0)), path)
    ordered_dict_at_memo_0 = pickle_of(path)
    assert ordered_dict_at_memo_0.startswith(b"\x80\x02ccollections\nOrderedDict\nq\x00")
    replace_pickle(path, ordered_dict_at_memo_0[:-1] + b"}X\x05\x00\x00\x00itemsh\x00sb.")
    want = dict(dict.items(torch.load(path, weights_only=True)))
    assert list(want) == ["w"] and torch.equal(read_all(path)["w"], want["w"])
