"""Planning from the first model's tensors: what the other inputs hold beside them is checked, so that nothing
is left out of the output silently, and what a config.json says about the layers must be what the tensors hold."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_engine import parse_config
from merge_engine.demo import make_synthetic_llama
from merge_engine.errors import ConfigError
from merge_engine.io.checkpoint import split_layer_name
from merge_engine.plan import before_layers, build_plan

SHAPE = dict(layers=2, hidden=16, intermediate=32, vocab=32)


@pytest.fixture
def models(tmp_path):
    base = make_synthetic_llama(str(tmp_path / "base"), seed=0, **SHAPE)
    return base, make_synthetic_llama(str(tmp_path / "other"), seed=1, base=base, **SHAPE)


def linear(first, second):
    return parse_config({"merge_method": "linear", "models": [{"model": first, "parameters": {"weight": 0.5}},
                                                              {"model": second, "parameters": {"weight": 0.5}}]})


def edit_tensors(folder, change):
    """Rewrite every shard with change(tensors) (dropping or adding), and the index's weight map to match."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(index_path))
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        path = os.path.join(folder, shard)
        tensors = change(load_file(path), shard)
        save_file(tensors, path)
        weight_map.update(dict.fromkeys(tensors, shard))
    json.dump({**index, "weight_map": weight_map}, open(index_path, "w"))


def set_layers(folder, n):
    path = os.path.join(folder, "config.json")
    json.dump({**json.load(open(path)), "num_hidden_layers": n}, open(path, "w"))


def test_a_weight_the_first_model_lacks_in_one_layer_is_refused(models):
    base, other = models
    dropped = "model.layers.0.mlp.up_proj.weight"
    edit_tensors(other, lambda tensors, shard: {n: t for n, t in tensors.items() if n != dropped})
    with pytest.raises(ConfigError, match=rf"other: tensor '{dropped}' is missing \(its other layers and the other "
                                          "inputs have it\\)"):
        build_plan(linear(other, base))  # first: the one that lacks it
    with pytest.raises(ConfigError, match=rf"other: tensor '<layer 0>.mlp.up_proj.weight' is missing \(needed for "
                                          f"'{dropped}'"):
        build_plan(linear(base, other))  # second: missing where the first has it


@pytest.mark.parametrize("claimed", [3, 10**12])
def test_a_config_claiming_layers_the_tensors_lack_is_refused(models, claimed):
    base, other = models
    set_layers(other, claimed)
    lacking = claimed - 2
    with pytest.raises(ConfigError, match=rf"other: config.json says {claimed} layers, but the tensors of {lacking} "
                                          r"of them are missing \(layer 2"):
        build_plan(linear(other, base))


def test_layers_beyond_the_config_and_tensors_the_first_model_lacks_are_named(models, caplog):
    base, other = models
    set_layers(other, 1)
    set_layers(base, 1)
    embed = "model.embed_tokens.weight"
    edit_tensors(other, lambda tensors, shard: {**tensors, "extra.weight": tensors[embed].clone()} if embed in tensors
                 else tensors)
    with caplog.at_level("WARNING", logger="merge_engine"):
        plan = build_plan(linear(base, other))
    assert "the tensors of 1 layer(s) beyond the 1 that config.json says (from layer 1) are not merged" in caplog.text
    assert "other: 1 tensor(s) that the first model lacks are not merged (extra.weight)" in caplog.text
    assert plan.num_layers == 1 and {split_layer_name(j.out_name)[1] for j in plan.jobs if split_layer_name(j.out_name)} == {0}


def test_layer_numbers_are_ascii_without_leading_zeros():
    assert split_layer_name("model.layers.10.mlp.up_proj.weight") == ("model.layers", 10, "mlp.up_proj.weight")
    assert split_layer_name("model.layers.0.mlp.up_proj.weight") == ("model.layers", 0, "mlp.up_proj.weight")
    for name in ("model.layers.01.mlp.up_proj.weight", "model.layers.\u0661.mlp.up_proj.weight"):
        assert split_layer_name(name) is None  # not a second name for layer 1: a tensor outside the layers


