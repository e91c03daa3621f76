"""merge_engine/moe.py: mixture-of-experts models from dense ones (mergekit-moe's configs).

Parity: every output architecture and gate mode against mergekit-moe itself (same seed: bit-identical tensors and
config.json). Semantics, independent of mergekit: a MoE whose experts are all the base computes the base's logits
(so the experts' projections are stacked in the layout transformers reads), cheap_embed gates against an fp64
formula, residual_scale on down projections only, seeded randomness. Refusals: every config problem named before
anything is written."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_engine import MergeOptions
from merge_engine.errors import CheckpointError, ConfigError, MergeEngineError
from merge_engine.moe import build_moe, parse_moe_config
from tests.conftest import find_mergekit

PROMPTS = (["w1 w2 w3", "w4 w5"], ["w10 w11 w12 w13"], ["w20 w21"], ["w30"])


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """{llama, qwen2, qwen3, mistral}: a base and three experts each (bf16 llama; float32 others), with
    word-level tokenizers."""
    from merge_engine.demo import make_models
    from tests.arch_models import make_architecture
    from tests.vocab_models import BASE_TOKENS, save_tokenizer
    root = tmp_path_factory.mktemp("moe")
    sets = {"llama": make_models(str(root / "llama"), "llama", 3, torch.bfloat16, seed=3),
            "qwen2": make_models(str(root / "qwen2"), "qwen2", 3, seed=4),
            "qwen3": make_architecture(str(root / "qwen3"), "qwen3", 4),
            "mistral": make_architecture(str(root / "mistral"), "mistral", 4)}
    for name, paths in sets.items():
        for p in paths:
            save_tokenizer(p, BASE_TOKENS if name in ("llama", "qwen2") else BASE_TOKENS[:128])
    return sets


def moe_config(paths: list[str], gate_mode: str = "hidden", **extra) -> dict:
    """The base and its experts, each with its own prompts; the second expert noised and its residual scaled."""
    experts = [{"source_model": p, "positive_prompts": PROMPTS[i]} for i, p in enumerate(paths[1:])]
    experts[1].update(noise_scale=0.02, residual_scale=0.7, negative_prompts=["w1"])
    return {"base_model": paths[0], "gate_mode": gate_mode, "experts": experts, **extra}


def tensors_of(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def build(config: dict, out, **options) -> None:
    build_moe(config, str(out), MergeOptions(quiet=True, device="cpu", **options))


# ------------------------------------------------------------------------------------------- parity

@pytest.fixture(scope="module")
def mergekit_moe():
    path = find_mergekit()
    if path is None:
        pytest.skip("mergekit is not installed (set MERGEKIT_YAML or run tools/test.sh with MERGEKIT=1)")
    return os.path.join(os.path.dirname(path), "mergekit-moe")


def _parity_cases():
    # (model set, gate mode, extra config keys, shared expert: None, "base" or "first" expert, with prompts?)
    return {
        "mixtral-hidden": ("llama", "hidden", {"dtype": "bfloat16"}, None),
        "mixtral-cheap_embed-mistral": ("mistral", "cheap_embed", {"experts_per_token": 3}, None),
        "mixtral-random": ("llama", "random", {}, None),
        "deepseek-shared": ("llama", "cheap_embed", {"architecture": "deepseek"}, ("base", False)),
        "deepseek-hidden_avg": ("llama", "hidden_avg", {"architecture": "DeepSeek", "dtype": "float32",
                                                         "experts_per_token": 1}, None),
        "qwen-from-llama": ("llama", "hidden_last", {}, ("first", True)),
        "qwen-from-qwen2": ("qwen2", "uniform_random", {"dtype": "bfloat16"}, ("base", True)),
        "qwen3-random-fp16": ("qwen3", "random", {"dtype": "float16"}, None),
    }


@pytest.mark.parametrize("case", _parity_cases())
def test_identical_to_mergekit_moe(case, moe_models, mergekit_moe, tmp_path):
    """The same tensors (bit for bit, noise and random gates included: the same seed) and the same config.json as
    mergekit-moe's. (A shared expert is the base or an expert model: mergekit-moe fails on one that is neither.)"""
    models, gate_mode, extra, shared = _parity_cases()[case]
    paths = moe_models[models]
    config = moe_config(paths, gate_mode, **extra)
    if shared:
        which, prompted = shared
        config["shared_experts"] = [{"source_model": paths[0] if which == "base" else paths[1], "residual_scale": 0.5,
                                     **({"positive_prompts": ["w7 w8"]} if prompted else {})}]
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run([mergekit_moe, str(path), str(tmp_path / "theirs"), "--random-seed", "5"], check=True,
                   capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES=""))
    from merge_engine.cli import main
    assert main(["moe", str(path), str(tmp_path / "ours"), "--random-seed", "5", "--device", "cpu", "-q"]) == 0
    ours, theirs = tensors_of(tmp_path / "ours"), tensors_of(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "theirs")]
    for c in configs:
        c.pop("transformers_version", None)
    assert configs[0] == configs[1]
    assert (tmp_path / "ours" / "mergekit_moe_config.yml").read_text() == path.read_text()
    tokenizer = [json.loads((tmp_path / d / "tokenizer_config.json").read_text()) for d in ("ours", "theirs")]
    tokenizer[1].pop("local_files_only")  # (how mergekit loaded it; ours is saved without that load setting)
    assert tokenizer[0] == tokenizer[1]


