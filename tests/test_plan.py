"""Planning models with several layer stacks (here Qwen2-VL: visual.blocks beside model.layers)."""
import json

import pytest
import torch

from merge_engine import MergeOptions, merge, parse_config
from merge_engine.errors import ConfigError
from merge_engine.plan import build_plan
from tests.stacked_models import make_qwen2_vl


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return make_qwen2_vl(str(tmp_path_factory.mktemp("vlm")))


def gradient_config(models):
    return {"merge_method": "linear", "models": [{"model": models[0], "parameters": {"weight": 1.0}},
                                                 {"model": models[1], "parameters": {"weight": [0.0, 1.0]}}]}


def test_each_stack_keeps_its_names_and_gets_its_own_t(vlm):
    plan = build_plan(parse_config(gradient_config(vlm)))
    t = {job.out_name: job.per_model[1]["weight"] for job in plan.jobs}
    assert t["model.layers.0.mlp.up_proj.weight"] == 0.0
    assert t["model.layers.1.mlp.up_proj.weight"] == 0.5  # 3 text layers
    assert t["model.layers.2.mlp.up_proj.weight"] == 1.0
    assert t["visual.blocks.0.mlp.fc1.weight"] == 0.0  # 2 vision blocks
    assert t["visual.blocks.1.mlp.fc1.weight"] == 1.0
    assert t["visual.merger.mlp.0.weight"] == t["model.embed_tokens.weight"] == 0.0  # outside the stacks
    assert sorted(t) == sorted(plan.models[vlm[0]].tensors)


def test_the_merge_is_the_tensorwise_merge(vlm, tmp_path, folder_tensors):
    merge(parse_config(gradient_config(vlm)), str(tmp_path / "out"), MergeOptions(quiet=True, device="cpu"))
    out, a, b = folder_tensors(tmp_path / "out"), folder_tensors(vlm[0]), folder_tensors(vlm[1])
    assert out.keys() == a.keys()
    plan = build_plan(parse_config(gradient_config(vlm)))
    for job in plan.jobs:
        w = job.per_model[1]["weight"]
        want = (a[job.out_name] + w * b[job.out_name]) / (1 + w)
        torch.testing.assert_close(out[job.out_name], want, rtol=1e-6, atol=1e-7)  # fp32, another order
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["vision_config"]["depth"] == 2


def test_slices_of_a_many_stack_model_are_refused(vlm):
    cfg = {"merge_method": "linear", "slices": [{"sources": [{"model": m, "layer_range": [0, 2],
                                                              "parameters": {"weight": 1.0}} for m in vlm[:2]]}]}
    with pytest.raises(ConfigError, match=r"2 layer stacks \(model.layers: 3, visual.blocks: 2\)"):
        build_plan(parse_config(cfg))


def test_stacks_of_different_depths_are_refused(vlm, tmp_path):
    deeper = make_qwen2_vl(str(tmp_path), n=1, vision_layers=3)[0]
    with pytest.raises(ConfigError, match="layer stacks .*visual.blocks': 3.* differ"):
        build_plan(parse_config(gradient_config([vlm[0], deeper])))


@pytest.mark.parametrize("config_json", ["missing", "without architectures"])
def test_a_model_whose_architecture_is_unknown_is_named_with_the_reason(model_sets, tmp_path, config_json):
    import shutil
    base, expert = model_sets("llama")[:2]
    odd = shutil.copytree(expert, tmp_path / "odd")
    if config_json == "missing":
        (odd / "config.json").unlink()
    else:
        settings = json.loads((odd / "config.json").read_text())
        (odd / "config.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "architectures"}))
    config = parse_config({"merge_method": "linear", "models": [
        {"model": base, "parameters": {"weight": 0.5}}, {"model": str(odd), "parameters": {"weight": 0.5}}]})
    reason = "no config.json" if config_json == "missing" else "no architectures in its config.json"
    with pytest.raises(ConfigError, match=rf"different architectures \(.*{odd}: \? \({reason}\)\)"):
        build_plan(config)
