"""`modules:` configs (merge_engine/model_modules.py, config.py, plan.py): which module a tensor belongs to, the
output's layer counts per module, every malformed modules: config refused with its place, the session and the
search on such configs. Parity with mergekit: tests/test_parity_mergekit.py (MODULE_CASES)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_engine import MergeOptions, merge, parse_config
from merge_engine.errors import ConfigError
from merge_engine.model_modules import MODULES, module_of, with_config_value
from tests.stacked_models import make_qwen2_vl, make_t5

OPTIONS = MergeOptions(quiet=True, copy_tokenizer=False)


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    return make_qwen2_vl(str(tmp_path_factory.mktemp("qwen2_vl")))


def sliced_text(base: str, e1: str, e2: str, **modules) -> dict:
    """Qwen2-VL's language model cut to 4 layers from two slices; the other modules as given."""
    return {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32", "parameters": {"weight": 0.5},
            "modules": {
        "text_decoder": {"slices": [
            {"sources": [{"model": base, "layer_range": [0, 2]},
                         {"model": e1, "layer_range": [1, 3], "parameters": {"weight": 0.7}}]},
            {"sources": [{"model": base, "layer_range": [1, 3]},
                         {"model": e2, "layer_range": [0, 2], "parameters": {"weight": 0.4}}]}]},
        **modules}}


def test_a_tensor_belongs_to_the_module_with_the_longest_prefix():
    qwen2_vl = MODULES["Qwen2VLForConditionalGeneration"]
    assert [module_of(qwen2_vl, n) for n in (
        "model.layers.0.mlp.up_proj.weight", "lm_head.weight", "visual.blocks.1.attn.qkv.weight",
        "visual.merger.mlp.0.weight", "model.visual.merger.ln_q.weight",  # transformers 5's in-memory names
        "model.visual.blocks.0.norm1.weight", "model.language_model.norm.weight", "rotary.inv_freq")] == [
        "text_decoder", "text_decoder", "vision_tower", "multi_modal_projector", "multi_modal_projector",
        "vision_tower", "text_decoder", None]
    t5 = MODULES["T5ForConditionalGeneration"]
    assert [module_of(t5, n) for n in ("encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.final_layer_norm.weight",
                                       "shared.weight", "lm_head.weight")] == ["encoder", "decoder", "shared", "shared"]


def test_a_layer_count_is_set_only_where_the_config_has_it_and_the_input_is_left_as_is():
    config = {"num_hidden_layers": 3, "text_config": {"num_hidden_layers": 3, "vocab_size": 9}}
    out = with_config_value(with_config_value(config, "text_config.num_hidden_layers", 4), "vision_config.depth", 7)
    assert out == {"num_hidden_layers": 3, "text_config": {"num_hidden_layers": 4, "vocab_size": 9}}
    assert config["text_config"]["num_hidden_layers"] == 3
    assert with_config_value(config, "text_config.depth", 1) is config


def test_a_sliced_language_model_loads_with_every_merged_layer(qwen2_vl, folder_tensors, tmp_path):
    """Its layer count is set in both keys that count it (mergekit sets only the top-level one, and transformers then
    drops the layers beyond text_config's count), and its layer_types rebuilt; the loaded model holds the output."""
    transformers = pytest.importorskip("transformers")
    base, e1, e2 = qwen2_vl
    merge(parse_config(sliced_text(base, e1, e2, vision_tower={"models": [{"model": e1}]},
                                   multi_modal_projector={"models": [{"model": e2}]})), str(tmp_path / "out"), OPTIONS)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == config["text_config"]["num_hidden_layers"] == 4
    assert len(config["text_config"]["layer_types"]) == 4
    assert config["vision_config"]["depth"] == 2
    loaded = transformers.Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / "out"))
    assert len(loaded.model.language_model.layers) == 4
    written = folder_tensors(tmp_path / "out")
    assert torch.equal(loaded.model.language_model.layers[3].mlp.up_proj.weight, written["model.layers.3.mlp.up_proj.weight"])