# -------------------------------------------------------------------------------------------- semantics

@pytest.mark.parametrize("models, architecture", [("llama", "mixtral"), ("qwen3", "qwen3")])
def test_a_moe_of_copies_of_the_base_computes_the_base(models, architecture, moe_models, tmp_path):
    """Experts that are all the base, routed top-k with renormalised weights, compute the base's MLP: the MoE's
    logits are the base's (to float32 rounding). Swapping gate and up rows, or misordering experts' blocks, would
    not."""
    import transformers
    base = moe_models[models][0]
    config = {"base_model": base, "gate_mode": "random", "architecture": architecture, "dtype": "float32",
              "experts": [{"source_model": base} for _ in range(3)]}
    build_moe(config, str(tmp_path / "moe"), MergeOptions(quiet=True, device="cpu"), allow_all_same=True)
    ids = torch.tensor([[1, 5, 9, 20, 7, 3]])
    with torch.no_grad():
        moe, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"), output_loading_info=True)
        dense = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert type(moe).__name__ == {"mixtral": "MixtralForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}[architecture]
        got, want = moe(ids).logits, dense(ids).logits
    # float32 through a few layers: the MoE sums 2 weighted copies of each MLP output (weights summing to 1 in
    # float32), an error of a few float32 ulps per layer, far below the logits' differences between experts
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def test_every_output_architecture_loads_in_transformers(moe_models, tmp_path):
    """Mixtral, Qwen MoE (from Llama and from Qwen2) and Qwen3 MoE outputs load with every weight and no other,
    and run. (DeepSeek MoE is a remote-code model: not loadable here.)"""
    import transformers
    cases = {"mixtral": moe_config(moe_models["llama"]),
             "qwen_llama": {**moe_config(moe_models["llama"]), "shared_experts": [
                 {"source_model": moe_models["llama"][0], "positive_prompts": ["w9"]}]},
             "qwen_qwen2": {**moe_config(moe_models["qwen2"], "cheap_embed"), "shared_experts": [
                 {"source_model": moe_models["qwen2"][1], "positive_prompts": ["w9"]}]},
             "qwen3": moe_config(moe_models["qwen3"], "cheap_embed")}
    for name, config in cases.items():
        build(config, tmp_path / name)
        model, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / name), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], name
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all(), name


def test_cheap_embed_gates_are_the_normalised_sum_of_the_prompt_embeddings(moe_models, tmp_path):
    """Each expert's router row, in every layer: the sum of its positive prompts' token embeddings (BOS first where
    the tokenizer has one) minus its negative prompts', normalised; checked in fp64 from the tokenizer's ids."""
    import transformers
    paths = moe_models["mistral"]
    config = moe_config(paths, "cheap_embed", dtype="float32")
    build(config, tmp_path / "moe")
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths[0])
    embeddings = load_file(os.path.join(paths[0], "model.safetensors"))["model.embed_tokens.weight"].double()

    def summed(prompts):
        texts = [(tokenizer.bos_token or "") + p for p in prompts]
        ids = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
        v = embeddings[ids].sum(0)
        return v / v.norm()
    rows = []
    for e in config["experts"]:
        v = summed(e["positive_prompts"])
        if e.get("negative_prompts"):
            v = v - summed(e["negative_prompts"])
        rows.append(v / v.norm())
    want = torch.stack(rows)
    out = tensors_of(tmp_path / "moe")
    for layer in range(3):
        got = out[f"model.layers.{layer}.mlp.gate.weight"].double()
        # float32 sums of a few dozen rows, normalised twice: within 1e-6 of the fp64 value
        assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()


