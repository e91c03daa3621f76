"""Keying and unkeying sharded checkpoints: bit-for-bit round trips (streamed and in place, single keys and a
two-key tier), agreement with an independent by-hand permutation, models that still load and run, refusals."""
import os
import shutil

import pytest
import torch

from merge_engine.errors import CheckpointError, OutputError
from merge_engine.tiers import (
    BlockPermutation,
    TierKey,
    TierKeyError,
    apply_key,
    apply_key_in_place,
    generate_key,
    remove_key,
    remove_key_in_place,
)
from tests.conftest import folder_digest, pickled_copy
from tests.tiers.conftest import bits, read_config, same_files, swap_by_hand

ARCHS = ("llama", "qwen2", "gpt2")  # round trips; GPT-Neo joins the by-hand and symmetry checks


def tier_keys(cfg: dict) -> list[TierKey]:
    """Two keys with both kinds of block (a large fraction: the models are tiny)."""
    return [generate_key(cfg, "first secret", 0.3, 0.6), generate_key(cfg, "second secret", 0.25, 0.6)]


def assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(bits(got[name]), bits(want[name])), name


@pytest.mark.parametrize("arch", ARCHS + ("gpt_neo",))
def test_streamed_tier_matches_by_hand_and_round_trips(arch, tier_model, folder_tensors, tmp_path):
    model = tier_model(arch)
    cfg = read_config(model)
    k1, k2 = tier_keys(cfg)
    assert k1.attn_heads and k2.attn_heads
    run = apply_key(model, [k1, k2], str(tmp_path / "keyed"))
    assert run.tensors_changed > 0
    original = folder_tensors(model)
    assert_same_tensors(folder_tensors(tmp_path / "keyed"), swap_by_hand(swap_by_hand(original, cfg, k1), cfg, k2))
    assert sorted(os.listdir(tmp_path / "keyed")) == sorted(os.listdir(model))  # same shards, index, side files
    remove_key(str(tmp_path / "keyed"), [k1, k2], str(tmp_path / "public"))
    same_files(model, tmp_path / "public")
    assert sorted(os.listdir(tmp_path)) == ["keyed", "public"]  # no temporary folders left


@pytest.mark.parametrize("arch", ARCHS)
def test_in_place_tier_matches_streamed_and_round_trips(arch, tier_model, tmp_path):
    model = tier_model(arch)
    k1, k2 = tier_keys(read_config(model))
    apply_key(model, [k1, k2], str(tmp_path / "streamed"))
    work = shutil.copytree(model, tmp_path / "work")
    apply_key_in_place(str(work), [k1, k2])
    same_files(tmp_path / "streamed", work)
    remove_key_in_place(str(work), [k1, k2])
    same_files(model, work)  # the journal is gone too


def test_single_key_round_trip_in_place_one_by_one(tier_model, tmp_path):
    model = tier_model("qwen2")
    k1, k2 = tier_keys(read_config(model))
    work = str(shutil.copytree(model, tmp_path / "work"))
    apply_key_in_place(work, k1)
    apply_key_in_place(work, k2)
    remove_key_in_place(work, [k1, k2])  # a tier is removed as a whole
    same_files(model, work)


def within_layer_swaps(cfg) -> BlockPermutation:
    heads = 2 if cfg["model_type"] == "qwen2" else 4  # KV groups
    return BlockPermutation.from_swaps({"attn_heads": [((layer, 0), (layer, heads - 1)) for layer in range(4)],
                                        "mlp_cols": [((layer, 3), (layer, 40)) for layer in range(4)]})


@pytest.mark.parametrize("arch", ARCHS + ("gpt_neo",))
def test_keyed_models_load_and_within_layer_swaps_are_symmetries(arch, tier_model, tmp_path):
    """A keyed model is an ordinary checkpoint; permuting whole blocks inside a layer leaves the function unchanged,
    which checks that a block's rows and columns (a KV group's, on Qwen2) are exactly those that belong together."""
    transformers = pytest.importorskip("transformers")
    model = tier_model(arch)
    cfg = read_config(model)
    apply_key(model, tier_keys(cfg)[:1], str(tmp_path / "keyed"))
    apply_key(model, within_layer_swaps(cfg), str(tmp_path / "symmetric"))
    tokens = torch.arange(3, 19)[None]
    logits = {}
    for name, folder in (("public", model), ("keyed", tmp_path / "keyed"), ("symmetric", tmp_path / "symmetric")):
        lm = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            logits[name] = lm(tokens).logits
    assert torch.isfinite(logits["keyed"]).all()
    assert not torch.allclose(logits["keyed"], logits["public"], atol=1e-3)
    torch.testing.assert_close(logits["symmetric"], logits["public"], atol=1e-4, rtol=1e-4)


