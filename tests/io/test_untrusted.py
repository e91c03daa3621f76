"""What a model folder says about itself is checked before anything is read from where it points: the
containment rule for the files it names (.., absolute, symlink out, symlink in, Unicode look-alikes,
the Hugging Face cache layout), hostile JSON, and safetensors headers as strict as the reference
library's (overlapping ranges, gaps, duplicate names, metadata, absurd shapes)."""
import json
import os
import struct

import pytest
import torch

from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.safetensors_format import read_header, save_tensors
from merge_engine.io.untrusted import inside_folder, parse_json, read_json


@pytest.fixture
def folder(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "inside.safetensors").write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"y")
    return model


@pytest.mark.parametrize("name", ["../secret.safetensors", "sub/../../secret.safetensors", "/etc/passwd",
                                  "\uff0e\uff0e/secret.safetensors", "..\\secret.safetensors", "", "a\0b", "a\ud800b",
                                  7])
def test_names_that_leave_the_folder_are_refused(folder, name):
    with pytest.raises(CheckpointError, match="index.json"):
        inside_folder(str(folder), name, "index.json")


def test_a_symlink_out_is_refused_and_one_within_is_followed(folder):
    os.symlink("../secret.safetensors", folder / "out.safetensors")
    os.symlink("inside.safetensors", folder / "alias.safetensors")
    with pytest.raises(CheckpointError, match="outside"):
        inside_folder(str(folder), "out.safetensors", "index.json")
    assert inside_folder(str(folder), "alias.safetensors", "index.json") == str(folder / "alias.safetensors")


def test_a_symlinked_model_folder_and_a_hugging_face_snapshot_are_usable(tmp_path, folder):
    os.symlink(folder, tmp_path / "link")
    assert inside_folder(str(tmp_path / "link"), "inside.safetensors", "x").endswith("inside.safetensors")
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "blobs" / "0123").write_bytes(b"z")
    os.symlink("../../blobs/0123", repo / "snapshots" / "abc" / "model.safetensors")
    assert inside_folder(str(repo / "snapshots" / "abc"), "model.safetensors", "x")
    os.symlink("../../../secret.safetensors", repo / "snapshots" / "abc" / "evil.safetensors")
    with pytest.raises(CheckpointError, match="outside"):
        inside_folder(str(repo / "snapshots" / "abc"), "evil.safetensors", "x")


def write_index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_shard_index_cannot_point_outside_the_folder(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_tensors({"w": torch.ones(3)}, str(outside / "x.safetensors"))
    model = tmp_path / "model"
    model.mkdir()
    for target in ("../elsewhere/x.safetensors", str(outside / "x.safetensors")):
        write_index(model, {"w": target})
        with pytest.raises(CheckpointError, match="model.safetensors.index.json.*outside"):
            Checkpoint(str(model))


@pytest.mark.parametrize("weight_map", [["w", "x.safetensors"], {"w": 3}, {"w": None}, "x"])
def test_a_malformed_weight_map_is_refused_by_name(tmp_path, weight_map):
    write_index(tmp_path, weight_map)
    with pytest.raises(CheckpointError, match="index.json.*weight_map"):
        Checkpoint(str(tmp_path))


def test_hostile_json(tmp_path):
    with pytest.raises(CheckpointError, match="twice"):
        parse_json('{"a": 1, "a": 2}', "f.json")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        parse_json("[" * 100_000 + "]" * 100_000, "f.json")
    (tmp_path / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="index.json: JSON nested too deeply"):
        Checkpoint(str(tmp_path))
    config = tmp_path / "config.json"  # parsed whole, at many times its size: a cap, not gigabytes
    config.write_text('{"pad": "' + " " * (64 * 2**20) + '"}')
    with pytest.raises(CheckpointError, match=r"config.json: more than 64 MiB, not a JSON file of a model folder"):
        read_json(str(config))


def header_file(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


@pytest.mark.parametrize("header, data, problem", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "gap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 8, "after the last tensor"),
    ({"a": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}}, 4, "holds Infinity, which is not JSON"),  # written as Infinity
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4, "malformed"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"format": 1}}, 4, "__metadata__"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": ["x"]}, 4, "__metadata__"),
])
def test_safetensors_headers_follow_the_formats_rules(tmp_path, header, data, problem):
    with pytest.raises(CheckpointError, match=problem):
        read_header(header_file(tmp_path / "m.safetensors", header, bytes(data)))


