"""Header parsing and validation: round trips with the safetensors library, and corrupt files."""
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_engine.errors import CheckpointError
from merge_engine.io.safetensors_format import build_header, read_header


def test_reads_what_safetensors_writes(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "c": torch.arange(4, dtype=torch.int64),
               "d": torch.randn(2, 2).half(), "e": torch.zeros(0)}
    path = str(tmp_path / "x.safetensors")
    save_file(tensors, path)
    infos = read_header(path)
    assert set(infos) == set(tensors)
    for name, t in tensors.items():
        assert infos[name].dtype == t.dtype and tuple(infos[name].shape) == tuple(t.shape)
        assert infos[name].numel == t.numel()


def test_build_header_is_readable_by_safetensors(tmp_path):
    entries = [("w", torch.float32, (2, 3)), ("v", torch.bfloat16, (5,))]
    header, offsets = build_header(entries)
    assert len(header) % 8 == 0
    w, v = torch.randn(2, 3), torch.randn(5).bfloat16()
    path = tmp_path / "y.safetensors"
    with open(path, "wb") as f:
        f.write(header)
        f.write(w.numpy().tobytes())
        f.write(v.view(torch.int16).numpy().tobytes())
    assert offsets["v"] == len(header) + 24
    loaded = load_file(str(path))
    assert torch.equal(loaded["w"], w) and torch.equal(loaded["v"], v)


def write_raw(path, header_obj, data=b"", length=None):
    raw = json.dumps(header_obj).encode() if not isinstance(header_obj, bytes) else header_obj
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