def test_gates_of_prompts_without_tokens_are_warned_of(moe_models, tmp_path, caplog):
    """cheap_embed prompts that tokenize to nothing (a tokenizer without BOS) sum no embeddings: zero router rows, as
    mergekit writes them. Every row zero has no condition number (NaN, not above the threshold): the warning that a
    router cannot tell its experts apart must still name it."""
    paths = moe_models["mistral"]
    config = {"base_model": paths[0], "gate_mode": "cheap_embed",
              "experts": [{"source_model": paths[1], "positive_prompts": [""]},
                          {"source_model": paths[2], "positive_prompts": [" "]}]}
    build(config, tmp_path / "moe")
    assert not tensors_of(tmp_path / "moe")["model.layers.0.mlp.gate.weight"].any()
    assert "the gate vectors of every layer are nearly dependent" in caplog.text
    caplog.clear()  # non-finite rows (a base whose hidden states overflow) fail SVD: named, not a traceback
    from merge_engine.moe import warn_degenerate_gates
    vectors = torch.randn(3, 2, 64)
    vectors[1, 0, 5] = float("nan")
    warn_degenerate_gates(vectors)
    assert "the gate vectors of layer(s) 1 are nearly dependent" in caplog.text


def test_residual_scale_applies_to_down_projections_only(moe_models, tmp_path):
    paths = moe_models["qwen3"]
    config = moe_config(paths, "random", dtype="float32")
    for e in config["experts"]:
        e.pop("noise_scale", None)
    build(config, tmp_path / "moe")
    out = tensors_of(tmp_path / "moe")
    expert = load_file(os.path.join(paths[2], "model.safetensors"))  # the second expert: residual_scale 0.7
    fused = out["model.layers.1.mlp.experts.down_proj"][1]
    assert torch.equal(fused, expert["model.layers.1.mlp.down_proj.weight"] * 0.7)
    gate_up = out["model.layers.1.mlp.experts.gate_up_proj"][1]
    assert torch.equal(gate_up, torch.cat([expert["model.layers.1.mlp.gate_proj.weight"],
                                           expert["model.layers.1.mlp.up_proj.weight"]]))
    base = load_file(os.path.join(paths[0], "model.safetensors"))
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"])


def test_random_gates_and_noise_follow_the_seed(moe_models, tmp_path):
    config = moe_config(moe_models["llama"], "random")
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        build(config, tmp_path / name, random_seed=seed)
    a, b, c = (tensors_of(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.gate.weight"], c["model.layers.0.mlp.gate.weight"])
    noised = "model.layers.0.mlp.experts.gate_up_proj"  # expert 2 has noise_scale
    assert not torch.equal(a[noised][1], c[noised][1]) and torch.equal(a[noised][0], c[noised][0])


# --------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("change, match", [
    ({"gate_mode": "hiddne"}, "gate_mode: expected one of"),
    ({"architecture": "switch"}, "no output architecture is named 'switch'"),
    ({"experts_per_token": 0}, "experts_per_token must be at least 1"),
    ({"experts_per_token": 4}, "experts_per_token is 4 but only 3 expert"),
    ({"experts_per_token": "two"}, "experts_per_token: expected a whole number"),
    ({"experts": []}, "experts: expected a list of experts"),
    ({"dtype": "float8"}, "dtype"),
])
def test_config_problems_are_named(change, match):
    config = {**moe_config(["b", "e1", "e2", "e3"]), **change}
    with pytest.raises(ConfigError, match=match):
        parse_moe_config(config)