def test_a_folder_without_tensors_or_with_a_huge_count_of_unseen_layers_is_refused(tmp_path):
    folders = []
    for name, tensors, layers in (("empty", {}, 2), ("unseen", {"w": torch.ones(2)}, 10**12),
                                  ("plain", {"w": torch.ones(2)}, 1)):
        os.makedirs(tmp_path / name)
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        json.dump({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers},
                  open(tmp_path / name / "config.json", "w"))
        folders.append(str(tmp_path / name))
    with pytest.raises(ConfigError, match="empty: the model folder holds no tensors"):
        build_plan(linear(folders[0], folders[2]))
    with pytest.raises(ConfigError, match="unseen: config.json says 1000000000000 layers, and no tensor is a layer's"):
        build_plan(linear(folders[1], folders[2]))


@pytest.mark.parametrize("name, first", [
    ("model.embed_tokens.weight", True), ("transformer.wte.weight", True), ("transformer.wpe.weight", True),
    ("gpt_neox.embed_in.weight", True), ("transformer.rotary_pos_emb.inv_freq", True),
    ("transformer.relative_pe.slopes", True), ("embed_out.weight", False), ("lm_head.weight", False),
    ("model.norm.weight", False), ("gpt_neox.final_layer_norm.weight", False), ("transformer.ln_f.bias", False)])
def test_tensors_outside_the_layers_go_with_the_first_or_last_slice_as_in_mergekit(name, first):
    """mergekit's architectures list embeddings and position encodings as pre weights (merged with the first
    slice's sources and parameters), norms and heads as post weights (the last slice's): GPT-NeoX's head,
    embed_out, among them."""
    assert before_layers(name) == first


def test_a_weight_outside_the_layers_that_the_first_model_alone_lacks_is_refused(tmp_path):
    """Two other inputs both hold model.norm.weight and the first lacks it (a truncated index): the output
    would load with a randomly initialised norm, so the plan refuses it, naming the first model."""
    base = make_synthetic_llama(str(tmp_path / "base"), seed=0, **SHAPE)
    first, second = (make_synthetic_llama(str(tmp_path / n), seed=s, base=base, **SHAPE) for n, s in (("a", 1), ("b", 2)))
    edit_tensors(first, lambda tensors, shard: {k: v for k, v in tensors.items() if k != "model.norm.weight"})
    config = parse_config({"merge_method": "ties", "base_model": base, "models": [
        {"model": m, "parameters": {"weight": 0.5, "density": 0.5}} for m in (first, second)]})
    with pytest.raises(ConfigError, match=r"a: tensor 'model.norm.weight' is missing \(every other input has it\)"):
        build_plan(config)


def test_a_filter_in_no_tensor_name_is_named(models, caplog):
    """A filter written for names the output does not have (Mixtral's block_sparse_moe, now fused under mlp) sets
    nothing; mergekit is silent about it, the plan names it. Filters that match, and "*", say nothing."""
    base, other = models
    config = {"merge_method": "ties", "base_model": base, "parameters": {"density": [
        {"filter": "block_sparse_moe", "value": 0.2}, {"filter": "mlp", "value": 0.4}, {"value": 0.6}]},
        "models": [{"model": other, "parameters": {"weight": [{"filter": "self_attn", "value": 0.5},
                                                              {"filter": "*", "value": 1.0}]}}]}
    with caplog.at_level("WARNING", logger="merge_engine"):
        build_plan(parse_config(config))
    named = [r.getMessage() for r in caplog.records if "filter" in r.getMessage()]
    assert named == ["parameters.density: filter 'block_sparse_moe' is in no tensor name of this merge, so its value "
                     "sets nothing"]
