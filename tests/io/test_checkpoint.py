"""Checkpoint folders: unsharded and sharded reads, and the folders we refuse."""
import fcntl
import json
import os
import shutil
import struct
import threading
import time

import pytest
import torch
from safetensors import safe_open

from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint, split_layer_name
from merge_engine.io.safetensors_format import save_tensors
from tests.conftest import pickled_copy, rewrite_in_place


@pytest.mark.parametrize("key", ["llama", "llama_bf16_sharded", "qwen2", "gpt2"])
def test_reads_every_tensor_exactly(folder_tensors, model_sets, key):
    folder = model_sets(key)[1]
    ckpt = Checkpoint(folder)
    want = folder_tensors(folder)
    assert set(ckpt.tensors) == set(want)
    for name, t in want.items():
        assert torch.equal(ckpt.read(name), t), name
    buf = torch.empty_like(next(iter(want.values())))
    assert ckpt.read(next(iter(want)), buf).data_ptr() == buf.data_ptr()
    assert ckpt.num_layers == 4


def _direct_read_all(ckpt, direct_io="on"):
    """Every tensor through read_pooled, each into its own buffer: {name: (tensor, buffer)}."""
    out = {}
    for name in ckpt.tensors:
        buffers = []
        t = ckpt.read_pooled(name, lambda n: buffers.append(torch.empty(n, dtype=torch.uint8)) or buffers[-1],
                             direct_io)
        out[name] = (t, buffers[0])
    return out


@pytest.mark.parametrize("direct_io", ["on", "auto", "off"])
@pytest.mark.parametrize("key", ["llama_bf16_sharded", "gpt2"])
def test_pooled_reads_every_tensor_exactly(folder_tensors, model_sets, key, direct_io):
    folder = model_sets(key)[1]
    ckpt = Checkpoint(folder)
    want = folder_tensors(folder)
    for name, (t, buffer) in _direct_read_all(ckpt, direct_io).items():
        assert torch.equal(t, want[name]), name
        assert t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr(), "not a view of its buffer"
    # the files' ends are not block-aligned, so the last tensor of each file was a short read at EOF
    assert any(os.path.getsize(info.file) % 4096 for info in ckpt.tensors.values())


def test_direct_reads_fall_back_where_refused(folder_tensors, model_sets, monkeypatch):
    """A filesystem that refuses O_DIRECT at open (tmpfs) or at the first read gets plain reads."""
    folder = model_sets("llama")[1]
    want = folder_tensors(folder)
    real_open, real_preadv = os.open, os.preadv

    def no_direct_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", no_direct_open)
    got = _direct_read_all(Checkpoint(folder))
    assert all(torch.equal(t, want[n]) for n, (t, _) in got.items())

    monkeypatch.setattr(os, "open", real_open)
    ckpt = Checkpoint(folder)
    direct = {ckpt._direct_fd(info.file) for info in ckpt.tensors.values()}
    assert None not in direct, "this test needs a filesystem that opens files with O_DIRECT"

    def refuse_direct(fd, buffers, offset):  # by the descriptor's flags: a refused one is closed, its number reused
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_preadv(fd, buffers, offset)
    monkeypatch.setattr(os, "preadv", refuse_direct)
    got = _direct_read_all(ckpt)
    assert all(torch.equal(t, want[n]) for n, (t, _) in got.items())
    assert all(ckpt._direct_fds[info.file] is None for info in ckpt.tensors.values())



def _descriptors_of(path) -> int:
    """How many of this process's open file descriptors are of path."""
    fds = "/proc/self/fd"
    return sum(os.path.realpath(os.path.join(fds, fd)) == str(path) for fd in os.listdir(fds))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
