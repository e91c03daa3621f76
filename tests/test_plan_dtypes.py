"""Planning refuses inputs it cannot merge as stored, naming the file and tensor: a floating-point tensor beside
an integer one, and 8-bit floats without a config dtype to load them in (which one merges)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from merge_engine import MergeOptions, merge, parse_config
from merge_engine.errors import ConfigError
from merge_engine.plan import build_plan


def folder(path, tensors: dict[str, torch.Tensor]) -> str:
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}))
    return str(path)


def config(models, **top):
    return {"merge_method": "linear", **top, "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models]}


@pytest.mark.parametrize("other", [torch.int8, torch.uint8, torch.bool, torch.int64])
def test_a_floating_tensor_beside_an_integer_one_is_refused(tmp_path, other):
    a = folder(tmp_path / "a", {"w": torch.randn(4, 4).bfloat16()})
    b = folder(tmp_path / "b", {"w": torch.ones(4, 4).to(other)})
    with pytest.raises(ConfigError) as error:
        build_plan(parse_config(config([a, b])))
    assert f"{b}/model.safetensors: tensor 'w' is {str(other)[6:]} but {a}/model.safetensors has bfloat16" in str(error.value)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_8_bit_floats_need_a_config_dtype_and_then_merge(tmp_path, fp8):
    values = torch.randn(4, 4)
    a = folder(tmp_path / "a", {"w": values.to(fp8)})
    b = folder(tmp_path / "b", {"w": values.bfloat16()})
    with pytest.raises(ConfigError, match=f"tensor 'w' is {str(fp8)[6:]}; set the config's dtype"):
        build_plan(parse_config(config([a, b])))
    merge(parse_config(config([a, b], dtype="float32")), str(tmp_path / "out"), MergeOptions(device="cpu", quiet=True))
    from safetensors.torch import load_file
    out = load_file(str(tmp_path / "out" / "model.safetensors"))["w"]
    assert torch.equal(out, 0.5 * values.to(fp8).float() + 0.5 * values.bfloat16().float())