def test_modules_left_out_are_not_written_and_named_in_a_warning(qwen2_vl, folder_tensors, tmp_path, caplog):
    base, e1, e2 = qwen2_vl
    merge(parse_config(sliced_text(base, e1, e2)), str(tmp_path / "out"), OPTIONS)
    assert not any(n.startswith("visual.") for n in folder_tensors(tmp_path / "out"))
    assert "leaves out vision_tower (25 tensors) and multi_modal_projector (6 tensors)" in caplog.text


def test_a_module_gets_its_own_parameters_between_the_slices_and_the_configs(qwen2_vl, folder_tensors, tmp_path):
    base, e1, _ = qwen2_vl
    def vision(**module):
        return {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32", "parameters": {"weight": 0.1},
                "modules": {"vision_tower": {"models": [{"model": e1}], **module},
                            "multi_modal_projector": {"models": [{"model": e1}]}}}
    merge(parse_config(vision(parameters={"weight": 0.9})), str(tmp_path / "a"), OPTIONS)
    merge(parse_config(vision()), str(tmp_path / "b"), OPTIONS)
    a, b = folder_tensors(tmp_path / "a"), folder_tensors(tmp_path / "b")
    x, y, name = folder_tensors(base), folder_tensors(e1), "visual.blocks.0.mlp.fc1.weight"
    assert torch.allclose(a[name], x[name] + 0.9 * (y[name] - x[name]))
    assert torch.allclose(b[name], x[name] + 0.1 * (y[name] - x[name]))
    projector = "visual.merger.ln_q.weight"  # the other module: the config's 0.1
    assert torch.equal(a[projector], b[projector])


BAD = {  # change to a valid modules: config -> what the message says
    "a module the architecture lacks": (lambda c, m: c["modules"].update(text_model={"models": [{"model": m[1]}]}),
                                        r"modules: 'text_model' is not a module of .*qwen2vl-0 "
                                        r"\(Qwen2VLForConditionalGeneration\), whose modules are text_decoder, "
                                        r"vision_tower, multi_modal_projector"),
    "a layer range beyond the module's layers": (
        lambda c, m: c["modules"].update(vision_tower={"slices": [{"sources": [{"model": m[0], "layer_range": [0, 3]}]}]}),
        r"modules.vision_tower.slices\[0\]\[.*qwen2vl-0\]: layer_range \[0, 3\) is outside the 2 layers of "
        r"'visual.blocks'"),
    "slices in a module without layers": (
        lambda c, m: c["modules"].update(multi_modal_projector={
            "slices": [{"sources": [{"model": m[0], "layer_range": [0, 1]}]}]}),
        r"modules.multi_modal_projector.slices\[0\]: module 'multi_modal_projector' has no layers, so it takes one "
        r"models: entry, not layer slices"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_modules_are_refused_before_any_write(case, qwen2_vl, tmp_path):
    change, message = BAD[case]
    config = sliced_text(*qwen2_vl)
    change(config, qwen2_vl)
    with pytest.raises(ConfigError, match=message):
        merge(parse_config(config), str(tmp_path / "out"), OPTIONS)
    assert not (tmp_path / "out").exists()


def test_a_one_module_architecture_has_only_default(model_sets, tmp_path):
    base, e1, _, _ = model_sets("llama")
    config = {"merge_method": "linear", "modules": {"text_decoder": {"models": [{"model": base}, {"model": e1}]}},
              "parameters": {"weight": 1.0}}
    with pytest.raises(ConfigError, match=r"modules: 'text_decoder' is not a module of .* \(LlamaForCausalLM\), whose "
                                          r"modules are default \(the architectures with several: "):
        merge(parse_config(config), str(tmp_path / "out"), OPTIONS)


@pytest.mark.parametrize("modules,message", [
    ([{"models": []}], r"modules: expected a mapping of module name -> \{models \| slices, parameters\}"),
    ({"text_decoder": {"models": [{"model": "/a"}], "slices": [{"sources": [{"model": "/a", "layer_range": [0, 1]}]}]}},
     r"modules.text_decoder: expected exactly one of 'models' or 'slices'"),
    ({"text_decoder": {"parameters": {"weight": 1.0}}}, r"modules.text_decoder: expected exactly one of 'models'"),
    ({"text_decoder": {"models": [{"model": "/a", "parameters": [1]}]}},
     r"modules.text_decoder.models\[0\].parameters: expected a mapping"),
    ({"text_decoder": {"slices": [{"sources": [{"model": "/a", "layer_range": [2, 1]}]}]}},
     r"modules.text_decoder.slices\[0\].sources\[0\].layer_range: expected \[start, end\)"),
    ({"text_decoder": {"models": [{"model": "/a"}]}, "vision_tower": {"models": [{"model": "/a"}]}},
     r"modules.text_decoder.models\[/a\]: merge method 'linear' needs parameter 'weight' for this model"),
])
def test_malformed_modules_are_named_by_their_place(modules, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"merge_method": "linear", "modules": modules})


def test_unknown_keys_in_a_module_warn_as_mergekit_ignores_them_or_are_refused_when_strict():
    config = {"merge_method": "linear", "modules": {"text_decoder": {
        "models": [{"model": "/a", "parameters": {"weight": 1.0}}], "paramters": {"weight": 2.0}}}}
    with pytest.warns(UserWarning, match=r"modules.text_decoder: ignoring unknown key\(s\) \['paramters'\]"):
        parse_config(config)
    with pytest.raises(ConfigError, match=r"modules.text_decoder: unknown key\(s\) \['paramters'\]"):
        parse_config(config, strict=True)


def test_a_models_module_gets_the_base_model_as_an_input(qwen2_vl):
    base, e1, _ = qwen2_vl
    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": base, "modules": {
        "vision_tower": {"models": [{"model": e1, "parameters": {"weight": 0.5}}]}}})
    assert [(s.where, s.module, [src.model for src in s.sources]) for s in cfg.slices] == [
        ("modules.vision_tower.models", "vision_tower", [e1, base])]


