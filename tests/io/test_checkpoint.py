"""Checkpoint folders: unsharded and sharded reads, and the folders we refuse."""
import json
import os

import pytest
import torch

from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint, split_layer_name


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
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"\.bin"):
        Checkpoint(str(pickled))


def test_missing_shard_is_reported(model_sets, tmp_path):
    import shutil
    folder = tmp_path / "broken"
    shutil.copytree(model_sets("llama_bf16_sharded")[0], folder)
    victim = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[-1]
    os.remove(folder / victim)
    with pytest.raises(CheckpointError, match=victim):
        Checkpoint(str(folder))


def test_split_layer_name():
    assert split_layer_name("model.layers.12.mlp.up_proj.weight") == ("model.layers", 12, "mlp.up_proj.weight")
    assert split_layer_name("transformer.h.3.attn.c_attn.bias") == ("transformer.h", 3, "attn.c_attn.bias")
    assert split_layer_name("model.embed_tokens.weight") is None