def test_a_header_is_strict_utf8_without_a_byte_order_mark(tmp_path):
    raw = b"\xef\xbb\xbf" + json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(CheckpointError, match="m.safetensors: corrupt safetensors header.*BOM"):
        read_header(str(path))
    raw = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode("utf-16")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(CheckpointError, match="not UTF-8"):
        read_header(str(path))


@pytest.mark.parametrize("reader", [read_header, read_json])
def test_a_fifo_or_folder_where_a_file_belongs_is_refused_without_blocking(tmp_path, reader):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)  # nothing ever writes to it: opening it for a plain read would wait forever
    with pytest.raises(CheckpointError, match="model.safetensors: is a FIFO, not a regular file"):
        reader(str(fifo))
    (tmp_path / "config.json").mkdir()
    with pytest.raises(CheckpointError, match="config.json: is a folder, not a regular file"):
        reader(str(tmp_path / "config.json"))


def test_duplicate_tensor_names_in_a_header_are_refused(tmp_path):
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' \
          b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(CheckpointError, match="twice"):
        read_header(str(tmp_path / "m.safetensors"))


def test_files_the_writer_and_safetensors_write_pass(tmp_path):
    from safetensors.torch import save_file
    tensors = {"b": torch.ones(3, 2), "a": torch.zeros(0), "c": torch.arange(5, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    save_tensors(tensors, str(tmp_path / "ours.safetensors"))
    for name in ("lib", "ours"):
        assert set(read_header(str(tmp_path / f"{name}.safetensors"))) == set(tensors)


@pytest.mark.parametrize("patterns, problem", [({"q_proj(": 8}, "not a valid regular expression"),
                                               ({"q_proj": "8"}, "positive number"), (["q_proj"], "must map")])
def test_a_lora_pattern_that_cannot_be_used_is_refused_by_name(tmp_path, patterns, problem):
    from merge_engine.demo import make_synthetic_llama
    from merge_engine.io.lora import LoraCheckpoint
    base = make_synthetic_llama(str(tmp_path / "base"), layers=1, hidden=16, intermediate=32, vocab=32)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "rank_pattern": patterns}))
    with pytest.raises(CheckpointError, match=f"adapter_config.json: rank_pattern: .*{problem}"):
        LoraCheckpoint(base, str(adapter))


def test_damaged_keys_and_journals_are_refused_by_name(tmp_path):
    from merge_engine.tiers.journal import JOURNAL_FILE, MAGIC, Journal
    from merge_engine.tiers.key import TierKey, TierKeyError
    with pytest.raises(TierKeyError, match="k.json.*nested too deeply"):
        TierKey.from_json("[" * 100_000 + "]" * 100_000, "k.json")
    with pytest.raises(TierKeyError, match="twice"):
        TierKey.from_json('{"attn_heads": [], "attn_heads": []}', "k.json")
    for header in (struct.pack("<Q", 2**63) + b"{}", struct.pack("<Q", 2) + b"[]",
                   struct.pack("<Q", 30) + b'{"payload_bytes": 1e999, "entries": []}'):
        (tmp_path / JOURNAL_FILE).write_bytes(MAGIC + header)
        with pytest.raises(CheckpointError, match="damaged key journal"):
            Journal.load(str(tmp_path))


def test_tokenizer_files_linking_out_are_refused_before_transformers_reads_them(folder):
    from merge_engine.vocabulary import tokenizer_folder
    assert tokenizer_folder(str(folder)) == str(folder)  # no tokenizer files: nothing to check
    os.symlink("../secret.safetensors", folder / "tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer.json.*outside"):
        tokenizer_folder(str(folder))