def test_t5s_encoder_and_decoder_take_their_own_slices(folder_tensors, tmp_path):
    base, e1, _ = make_t5(str(tmp_path / "models"))
    config = {"merge_method": "passthrough", "dtype": "float32", "modules": {
        "encoder": {"slices": [{"sources": [{"model": base, "layer_range": [0, 3]}]},
                               {"sources": [{"model": e1, "layer_range": [2, 3]}]}]},
        "decoder": {"models": [{"model": e1}]}, "shared": {"models": [{"model": base}]}}}
    merge(parse_config(config), str(tmp_path / "out"), OPTIONS)
    out, a, b = folder_tensors(tmp_path / "out"), folder_tensors(base), folder_tensors(e1)
    suffix = "layer.1.DenseReluDense.wo.weight"
    assert torch.equal(out[f"encoder.block.3.{suffix}"], b[f"encoder.block.2.{suffix}"])
    assert torch.equal(out[f"encoder.block.2.{suffix}"], a[f"encoder.block.2.{suffix}"])
    assert torch.equal(out[f"decoder.block.1.{suffix.replace('layer.1', 'layer.2')}"],
                       b[f"decoder.block.1.{suffix.replace('layer.1', 'layer.2')}"])
    assert torch.equal(out["shared.weight"], a["shared.weight"])
    config_json = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config_json["num_layers"], config_json["num_decoder_layers"]) == (4, 2)


def test_a_session_on_a_modules_config_equals_the_engine(qwen2_vl, folder_tensors, tmp_path):
    from merge_engine import MergeSession
    base, e1, e2 = qwen2_vl
    config = sliced_text(base, e1, e2, vision_tower={"models": [{"model": e1, "parameters": {"weight": 0.5}}]},
                         multi_modal_projector={"models": [{"model": e2}], "parameters": {"weight": 0.3}})
    session = MergeSession(config, "cpu", progress=False)
    merge(parse_config(config), str(tmp_path / "a"), OPTIONS)
    ours = folder_tensors(tmp_path / "a")
    assert set(session.state_dict()) == set(ours)
    assert all(torch.equal(t, ours[n]) for n, t in session.state_dict().items())
    other = json.loads(json.dumps(config))
    other["modules"]["multi_modal_projector"]["parameters"]["weight"] = 0.8
    assert session.merge(other).tensors == 6  # only the projector's tensors change
    merge(parse_config(other), str(tmp_path / "b"), OPTIONS)
    ours = folder_tensors(tmp_path / "b")
    assert all(torch.equal(t, ours[n]) for n, t in session.state_dict().items())