def test_configs_that_cannot_route_are_refused_as_mergekit_refuses_them():
    config = moe_config(["b", "e1", "e2", "e3"])
    config["experts"][2].pop("positive_prompts")
    with pytest.raises(ConfigError, match=r"experts\[2\]: positive_prompts are needed"):
        parse_moe_config(config)
    parse_moe_config({**config, "gate_mode": "random"})  # random gates need no prompts
    same = {"base_model": "b", "experts": [{"source_model": "e", "positive_prompts": ["x"]}] * 2}
    with pytest.raises(ConfigError, match="same positive and negative prompts") as refused:
        parse_moe_config(same)
    assert "same model" in str(refused.value)  # every problem at once
    different = {**same, "experts": [{"source_model": "e", "positive_prompts": [p]} for p in "xy"]}
    with pytest.raises(ConfigError, match="i-understand-this-is-not-useful-without-training"):
        parse_moe_config(different)
    parse_moe_config(different, allow_all_same=True)
    with pytest.raises(ConfigError, match="every shared expert or to none"):
        parse_moe_config({**config, "gate_mode": "random", "shared_experts": [
            {"source_model": "s", "positive_prompts": ["x"]}, {"source_model": "t"}]})


def test_unknown_keys_warn_or_are_refused_with_strict(caplog):
    config = {**moe_config(["b", "e1", "e2", "e3"]), "gate_mod": "random"}
    config["experts"][0]["prompt"] = ["x"]
    parse_moe_config(config)
    assert "gate_mod" in caplog.text and "prompt" in caplog.text
    with pytest.raises(ConfigError, match=r"(?s)unknown key\(s\) \['gate_mod'\].*experts\[0\]: unknown key"):
        parse_moe_config(config, strict=True)