def test_key_for_another_architecture_or_layer_count_is_refused(tier_model, tmp_path):
    model = tier_model("qwen2")
    llama_key = tmp_path / "llama.json"
    generate_key(read_config(tier_model("llama")), "s", 0.1).save(str(llama_key))
    with pytest.raises(TierKeyError, match="model_type 'llama'.*qwen2") as e:
        apply_key(model, TierKey.load(str(llama_key)), str(tmp_path / "out"))
    assert str(llama_key) in str(e.value)
    deeper = dict(read_config(model), num_hidden_layers=6)
    with pytest.raises(TierKeyError, match="num_layers 6.*num_layers 4"):
        apply_key_in_place(model, generate_key(deeper, "s", 0.1))
    published = TierKey.from_json('{"attn_heads": [], "mlp_cols": [[[0, 1], [5, 2]]]}', source="pub.json")
    with pytest.raises(TierKeyError, match="pub.json.*layer 5.*4 layers"):
        apply_key(model, published, str(tmp_path / "out"))
    gqa_heads = TierKey.from_json('{"attn_heads": [[[0, 3], [1, 0]]], "mlp_cols": []}', source="heads.json")
    with pytest.raises(TierKeyError, match="KV group.*3.*2 per layer"):
        apply_key(model, gqa_heads, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == ["llama.json"]  # nothing else left behind


def test_output_rules(tier_model, tmp_path):
    model = tier_model("gpt2")
    key = generate_key(read_config(model), "s", 0.1)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):
        apply_key(model, key, str(tmp_path / "taken"))
    assert os.listdir(tmp_path / "taken") == ["precious.txt"]
    with pytest.raises(OutputError, match="--in-place"):
        apply_key(model, key, model, overwrite=True)
    apply_key(model, key, str(tmp_path / "taken"), overwrite=True)
    assert "precious.txt" not in os.listdir(tmp_path / "taken")
    with pytest.raises(OutputError, match="inside the input folder"):  # a second model among the model's files
        apply_key(model, key, os.path.join(model, "keyed"))
    assert not os.path.exists(os.path.join(model, "keyed"))
    key.save(str(tmp_path / "taken" / "key.json"))  # the key would go with the folder --overwrite replaces
    with pytest.raises(OutputError, match="key.json is inside the output folder"):
        apply_key(model, TierKey.load(str(tmp_path / "taken" / "key.json")), str(tmp_path / "taken"), overwrite=True)
    assert (tmp_path / "taken" / "key.json").exists()


def test_other_weight_formats_are_not_copied(tier_model, tmp_path):
    model = shutil.copytree(tier_model("llama"), tmp_path / "model")
    (model / "pytorch_model.bin").write_bytes(b"unkeyed weights")
    (model / "tokenizer.json").write_text("{}")
    apply_key(str(model), generate_key(read_config(model), "s", 0.1), str(tmp_path / "keyed"))
    copied = os.listdir(tmp_path / "keyed")
    assert "tokenizer.json" in copied and "pytorch_model.bin" not in copied


def test_shape_mismatch_names_the_file_and_tensor(tier_model, tmp_path):
    model = shutil.copytree(tier_model("llama"), tmp_path / "model")
    config = (model / "config.json").read_text().replace('"intermediate_size": 112', '"intermediate_size": 128')
    (model / "config.json").write_text(config)
    shape_error = r"safetensors: tensor .model.layers.0.mlp.gate_proj.weight. has shape \[112, 64\]"
    with pytest.raises(CheckpointError, match=shape_error):
        apply_key(str(model), generate_key(read_config(model), "s", 0.1), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_layer_in_another_dtype_is_refused_by_name_before_anything_is_written(tier_model, tmp_path):
    # blocks move between layers as bits: an fp16 down_proj among bf16 ones would be read as bf16
    from safetensors.torch import load_file, save_file
    model = shutil.copytree(tier_model("llama"), tmp_path / "model")
    name = "model.layers.2.mlp.down_proj.weight"
    shard = next(f for f in model.glob("*.safetensors") if name in load_file(str(f)))
    tensors = load_file(str(shard))
    tensors[name] = tensors[name].half()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    key = generate_key(read_config(model), "s", 0.5, 0.5)
    with pytest.raises(CheckpointError, match=f"{shard}: tensor '{name}' is float16 but "
                                              r"'model.layers.0.mlp.down_proj.weight' \(.*\) is bfloat16"):
        apply_key(str(model), key, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_pickled_models_are_refused_by_the_rewrites_that_keep_a_models_files(tier_model, tmp_path):
    """Keys (streamed or in place) and patches in place keep the input's own safetensors files and offsets: a
    pickled model (read by merges) is refused by name, before any change, with nothing left behind."""
    from merge_engine.patches import apply_patches_in_place, extract_patch
    model = tier_model("llama")
    pickled = pickled_copy(model, tmp_path / "pickled")
    before = folder_digest(pickled)
    k1, _ = tier_keys(read_config(model))
    match = r"pytorch_model\.bin: a torch\.save pickle file; {} keeps"
    with pytest.raises(CheckpointError, match=match.format("writing a keyed or patched copy")):
        apply_key(pickled, k1, str(tmp_path / "keyed"))
    with pytest.raises(CheckpointError, match=match.format("keying in place")):
        apply_key_in_place(pickled, k1)
    apply_key(model, k1, str(tmp_path / "tuned"))
    extract_patch(model, str(tmp_path / "tuned"), str(tmp_path / "patch"))
    with pytest.raises(CheckpointError, match=match.format("patching in place")):
        apply_patches_in_place(pickled, [str(tmp_path / "patch")], check_base=False)
    assert folder_digest(pickled) == before and sorted(os.listdir(tmp_path)) == ["patch", "pickled", "tuned"]