def test_search_spaces_inside_modules():
    from merge_engine.search import parse_search_config
    raw = {"merge_method": "ties", "base_model": "/m/base", "modules": {
        "text_decoder": {"models": [{"model": "/m/e1", "parameters": {"weight": {"search": [0.1, 1.0]},
                                                                        "density": 0.5}}],
                         "parameters": {"density": {"search": [0.2, 0.8]}}},
        "vision_tower": {"slices": [{"sources": [
            {"model": "/m/base", "layer_range": [0, 2]},
            {"model": "/m/e1", "layer_range": [0, 2], "parameters": {"weight": {"search": [0, 1], "knots": 2},
                                                                     "density": 0.5}}]}]}}}
    cfg = parse_search_config(raw)
    assert [s.name for s in cfg.spaces] == ["modules.text_decoder.density", "modules.text_decoder.models[0].weight",
                                            "modules.vision_tower.slices[0].sources[1].weight"]
    plain = cfg.concrete({"modules.text_decoder.density": 0.3, "modules.text_decoder.models[0].weight": 0.6,
                          "modules.vision_tower.slices[0].sources[1].weight[0]": 0.0,
                          "modules.vision_tower.slices[0].sources[1].weight[1]": 1.0})
    assert plain["modules"]["text_decoder"]["parameters"] == {"density": 0.3}
    assert plain["modules"]["vision_tower"]["slices"][0]["sources"][1]["parameters"]["weight"] == [0.0, 1.0]
    shared = json.loads(json.dumps(raw))
    shared["modules"]["text_decoder"]["models"][0]["parameters"]["normalize"] = {"choice": [True, False]}
    with pytest.raises(ConfigError, match=r"modules.text_decoder.models\[0\].parameters.normalize: merge method 'ties' "
                                          r"reads 'normalize' once for the whole merge"):
        parse_search_config(shared)


def test_a_session_refuses_a_modules_config_that_leaves_modules_out(qwen2_vl):
    from merge_engine import MergeSession
    from merge_engine.errors import MergeEngineError
    with pytest.raises(MergeEngineError, match=r"'model.visual.patch_embed.proj.weight' of Qwen2VLForConditionalGeneration "
                                               r"is not an output of the merge.*the config's modules: leaves out some "
                                               r"of the model's modules"):
        MergeSession(sliced_text(*qwen2_vl), "cpu", progress=False)


DEEPENED = {  # maker -> the modules whose one layer stack gets a layer more, and the loaded model's stacks
    "make_qwen2_vl": (("text_decoder", "vision_tower"), lambda m: (m.model.language_model.layers, m.model.visual.blocks)),
    "make_mistral3": (("text_decoder", "vision_tower"),
                      lambda m: (m.model.language_model.layers, m.model.vision_tower.transformer.layers)),
    "make_gemma3": (("text_decoder", "vision_tower"),
                    lambda m: (m.model.language_model.layers, m.model.vision_tower.encoder.layers)),
    "make_llama4": (("text_decoder", "vision_model"),
                    lambda m: (m.language_model.model.layers, m.vision_model.model.layers)),
    "make_t5": (("encoder", "decoder"), lambda m: (m.encoder.block, m.decoder.block)),
    "make_whisper": (("encoder", "decoder"), lambda m: (m.model.encoder.layers, m.model.decoder.layers)),
}