@pytest.mark.parametrize("direct_io", ["on", "off"])
def test_read_threads_opening_a_file_at_once_leave_nothing_open(tmp_path, monkeypatch, direct_io):
    """The merge's prefetch threads read one checkpoint at once: each file is opened once, and close() closes
    it (a descriptor opened twice, one lost in the table, stayed open for the life of the process)."""
    from safetensors.torch import save_file
    path = tmp_path / "model.safetensors"
    save_file({f"t{i}": torch.full((1000,), float(i)) for i in range(4)}, str(path))
    ckpt = Checkpoint(str(tmp_path))
    real_open = os.open

    def slow_open(*args):  # every thread finds the file not yet open before any has opened it
        time.sleep(0.05)
        return real_open(*args)
    monkeypatch.setattr(os, "open", slow_open)
    reads = []
    threads = [threading.Thread(target=lambda: reads.append(_direct_read_all(ckpt, direct_io))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reads) == 4
    assert all(torch.equal(t, torch.full((1000,), float(n[1:]))) for got in reads for n, (t, _) in got.items())
    ckpt.close()
    assert _descriptors_of(path) == 0

def test_direct_read_of_a_tensor_at_an_odd_offset(tmp_path):
    """The format allows any header length, so a tensor's bytes may start at an odd offset: no dtype
    view can start there, so that tensor is read the plain way; the others still go direct."""
    a = torch.arange(5000, dtype=torch.float32).to(torch.bfloat16)
    b = torch.arange(3, dtype=torch.uint8)
    header = {"a": {"dtype": "BF16", "shape": [5000], "data_offsets": [0, 10000]},
              "b": {"dtype": "U8", "shape": [3], "data_offsets": [10000, 10003]}}
    raw = json.dumps(header).encode()
    raw += b" " * ((7 - len(raw)) % 8)  # 8 + len(raw) is odd
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + a.view(torch.uint8).numpy().tobytes()
                                               + b.numpy().tobytes())
    ckpt = Checkpoint(str(folder))
    assert ckpt.tensors["a"].data_start % 2 == 1
    got = _direct_read_all(ckpt)
    assert torch.equal(got["a"][0], a) and torch.equal(got["b"][0], b)


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [3, 0, 2**40, 2**40]])
def test_an_empty_tensor_whose_strides_overflow_is_read_as_the_library_reads_it(tmp_path, shape):
    """The header allows it (its element count, 0, never overflows), but torch.empty(shape) cannot stride it."""
    header = json.dumps({"z": {"dtype": "BF16", "shape": shape, "data_offsets": [0, 0]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        want = f.get_tensor("z")
    ckpt = Checkpoint(str(tmp_path))
    for got in (ckpt.read("z"), *(t for t, _ in _direct_read_all(ckpt).values())):
        assert got.dtype == want.dtype and got.shape == want.shape


@pytest.mark.parametrize("change", ["replaced", "rewritten", "fifo"])
@pytest.mark.parametrize("direct_io", ["on", "off"])
def test_a_file_changed_after_its_header_was_read_is_not_read(tmp_path, change, direct_io):
    """A shard replaced (renamed over), rewritten in place or swapped for a FIFO between planning and reading
    would be read at the old header's offsets (or block): refused by name instead."""
    from safetensors.torch import save_file
    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / "model.safetensors"
    save_file({"a": torch.zeros(1000), "b": torch.ones(10)}, str(path))
    ckpt = Checkpoint(str(folder))
    if change == "replaced":
        save_file({"b": torch.ones(10), "a": torch.full((1000,), 2.0)}, str(tmp_path / "other.safetensors"))
        os.replace(tmp_path / "other.safetensors", path)
    elif change == "rewritten":
        st = os.stat(path)
        with open(path, "r+b") as f:  # the last value written again (the same bytes): a later mtime
            f.seek(st.st_size - 4)
            last = f.read(4)
            f.seek(st.st_size - 4)
            f.write(last)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # whatever the clock's resolution
    else:
        path.unlink()
        os.mkfifo(path)
    with pytest.raises(CheckpointError, match="model.safetensors: the file changed after its header was read"):
        _direct_read_all(ckpt, direct_io)


@pytest.mark.parametrize("direct_io", ["on", "off"])
def test_a_file_rewritten_while_open_is_caught_once_reading_is_done(tmp_path, direct_io):
    """A write into a file already open (`cp` over it, an in-place rewrite) changes what later reads return, which
    opening checks cannot see: check_unchanged names the file."""
    from safetensors.torch import save_file
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(1000), "b": torch.ones(10)}, str(path))
    ckpt = Checkpoint(str(tmp_path))
    _direct_read_all(ckpt, direct_io)
    ckpt.check_unchanged()  # read, not written: nothing to say
    rewrite_in_place(path)
    with pytest.raises(CheckpointError, match="model.safetensors: the file changed while it was being read"):
        ckpt.check_unchanged()


@pytest.mark.parametrize("direct_io", ["on", "off", None])
def test_a_file_deleted_after_its_header_was_read_is_named_with_the_tensor(tmp_path, direct_io):
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1000)}, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'a': cannot read \(No such file"):
        ckpt.read("a") if direct_io is None else _direct_read_all(ckpt, direct_io)


def test_sharded_index_is_used(model_sets):
    folder = model_sets("llama_bf16_sharded")[0]
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    assert len({info.file for info in Checkpoint(folder).tensors.values()}) > 1


def test_refuses_missing_path_lora_and_pickles(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(str(tmp_path / "nope"))
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (lora / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="LoRA"):
        Checkpoint(str(lora))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(2)}, pickled / "model.pt")  # not a file name mergekit or transformers reads
    with pytest.raises(CheckpointError, match=r"no weights found .* It holds model\.pt"):
        Checkpoint(str(pickled))


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("direct_io", ["on", "auto", "off"])
def test_reads_pickled_checkpoints_exactly(folder_tensors, model_sets, tmp_path, shards, direct_io):
    """pytorch_model.bin, or its shards with their index, as transformers 4 saved them: every tensor read in place."""
    folder = model_sets("llama_bf16_sharded")[1]
    pickled = pickled_copy(folder, tmp_path / "pickled", shards)
    ckpt = Checkpoint(pickled)
    want = folder_tensors(folder)
    assert set(ckpt.tensors) == set(want) and len({i.file for i in ckpt.tensors.values()}) == shards
    assert all(i.file.endswith(".bin") for i in ckpt.tensors.values())
    for name, (t, _) in _direct_read_all(ckpt, direct_io).items():
        assert torch.equal(t, want[name]), name
    assert ckpt.num_layers == 4