@pytest.mark.parametrize("case,match", [
    ("empty", "truncated"),
    ("huge_length", "header"),
    ("bad_json", "invalid JSON"),
    ("not_object", "not a JSON object"),
    ("bad_dtype", "'w'"),
    ("shape_vs_bytes", "'w'"),
    ("past_end", "'w'"),
])
def test_corrupt_headers_name_file_and_tensor(tmp_path, case, match):
    path = tmp_path / "bad.safetensors"
    good = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    if case == "empty":
        path.write_bytes(b"\x01\x02")
    elif case == "huge_length":
        write_raw(path, good, b"\0" * 8, length=10**12)
    elif case == "bad_json":
        write_raw(path, b'{"w": {"dtype": ', b"\0" * 8)
    elif case == "not_object":
        write_raw(path, [1, 2], b"")
    elif case == "bad_dtype":
        write_raw(path, {"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "shape_vs_bytes":
        write_raw(path, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "past_end":
        write_raw(path, good, b"\0" * 4)
    with pytest.raises(CheckpointError, match=match) as err:
        read_header(str(path))
    assert str(path) in str(err.value)


def test_names_that_are_not_text_and_sizes_beyond_int64_are_refused(tmp_path):
    """The safetensors library refuses both; the engine would write an output it cannot load, or overflow."""
    surrogate = write_raw(tmp_path / "s.safetensors", b'{"a\\ud800": {"dtype": "F32", "shape": [2], '
                                                      b'"data_offsets": [0, 8]}}', b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"s\.safetensors: tensor 'a\\ud800': the name is not text"):
        read_header(surrogate)
    huge = write_raw(tmp_path / "h.safetensors", {"w": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}})
    with pytest.raises(CheckpointError, match=r"h\.safetensors: tensor 'w': malformed header entry"):
        read_header(huge)


@pytest.mark.parametrize("shape,refused", [([2**62, 2**62, 0], True), ([2**40, 2**30, 0, 5], True),
                                           ([0, 2**62, 2**62], False), ([2**62, 0, 2**62], False)])
def test_a_shape_whose_running_product_overflows_is_refused_as_the_library_refuses_it(tmp_path, shape, refused):
    """Its element count is 0, but torch computes it with the same running product and overflows mid-merge."""
    path = write_raw(tmp_path / "z.safetensors", {"z": {"dtype": "BF16", "shape": shape, "data_offsets": [0, 0]}})
    try:
        with safe_open(path, "pt"):
            pass
    except Exception as e:
        assert refused and "overflow" in str(e)
    else:
        assert not refused
    if refused:
        with pytest.raises(CheckpointError, match=r"z\.safetensors: tensor 'z': shape .* overflows computing its size"):
            read_header(path)
    else:
        assert read_header(path)["z"].numel == 0


@pytest.mark.parametrize("dtype,bits", [("U16", 16), ("U32", 32), ("U64", 64), ("F8_E8M0", 8), ("F4", 4),
                                        ("F6_E2M3", 6), ("F6_E3M2", 6), ("C64", 64), ("F8_E4M3FNUZ", 8),
                                        ("F8_E5M2FNUZ", 8)])
def test_a_dtype_of_the_format_that_is_not_merged_is_named(tmp_path, dtype, bits):
    """The library reads these: the header is not malformed, merge_engine does not merge them."""
    path = write_raw(tmp_path / "d.safetensors", {"t": {"dtype": dtype, "shape": [8], "data_offsets": [0, bits]}},
                     bytes(bits))
    with safe_open(path, "pt") as f:
        assert f.keys() == ["t"]
    with pytest.raises(CheckpointError, match=rf"d\.safetensors: tensor 't': unsupported dtype {dtype} \(merge_engine "
                                              "reads F64, F32, F16, BF16"):
        read_header(path)


T = b'"t": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}'


@pytest.mark.parametrize("metadata,refused", [(b"null", False), (b'{"a": "b"}', False), (b'{"a": "\\ud800"}', True),
                                              (b'{"\\udfff": "a"}', True), (b'{"a": null}', True), (b"[]", True)])
def test_metadata_is_read_as_the_library_reads_it(tmp_path, metadata, refused):
    """null is no metadata; half a surrogate pair, in a key or a value, is not text."""
    path = write_raw(tmp_path / "m.safetensors", b'{"__metadata__": ' + metadata + b", " + T + b"}", b"ab")
    try:
        with safe_open(path, "pt"):
            pass
    except Exception:
        assert refused
    else:
        assert not refused
    if refused:
        with pytest.raises(CheckpointError, match=r"m\.safetensors: corrupt safetensors header \(__metadata__ must map"):
            read_header(path)
    else:
        assert list(read_header(path)) == ["t"]


@pytest.mark.parametrize("entry,problem", [
    (b'"shape": [2], "data_offsets": [0, 8], "note": {"a": [NaN]}', "tensor 'w': its header entry holds NaN, which is not"),
    (b'"shape": [2], "data_offsets": [0, 8], "note": -Infinity', "tensor 'w': its header entry holds -Infinity"),
    (b'"shape": [-0, 2], "data_offsets": [0, 0]', r"tensor 'w': malformed header entry"),
])
def test_numbers_the_library_refuses_in_a_header_are_refused(tmp_path, entry, problem):
    """Python's json takes NaN and Infinity; the library (serde_json) refuses them, and reads -0 as a float."""
    path = write_raw(tmp_path / "n.safetensors", b'{"w": {"dtype": "F32", ' + entry + b"}}",
                     bytes(8 if b"[0, 8]" in entry else 0))
    with pytest.raises(Exception, match="invalid"):
        safe_open(path, "pt")
    with pytest.raises(CheckpointError, match=rf"n\.safetensors: .*{problem}"):
        read_header(path)


def test_a_git_lfs_pointer_is_named_as_one(tmp_path):
    """What a model repository cloned without git-lfs holds in place of each weights file."""
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 4976698672\n")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: is a Git LFS pointer, not the weights .*git lfs pull"):
        read_header(str(path))


@pytest.mark.parametrize("name", ["line\nbreak", "nul\x00", "carriage\rreturn"])
@pytest.mark.parametrize("entry,data", [({"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}, 8),
                                        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, 8),
                                        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, 4),
                                        ({"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}, 12)])
def test_a_tensor_name_with_control_characters_is_named_on_one_line(tmp_path, name, entry, data):
    """The format allows any text as a name: the error quotes it escaped, so the message stays one line."""
    path = write_raw(tmp_path / "c.safetensors", {name: entry}, bytes(data))
    with pytest.raises(CheckpointError) as err:
        read_header(path)
    message = str(err.value)
    assert message.startswith(f"{path}: tensor {name!r}") and message.isprintable(), message


@pytest.mark.parametrize("extra", [b'"\\ud800": 1', b'"note": "\\udfff"', b'"note": {"a": ["x\\ud83d"]}'])
def test_a_lone_surrogate_anywhere_in_a_tensor_entry_is_refused_as_the_library_refuses_it(tmp_path, extra):
    """Fields the format does not define are passed over, but their text must still be text."""
    path = write_raw(tmp_path / "u.safetensors", b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], '
                     + extra + b"}}", bytes(8))
    with pytest.raises(Exception, match="escape"):
        safe_open(path, "pt")
    with pytest.raises(CheckpointError, match=r"u\.safetensors: tensor 'w': its header entry holds '.*', which is not "
                                              r"text \(a lone surrogate escape\)"):
        read_header(path)


@pytest.mark.parametrize("shape", [[0, 3, 2**62], [0, 3, 2**61, 2], [2**62, 0, 2**63 - 1, 2]])
def test_an_empty_shape_torch_cannot_stride_is_refused_with_the_header(tmp_path, shape):
    """Its element count is 0, but its strides overflow int64 so that no torch tensor has it: the library opens
    the file and fails reading the tensor; the engine would fail mid-merge."""
    path = write_raw(tmp_path / "e.safetensors", {"e": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    with safe_open(path, "pt") as f, pytest.raises(RuntimeError, match="Stride calculation overflowed"):
        f.get_tensor("e")
    with pytest.raises(CheckpointError, match=r"e\.safetensors: tensor 'e': shape .* has no elements, but torch cannot "
                                              "lay it out"):
        read_header(path)


def test_a_tensor_named_twice_is_refused_even_where_the_library_takes_it(tmp_path):
    """The library keeps the later entry, so one repeated exactly passes its layout check; the engine refuses
    any repeated key (docs/methods.md)."""
    entry = b'"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}'
    path = write_raw(tmp_path / "t.safetensors", b"{" + entry + b", " + entry + b"}", b"\x01\x02")
    with safe_open(path, "pt") as f:
        assert f.keys() == ["w"]
    with pytest.raises(CheckpointError, match=r"t\.safetensors: corrupt safetensors header: invalid JSON \(the key 'w' "
                                              r"appears twice\)"):
        read_header(path)


@pytest.mark.parametrize("depth", [125, 126])
@pytest.mark.parametrize("opener,closer", [(b"[", b"]"), (b'{"a": ', b"}")])
def test_a_header_is_nested_at_most_as_deep_as_the_library_parses(tmp_path, depth, opener, closer):
    """serde_json, the library's parser, takes 127 levels of arrays and objects: the header's object, a tensor's
    entry, and 125 more in a field the format does not define."""
    extra = opener * depth + (b"1" if opener != b"[" else b"") + closer * depth
    path = write_raw(tmp_path / "n.safetensors", b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": '
                     + extra + b"}}", b"\x01")
    refused = depth > 125
    try:
        with safe_open(path, "pt"):
            pass
    except Exception as e:
        assert refused and "recursion limit" in str(e)
    else:
        assert not refused
    if refused:
        with pytest.raises(CheckpointError, match=r"n\.safetensors: tensor 'w': its header entry is nested deeper than"):
            read_header(path)
    else:
        assert list(read_header(path)) == ["w"]


@pytest.mark.parametrize("number,refused", [(b"1e400", True), (b"-1e400", True), (b"9" * 400, True), (b"1e308", False),
                                            (b"9" * 300, False), (b"true", False)])
def test_a_number_beyond_a_double_is_refused_where_the_library_refuses_it(tmp_path, number, refused):
    """serde_json reads a number that no integer type holds as a double, and refuses one beyond its range;
    Python's json reads it as infinity or as an integer of any size."""
    path = write_raw(tmp_path / "r.safetensors", b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], '
                     b'"note": [' + number + b"]}}", b"\x01")
    try:
        with safe_open(path, "pt"):
            pass
    except Exception as e:
        assert refused and "number out of range" in str(e)
    else:
        assert not refused
    if refused:
        with pytest.raises(CheckpointError, match=r"r\.safetensors: tensor 'w': its header entry holds a number beyond "
                                                  "a double's range"):
            read_header(path)
    else:
        assert list(read_header(path)) == ["w"]