def test_an_architecture_that_cannot_take_the_models_is_refused_with_every_reason(moe_models, tmp_path):
    qwen2 = moe_models["qwen2"]
    with pytest.raises(ConfigError, match=r"(?s)Mixtral needs every model to be one of llama/mistral.*"
                                          r"Qwen MoE needs exactly one shared expert"):
        build(moe_config(qwen2, "random"), tmp_path / "out")
    mixed = moe_config([moe_models["llama"][0], *moe_models["llama"][1:3], moe_models["mistral"][1]], "random")
    with pytest.raises(ConfigError, match="all the same"):
        build(mixed, tmp_path / "out")
    with pytest.raises(ConfigError, match="Qwen3 MoE needs every model to be one of qwen3"):
        build({**moe_config(moe_models["llama"], "random"), "architecture": "qwen3"}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_mismatched_expert_tensors_are_named_before_anything_is_written(moe_models, tmp_path):
    import shutil

    from safetensors.torch import save_file
    paths = moe_models["llama"]
    broken = shutil.copytree(paths[2], tmp_path / "broken")
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.2.mlp.down_proj.weight"] = tensors["model.layers.2.mlp.down_proj.weight"][:, :100].clone()
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    config = moe_config([paths[0], paths[1], str(broken), paths[3]], "random")
    with pytest.raises(ConfigError) as refused:
        build(config, tmp_path / "out")
    text = str(refused.value)
    assert f"{broken}: expert model lacks tensor 'model.layers.1.mlp.up_proj.weight'" in text
    assert "'model.layers.2.mlp.down_proj.weight' is [64, 100]" in text and "do not stack" in text
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_a_missing_model_or_tokenizer_is_named(moe_models, tmp_path):
    import shutil
    paths = moe_models["llama"]
    with pytest.raises(ConfigError, match=str(tmp_path / "nowhere")):
        build(moe_config([paths[0], paths[1], str(tmp_path / "nowhere"), paths[3]]), tmp_path / "out")
    bare = shutil.copytree(paths[0], tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(CheckpointError, match="cannot load the base model's tokenizer"):
        build(moe_config([str(bare), *paths[1:]], "cheap_embed"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    build(moe_config([str(bare), *paths[1:]], "random"), tmp_path / "out")  # random gates: no tokenizer needed
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_an_existing_output_is_kept_unless_overwrite(moe_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    config = moe_config(moe_models["llama"], "random")
    with pytest.raises(MergeEngineError, match="not empty"):
        build(config, out)
    assert (out / "mine.txt").read_text() == "keep"
    build(config, out, overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "config.json").exists()


def test_command_line(moe_models, tmp_path, capsys):
    from merge_engine.cli import main
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(moe_config(moe_models["llama"], "random")))
    assert main(["moe", str(path), str(tmp_path / "out"), "--device", "cpu", "--no-copy-tokenizer"]) == 0
    assert "built a Mixtral model of 3 experts" in capsys.readouterr().out
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert main(["moe", str(path), str(tmp_path / "out2"), "--load-in-4bit"]) == 2
    assert "--load-in-4bit/--load-in-8bit are not supported" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
    same = tmp_path / "same.yml"
    same.write_text(yaml.safe_dump({"base_model": moe_models["llama"][0], "gate_mode": "cheap_embed", "experts": [
        {"source_model": moe_models["llama"][1], "positive_prompts": [p]} for p in ("w1", "w2")]}))
    assert main(["moe", str(same), str(tmp_path / "out3"), "-q"]) == 2
    flag = "--i-understand-this-is-not-useful-without-training"
    assert main(["moe", str(same), str(tmp_path / "out3"), "-q", flag]) == 0


def test_the_model_card_names_the_experts_and_their_prompts(moe_models, tmp_path):
    config = moe_config(moe_models["llama"], "cheap_embed")
    build(config, tmp_path / "moe")
    card = (tmp_path / "moe" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "# A Mixtral mixture of 3 experts" in card
    assert f"* {moe_models['llama'][2]}: 'w10 w11 w12 w13' (not 'w1')" in card
    assert yaml.safe_load(card.split("```yaml\n")[1].split("```")[0]) == config  # the config that makes it
    assert yaml.safe_load((tmp_path / "moe" / "mergekit_moe_config.yml").read_text()) == config
    build(config, tmp_path / "bare", write_model_card=False)
    assert not {"README.md", "mergekit_moe_config.yml"} & set(os.listdir(tmp_path / "bare"))


def test_an_expert_given_as_base_plus_adapter_brings_its_adapted_weights(moe_models, tmp_path):
    """BASE+ADAPTER experts read with the adapter merged (mergekit-moe refuses them: its loaders need merged
    references): the expert's down projections are the adapted ones, as a merge engine read gives them."""
    from merge_engine.io.lora import open_model
    from tests.lora_adapters import write_adapter
    paths = moe_models["qwen3"]
    adapter = str(tmp_path / "adapter")
    write_adapter(adapter, paths[1], targets=("down_proj",))
    config = moe_config([paths[0], f"{paths[1]}+{adapter}", paths[2], paths[3]], "random", dtype="float32")
    config["experts"][1].pop("noise_scale")
    build(config, tmp_path / "moe")
    out = tensors_of(tmp_path / "moe")
    adapted = open_model(f"{paths[1]}+{adapter}")
    want = adapted.read("model.layers.2.mlp.down_proj.weight")
    plain = load_file(os.path.join(paths[1], "model.safetensors"))["model.layers.2.mlp.down_proj.weight"]
    assert not torch.equal(want, plain)
    assert torch.equal(out["model.layers.2.mlp.experts.down_proj"][0], want)


def test_a_config_mapping_with_values_yaml_cannot_hold_is_refused_by_name():
    config = moe_config(["b", "e1", "e2", "e3"])
    config["experts"][0]["source_model"] = __import__("pathlib").Path("e1")
    with pytest.raises(ConfigError, match=r"experts\[0\].source_model: expected a model path"):
        parse_moe_config(config)


@pytest.mark.parametrize("given, taken", [(2.0, 2), ("3.0", 3), (" 2 ", 2)])
def test_experts_per_token_is_read_as_mergekit_reads_it(given, taken):
    """mergekit's schema takes a whole number written as a float or text (2.0, "3.0"): so does this one."""
    assert parse_moe_config({**moe_config(["b", "e1", "e2", "e3"]), "experts_per_token": given}).experts_per_token == taken


def test_prompts_the_base_cannot_run_are_named_before_anything_is_written(moe_models, tmp_path):
    """gate_mode hidden runs the base on each expert's prompts: a prompt of no tokens (this tokenizer adds no BOS) or
    with a token id past the embeddings' rows is named, not a traceback from inside the model."""
    import shutil

    from tests.vocab_models import BASE_TOKENS, save_tokenizer
    paths = moe_models["llama"]
    config = moe_config(paths, "hidden")
    config["experts"][1]["positive_prompts"] = [""]
    with pytest.raises(MergeEngineError, match=r"experts\[1\]\.positive_prompts: \[''\] tokenize to no tokens"):
        build(config, tmp_path / "out")
    big = shutil.copytree(paths[0], tmp_path / "big")
    save_tokenizer(str(big), BASE_TOKENS + ["extra"])
    config = moe_config([str(big), *paths[1:]], "hidden")
    config["experts"][0]["negative_prompts"] = ["extra w1"]
    with pytest.raises(MergeEngineError, match=rf"experts\[0\]\.negative_prompts: the tokenizer of {big} gives token id 256 "
                                                r"but its 'model.embed_tokens.weight' has 256 rows"):
        build(config, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def _half_mlp_copy(src: str, dst) -> str:
    """A copy of a dense model with half its MLP width (a consistent model of another intermediate_size)."""
    import shutil

    from safetensors.torch import save_file
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    for name, t in tensors.items():
        if ".mlp." in name:
            tensors[name] = (t[:, : t.shape[1] // 2] if "down_proj" in name else t[: t.shape[0] // 2]).clone()
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] // 2}))
    return str(dst)


def test_experts_whose_mlp_is_not_the_bases_size_are_refused(moe_models, tmp_path):
    """The output's config.json takes the base's hidden and intermediate sizes: an expert's MLP of other sizes would
    not load (or, one expert per tensor as DeepSeek MoE and Qwen MoE store them, load as another model), even where
    every expert has the same sizes and so stacks. (mergekit writes both.)"""
    paths = moe_models["llama"]
    half = [_half_mlp_copy(p, tmp_path / f"half{i}") for i, p in enumerate(paths[1:3])]
    one_half = {**moe_config([paths[0], paths[1], half[1], paths[3]], "random"), "architecture": "deepseek"}
    with pytest.raises(ConfigError) as refused:
        build(one_half, tmp_path / "out")
    assert (f"{half[1]}: tensor 'model.layers.0.mlp.down_proj.weight' is [64, 56] but the base's config.json "
            "(hidden_size 64, intermediate_size 112) makes it [64, 112]") in str(refused.value)
    all_half = {**moe_config([paths[0], *half], "random"), "experts_per_token": 1}
    with pytest.raises(ConfigError, match=rf"{half[0]}: tensor 'model.layers.3.mlp.gate_proj.weight' is \[56, 64\]"):
        build(all_half, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_qwen_moe_zero_biases_take_the_projections_sizes(tmp_path):
    """A Mistral base whose head_dim is not hidden_size / heads: Qwen MoE's zero attention biases have its
    projections' rows (mergekit sizes them hidden_size / heads per head: a model that does not load)."""
    import transformers

    from tests.arch_models import DECODER
    base = str(tmp_path / "base")
    torch.manual_seed(0)
    transformers.MistralForCausalLM(transformers.MistralConfig(**{**DECODER, "head_dim": 16})).save_pretrained(base)
    config = {"base_model": base, "gate_mode": "random", "experts": [{"source_model": base}] * 2,
              "shared_experts": [{"source_model": base}], "architecture": "qwen"}
    build_moe(config, str(tmp_path / "moe"), MergeOptions(quiet=True, device="cpu"), allow_all_same=True)
    out = tensors_of(tmp_path / "moe")
    assert out["model.layers.0.self_attn.q_proj.bias"].shape == (64,)  # 4 heads of 16
    assert out["model.layers.0.self_attn.k_proj.bias"].shape == (32,)  # 2 key-value heads of 16
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]


def test_a_base_without_the_head_its_config_does_not_tie_is_refused(moe_models, tmp_path):
    """A base whose config.json keeps its head apart from the embeddings (tie_word_embeddings false) but lacks
    lm_head.weight: the output would load with a random head (mergekit writes it). A tied base has none to lack."""
    import shutil

    from safetensors.torch import save_file
    headless = shutil.copytree(moe_models["llama"][0], tmp_path / "headless")
    tensors = load_file(str(headless / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(headless / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=f"{headless}: the base model lacks tensor 'lm_head.weight'"):
        build(moe_config([str(headless), *moe_models["llama"][1:]], "random"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    tied = moe_models["qwen2"]  # (tie_word_embeddings true, no lm_head.weight)
    build({**moe_config(tied, "random"), "shared_experts": [{"source_model": tied[0]}]}, tmp_path / "out")
    assert "lm_head.weight" not in tensors_of(tmp_path / "out")


def test_a_base_adapter_that_replaces_a_tied_head_unties_it_in_the_output(moe_models, tmp_path):
    """BASE+ADAPTER whose adapter saves an output head of its own (modules_to_save) for a base that ties it: the output
    keeps that head, and its config.json says it is not tied (else loaders tie it to the embeddings and drop it)."""
    import transformers
    from safetensors.torch import save_file

    from tests.lora_adapters import write_adapter
    paths = moe_models["qwen2"]
    adapter = tmp_path / "adapter"
    tensors = write_adapter(str(adapter), paths[0], modules_to_save=("lm_head",))
    head = load_file(os.path.join(paths[0], "model.safetensors"))["model.embed_tokens.weight"] + 0.5
    save_file({**tensors, "base_model.model.lm_head.weight": head}, str(adapter / "adapter_model.safetensors"))
    config = {**moe_config([f"{paths[0]}+{adapter}", *paths[1:]], "random"), "shared_experts": [
        {"source_model": paths[1]}]}
    build(config, tmp_path / "out")
    assert torch.equal(tensors_of(tmp_path / "out")["lm_head.weight"], head)
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "out")).tie_word_embeddings is False


def test_an_expert_layout_the_command_does_not_write_is_refused(moe_models, tmp_path, capsys):
    """--expert-layout checkpoint (one tensor per expert) asks for a layout merge-engine moe does not write: refused,
    not a fused output."""
    from merge_engine.cli import main
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(moe_config(moe_models["llama"], "random")))
    assert main(["moe", str(path), str(tmp_path / "out"), "--device", "cpu", "--expert-layout", "checkpoint"]) == 2
    assert "--expert-layout checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_config_file_inside_the_output_folder_is_kept(moe_models, tmp_path):
    """build_moe given the path of a YAML inside the output folder: refused even with overwrite, as the command refuses
    it (replacing the folder would delete the user's config)."""
    out = tmp_path / "out"
    out.mkdir()
    path = out / "moe.yml"
    path.write_text(yaml.safe_dump(moe_config(moe_models["llama"], "random")))
    with pytest.raises(MergeEngineError, match=f"the input {path} is inside the output folder"):
        build_moe(str(path), str(out), MergeOptions(quiet=True, device="cpu", overwrite=True))
    assert os.listdir(out) == ["moe.yml"]


def test_base_tensors_the_output_has_no_place_for_are_named_in_a_warning(tmp_path, caplog):
    """A Llama base with attention and MLP biases: a Mixtral output has none, so they are left out, as mergekit
    leaves them out (its output is the same), with a warning naming them; a Qwen MoE output keeps q, k and v's."""
    import transformers

    from tests.arch_models import DECODER
    base = str(tmp_path / "base")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER, attention_bias=True,
                                                                 mlp_bias=True)).save_pretrained(base)
    experts = [{"source_model": base}] * 2
    build_moe({"base_model": base, "gate_mode": "random", "experts": experts}, str(tmp_path / "mixtral"),
              MergeOptions(quiet=True, device="cpu"), allow_all_same=True)
    assert "model.layers.0.self_attn.q_proj.bias" not in tensors_of(tmp_path / "mixtral")
    assert "21 of the base's tensors have no place in a Mixtral output" in caplog.text  # 3 layers of 7
    assert "'model.layers.0.mlp.down_proj.bias'" in caplog.text
    caplog.clear()
    build_moe({"base_model": base, "gate_mode": "random", "experts": experts, "architecture": "qwen",
               "shared_experts": [{"source_model": base}]}, str(tmp_path / "qwen"),
              MergeOptions(quiet=True, device="cpu"), allow_all_same=True)
    assert "12 of the base's tensors have no place in a Qwen MoE output" in caplog.text  # 3 layers of 4
    assert "model.layers.0.self_attn.q_proj.bias" in tensors_of(tmp_path / "qwen")


def test_a_base_config_transformers_refuses_is_one_line(moe_models, tmp_path):
    """(A head count not dividing the width fails huggingface_hub's config validation with an error that is no
    ValueError: it ended in a traceback.)"""
    import json
    import shutil
    paths = moe_models["llama"]
    bad = shutil.copytree(paths[0], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
    with pytest.raises(CheckpointError, match="cannot read its config.json as a transformers config.*multiple"):
        build(moe_config([str(bad), *paths[1:]], "random"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