def test_weight_files_chosen_as_mergekit_chooses(model_sets, tmp_path):
    """model.safetensors (or its index) over pytorch_model.bin (or its index); pytorch_model.bin over shards without
    an index, which are named as passed over."""
    folder = model_sets("llama")[1]
    both = pickled_copy(folder, tmp_path / "both")
    shutil.copy(os.path.join(folder, "model.safetensors"), both)
    assert {os.path.basename(i.file) for i in Checkpoint(both).tensors.values()} == {"model.safetensors"}
    beside = pickled_copy(folder, tmp_path / "beside")
    shutil.copy(os.path.join(folder, "model.safetensors"), os.path.join(beside, "model-00001-of-00001.safetensors"))
    with pytest.warns(UserWarning, match=r"reading pytorch_model\.bin only, as mergekit does; not model-00001"):
        files = {os.path.basename(i.file) for i in Checkpoint(beside).tensors.values()}
    assert files == {"pytorch_model.bin"}


def test_missing_shard_is_reported(model_sets, tmp_path):
    import shutil
    folder = tmp_path / "broken"
    shutil.copytree(model_sets("llama_bf16_sharded")[0], folder)
    victim = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[-1]
    os.remove(folder / victim)
    with pytest.raises(CheckpointError, match=victim):
        Checkpoint(str(folder))


@pytest.mark.parametrize("file", ["model.safetensors.index.json", "config.json"])
@pytest.mark.parametrize("target, problem", [("missing.json", "cannot read"), ("/nonexistent", "outside"),
                                             ("../other/{file}", "outside")])
def test_an_index_or_config_linked_out_of_the_folder_or_to_nothing_is_refused(model_sets, tmp_path, file, target,
                                                                                problem):
    """Neither is passed over (every *.safetensors read instead of the index's shards) nor read from elsewhere."""
    import shutil
    folder, other = tmp_path / "m", tmp_path / "other"
    shutil.copytree(model_sets("llama_bf16_sharded")[0], folder)
    shutil.copytree(folder, other)
    os.remove(folder / file)
    os.symlink(target.format(file=file), folder / file)
    with pytest.raises(CheckpointError, match=f"{folder / file}: .*{problem}|{file}' leads to .*{problem}"):
        Checkpoint(str(folder))


@pytest.mark.parametrize("key,value,expected", [
    ("architectures", 5, "must be a list of class names, got 5"),
    ("architectures", [{"a": 1}], "must be a list of class names, got [{'a': 1}]"),
    ("architectures", "LlamaForCausalLM", "must be a list of class names, got 'LlamaForCausalLM'"),
    ("text_config", "x", "must be a JSON object, got 'x'"),
    ("num_hidden_layers", True, "must be a non-negative integer, got True"),
    ("num_hidden_layers", "2", "must be a non-negative integer, got '2'"),
    ("vocab_size", -1, "must be a non-negative integer, got -1"),
    ("vocab_size", 32.0, "must be a non-negative integer, got 32.0"),
    ("model_type", ["llama"], "must be a model type name, got ['llama']"),
    ("model_type", {"a": 1}, "must be a model type name, got {'a': 1}"),
])
def test_config_json_values_of_the_wrong_type_are_refused_at_open(model_sets, tmp_path, key, value, expected):
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(model_sets("llama")[1], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointError) as err:
        Checkpoint(str(folder))  # at open, not when config is first read: reported with the merge config's problems
    assert str(err.value) == f"{folder / 'config.json'}: '{key}' {expected}"
    (folder / "config.json").write_text(json.dumps({**config, "text_config": None}))
    assert Checkpoint(str(folder)).num_layers == config["num_hidden_layers"]  # null: no nested config