@pytest.mark.parametrize("maker", sorted(DEEPENED))
def test_modules_sliced_deeper_load_with_every_layer(maker, folder_tensors, tmp_path):
    """Every architecture with several modules: a stack given a layer more loads in transformers with it (each
    count written where transformers reads it), every written tensor loaded and none missing."""
    import tests.stacked_models
    transformers = pytest.importorskip("transformers")
    base = getattr(tests.stacked_models, maker)(str(tmp_path / "models"), n=1)[0]
    architecture = json.loads(open(f"{base}/config.json").read())["architectures"][0]
    deepened, stacks = DEEPENED[maker]
    modules = {module: {"models": [{"model": base}]} for module in MODULES[architecture]}
    depths = [stack_depth(folder_tensors(base), MODULES[architecture], module) for module in deepened]
    for module, depth in zip(deepened, depths):
        modules[module] = {"slices": [{"sources": [{"model": base, "layer_range": [0, depth]}]},
                                      {"sources": [{"model": base, "layer_range": [depth - 1, depth]}]}]}
    merge(parse_config({"merge_method": "passthrough", "modules": modules}), str(tmp_path / "out"), OPTIONS)
    loaded, info = getattr(transformers, architecture).from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    deeper = [depth + 1 for depth in depths]
    assert [len(stack) for stack in stacks(loaded)] == deeper
    assert [stack_depth(folder_tensors(tmp_path / "out"), MODULES[architecture], m) for m in deepened] == deeper
    assert [set(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")] == [set(), set(), set()]


def stack_depth(tensors: dict, layouts: dict, module: str) -> int:
    """The layers of a module's one layer stack, from the tensor names."""
    from merge_engine.io.checkpoint import split_layer_name
    return len({split_layer_name(n)[:2] for n in tensors if module_of(layouts, n) == module and split_layer_name(n)})


def test_many_unknown_modules_are_named_in_one_short_problem(qwen2_vl, tmp_path):
    base, e1, e2 = qwen2_vl
    config = sliced_text(base, e1, e2, **{f"tower_{i}": {"models": [{"model": e1}]} for i in range(1000)})
    with pytest.raises(ConfigError, match=r"modules: 'tower_0', 'tower_1', 'tower_2', 'tower_3', 'tower_4' and 995 more "
                                          r"are not modules of .*qwen2vl-0") as e:
        merge(parse_config(config), str(tmp_path / "out"), OPTIONS)
    assert len(str(e.value)) < 1000


def without_tensors(folder: str, out: str, drop) -> str:
    """A copy of a one-file model folder without the tensors drop(name) picks."""
    shutil.copytree(folder, out)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    save_file({n: t for n, t in tensors.items() if not drop(n)}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    return out


def test_a_module_its_first_model_lacks_is_refused_not_left_out(qwen2_vl, tmp_path):
    # the module was planned from its first model's tensors: none, and the output silently had no vision tower
    base, e1, _ = qwen2_vl
    text_only = without_tensors(base, str(tmp_path / "text-only"),
                                lambda n: n.startswith("visual.") and not n.startswith("visual.merger."))
    config = {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0},
              "modules": {"vision_tower": {"models": [{"model": text_only}, {"model": e1}]}}}
    with pytest.raises(ConfigError, match=r"modules.vision_tower.models: .*text-only holds no tensor of module "
                                          r"'vision_tower' \(named visual.\* or model.visual.\*\)"):
        merge(parse_config(config), str(tmp_path / "out"), OPTIONS)
    assert not (tmp_path / "out").exists()


def test_a_modules_weight_its_first_model_lacks_and_the_others_hold_is_refused(qwen2_vl, tmp_path):
    # as a models: config refuses it; the modules: config left the weight out of the output without a word
    base, e1, e2 = qwen2_vl
    lacking = without_tensors(base, str(tmp_path / "lacking"), lambda n: n == "visual.patch_embed.proj.weight")
    config = {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0},
              "modules": {"vision_tower": {"models": [{"model": lacking}, {"model": e1}, {"model": e2}]}}}
    with pytest.raises(ConfigError, match=r"lacking: tensor 'visual.patch_embed.proj.weight' is missing \(every other "
                                          r"input has it\)"):
        merge(parse_config(config), str(tmp_path / "out"), OPTIONS)
    assert not (tmp_path / "out").exists()


def test_a_base_model_of_another_architecture_with_allow_crimes_gives_its_config(qwen2_vl, model_sets, folder_tensors,
                                                                                 tmp_path):
    # the output's config.json is the base's, which has no such module: KeyError after every tensor was merged
    base, e1, _ = qwen2_vl
    llama = model_sets("llama")[0]
    config = {"merge_method": "linear", "base_model": llama, "dtype": "float32", "parameters": {"weight": 1.0},
              "modules": {"text_decoder": {"slices": [{"sources": [{"model": base, "layer_range": [0, 2]},
                                                                   {"model": e1, "layer_range": [1, 3]}]}]}}}
    merge(parse_config(config), str(tmp_path / "out"), MergeOptions(quiet=True, copy_tokenizer=False,
                                                                    allow_crimes=True))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert stack_depth(folder_tensors(tmp_path / "out"), MODULES["Qwen2VLForConditionalGeneration"],
                       "text_decoder") == 2