def test_a_tensor_listed_in_the_index_but_absent_from_its_shard_is_named_on_one_line(tmp_path):
    save_tensors({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "s1.safetensors", "line\nbreak": "s1.safetensors"}}))
    with pytest.raises(CheckpointError) as err:
        Checkpoint(str(tmp_path))
    assert str(err.value) == (f"{tmp_path / 's1.safetensors'}: tensor 'line\\nbreak' is listed in "
                              "model.safetensors.index.json but absent from the shard")


def test_split_layer_name():
    assert split_layer_name("model.layers.12.mlp.up_proj.weight") == ("model.layers", 12, "mlp.up_proj.weight")
    assert split_layer_name("transformer.h.3.attn.c_attn.bias") == ("transformer.h", 3, "attn.c_attn.bias")
    assert split_layer_name("model.embed_tokens.weight") is None
    assert split_layer_name("encoder.block.3.layer.1.DenseReluDense.wi.weight") == (
        "encoder.block", 3, "layer.1.DenseReluDense.wi.weight")  # T5: the block, not its sub-layer
    assert split_layer_name("model.layers.2.block_sparse_moe.experts.5.w1.weight") == (
        "model.layers", 2, "block_sparse_moe.experts.5.w1.weight")


def test_a_folder_with_model_safetensors_reads_it_only_as_mergekit(tmp_path, folder_tensors, model_sets):
    # a Mistral folder holds consolidated.safetensors (the same weights, other names) beside model.safetensors
    import shutil

    from safetensors.torch import save_file
    folder = tmp_path / "m"
    shutil.copytree(model_sets("llama")[1], folder)
    assert (folder / "model.safetensors").exists()
    want = folder_tensors(folder)
    save_file({"layers.0.attention.wq.weight": torch.ones(2, 2)}, str(folder / "consolidated.safetensors"))
    with pytest.warns(UserWarning, match=r"reading model.safetensors only, as mergekit does; not consolidated"):
        ckpt = Checkpoint(str(folder))
        assert set(ckpt.tensors) == set(want)


def test_shards_without_their_index_are_all_read(tmp_path):
    from safetensors.torch import save_file
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert set(Checkpoint(str(tmp_path)).tensors) == {"a", "b"}


@pytest.mark.parametrize("command", [
    ["{config}", "{out}", "-q"],
    ["patch", "extract", "{base}", "{model}", "{out}", "-q"],
    ["patch", "norms", "{base}", "{model}"],
    ["patch", "apply", "{model}", "{patch}", "{out}", "--any-base", "-q"],
])
def test_every_command_refuses_a_folder_an_in_place_rewrite_left_half_done(tmp_path, capsys, command):
    """A pending in-place journal means the model is half rewritten (docs/patches.md, In place): refused by name,
    before anything is written."""
    from merge_engine import cli
    from merge_engine.demo import make_synthetic_llama
    from merge_engine.io.checkpoint import IN_PLACE_JOURNAL
    from merge_engine.patches import extract_patch
    shape = dict(layers=1, hidden=16, intermediate=32, vocab=32)
    base = make_synthetic_llama(str(tmp_path / "base"), **shape)
    model = make_synthetic_llama(str(tmp_path / "model"), base=base, seed=1, **shape)
    patch = str(tmp_path / "patch")
    extract_patch(base, model, patch)
    config = tmp_path / "linear.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - {{model: {model}, parameters: {{weight: 1}}}}\n")
    (tmp_path / "model" / IN_PLACE_JOURNAL).write_bytes(b"")
    out = tmp_path / "out"
    argv = [a.format(config=config, out=out, base=base, model=model, patch=patch) for a in command]
    assert cli.main(argv) == 2
    said = capsys.readouterr().err
    assert f"{model}: an in-place key or patch operation was interrupted here" in said and "Traceback" not in said
    assert not out.exists()
