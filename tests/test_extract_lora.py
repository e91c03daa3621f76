"""merge_engine/extract_lora.py: a fine-tune's difference as a PEFT LoRA adapter, as mergekit-extract-lora extracts
it: parity with mergekit-extract-lora (tensors and adapter_config.json), the adapter read back onto its base gives
the fine-tune (full rank), and refusals before anything is written."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_engine.errors import ConfigError, MergeEngineError
from merge_engine.extract_lora import ExtractOptions, extract_lora
from tests.conftest import find_mergekit


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """{llama, qwen2, qwen3}: (base, fine-tune) folders (bf16 Llama; float32 Qwen2 with tied embeddings and
    attention biases; Qwen3 with q/k norms)."""
    from merge_engine.demo import make_models
    from tests.arch_models import make_architecture
    root = tmp_path_factory.mktemp("extract")
    llama = make_models(str(root / "llama"), "llama", 1, torch.bfloat16, seed=3)
    qwen2 = make_models(str(root / "qwen2"), "qwen2", 1, seed=4)
    qwen3 = make_architecture(str(root / "qwen3"), "qwen3", 2)
    return {"llama": llama, "qwen2": qwen2, "qwen3": qwen3}


CASES = {
    "llama-rank8": ("llama", ["--max-rank", "8"]),
    "qwen2-undistributed": ("qwen2", ["--max-rank", "4", "--no-distribute-scale"]),
    "llama-embed-lora-excluded": ("llama", ["--max-rank", "16", "--embed-lora", "-e", "down_proj"]),
    # (mergekit-extract-lora fails on --save-module unless nothing is added to modules_to_save: hence --embed-lora
    # and --skip-undecomposable here; merge_engine takes it with any other option)
    "qwen3-epsilon-skip-save": ("qwen3", ["--max-rank", "200", "--sv-epsilon", "0.01", "--skip-undecomposable",
                                          "--embed-lora", "--save-module", "o_proj"]),
}


@pytest.mark.parametrize("case", CASES)
def test_identical_to_mergekit_extract_lora(case, pairs, tmp_path):
    mergekit = find_mergekit()
    if mergekit is None:
        pytest.skip("mergekit is not installed (set MERGEKIT_YAML or run tools/test.sh with MERGEKIT=1)")
    models, flags = CASES[case]
    base, tuned = pairs[models]
    argv = ["--model", tuned, "--base-model", base, *flags]
    subprocess.run([os.path.join(os.path.dirname(mergekit), "mergekit-extract-lora"), *argv, "--out-path",
                    str(tmp_path / "theirs")], check=True, capture_output=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES=""))
    from merge_engine.cli import main
    assert main(["extract-lora", *argv, "--out-path", str(tmp_path / "ours"), "-q"]) == 0
    ours, theirs = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "theirs"))
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs")]
    configs[1]["target_modules"] = sorted(configs[1]["target_modules"])  # (mergekit's: a set's order)
    assert configs[0] == configs[1]


def test_a_full_rank_adapter_read_onto_its_base_gives_the_fine_tune(pairs, tmp_path):
    """Rank 64 is full for every weight of these 64-wide models, so base + B @ A is the fine-tune up to roundings:
    A and B rounded to bf16 (relative 2^-9 each) make each element of B @ A off by at most
    2 * 2^-9 * sum_k |B_ik| |A_kj| = 2^-8 (|B| @ |A|)_ij (fp32 products and sums add far less), and the sum is
    rounded once to bf16 (one ulp of the fine-tune's weight). Modules saved whole come back exactly."""
    from merge_engine.io.checkpoint import Checkpoint
    from merge_engine.io.lora import open_model
    from tests.conftest import ulp
    base, tuned = pairs["llama"]
    extract_lora(tuned, base, str(tmp_path / "adapter"), ExtractOptions(max_rank=64, embed_lora=True))
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    adapted, want = open_model(f"{base}+{tmp_path / 'adapter'}"), Checkpoint(tuned)
    factored = 0
    for name in want.tensors:
        got, expected = adapted.read(name).float(), want.read(name).float()
        module = "base_model.model." + name.removesuffix(".weight")
        if f"{module}.lora_A.weight" in adapter:
            a, b = adapter[f"{module}.lora_A.weight"].float(), adapter[f"{module}.lora_B.weight"].float()
            bound = 2 ** -8 * (b.abs() @ a.abs())
        elif f"{module}.lora_embedding_A" in adapter:
            a, b = adapter[f"{module}.lora_embedding_A"].float(), adapter[f"{module}.lora_embedding_B"].float()
            bound = 2 ** -8 * (b.abs() @ a.abs()).T
        else:
            assert torch.equal(got, expected), name
            continue
        factored += 1
        assert ((got - expected).abs() <= bound + ulp(expected, torch.bfloat16)).all(), name
    assert factored == 4 * 7 + 2  # every layer's 7 linear weights, the embeddings and the head


def test_what_each_module_becomes(pairs, tmp_path):
    base, tuned = pairs["qwen2"]
    options = ExtractOptions(max_rank=4, include_regexes=["layers\\.1\\."])
    report = extract_lora(tuned, base, str(tmp_path / "a"), options)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    # embeddings (tied head too) and norms whole; only layer 1's linear weights factored, biases as lora_B.bias
    assert config["modules_to_save"] == ["embed_tokens", "input_layernorm", "post_attention_layernorm", "lm_head"]
    assert set(report.ranks) == {f"model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                                "self_attn.v_proj", "self_attn.o_proj",
                                                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.bias" in tensors
    tied = load_file(os.path.join(tuned, "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(tensors["base_model.model.lm_head.weight"], tied)
    assert config["r"] == config["lora_alpha"] == 4 and config["rank_pattern"] == {}


def test_bad_input_is_refused_before_anything_is_written(pairs, tmp_path):
    base, tuned = pairs["llama"]
    with pytest.raises(MergeEngineError, match="max_rank must be a whole number of at least 1"):
        extract_lora(tuned, base, str(tmp_path / "out"), ExtractOptions(max_rank=0))
    with pytest.raises(MergeEngineError, match="is not a regular expression"):
        extract_lora(tuned, base, str(tmp_path / "out"), ExtractOptions(exclude_regexes=["("]))
    broken = shutil.copytree(base, tmp_path / "broken")
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.2.mlp.up_proj.weight"][:100].clone()
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError) as refused:
        extract_lora(tuned, str(broken), str(tmp_path / "out"))
    assert f"{broken}: tensor 'model.layers.1.self_attn.q_proj.weight' is missing" in str(refused.value)
    assert "'model.layers.2.mlp.up_proj.weight' is [112, 64]" in str(refused.value)
    with pytest.raises(ConfigError, match="no module is left to factor"):
        extract_lora(tuned, base, str(tmp_path / "out"), ExtractOptions(include_regexes=["nothing"]))
    assert not os.path.exists(tmp_path / "out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(MergeEngineError, match="not empty"):
        extract_lora(tuned, base, str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"


def test_peft_loads_the_adapter_and_merging_it_gives_the_fine_tune(pairs, tmp_path):
    """peft, the adapter's consumer, loads it onto the base (modules_to_save included) and merge_and_unload gives
    the fine-tune's weights (float32 models, full rank). Biases keep the base's values: peft loads no lora_B.bias
    without lora_bias, which it cannot merge into the layers that have none (as with mergekit's adapters)."""
    peft = pytest.importorskip("peft", reason="peft (installed with lm_eval[hf], the test extra) checks the adapter")
    import transformers
    base, tuned = pairs["qwen2"]
    extract_lora(tuned, base, str(tmp_path / "adapter"), ExtractOptions(max_rank=64))
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter")).merge_and_unload()
    want = transformers.AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32).state_dict()
    got = merged.state_dict()
    assert got.keys() == want.keys()
    base_weights = model.state_dict()
    for name, w in want.items():
        if name.endswith(".bias"):
            assert torch.equal(got[name], base_weights[name]) and not torch.equal(w, base_weights[name]), name
            continue
        # full rank in fp32: SVD and product errors of a few fp32 ulps of the weights' differences (~0.02)
        assert torch.allclose(got[name], w, atol=1e-5, rtol=0), (name, (got[name] - w).abs().max())


def test_convolutions_are_saved_whole(tmp_path):
    """Mamba's depthwise Conv1d: whole in modules_to_save (mergekit factors its [out, 1, k] kernels as a batch of
    1 x k matrices, tensors peft cannot load); its Linear projections factored."""
    from tests.arch_models import make_architecture
    base, tuned = make_architecture(str(tmp_path / "mamba"), "mamba", 2)
    report = extract_lora(tuned, base, str(tmp_path / "adapter"), ExtractOptions(max_rank=4))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "conv1d" in config["modules_to_save"] and "backbone.layers.0.mixer.conv1d" in report.whole
    assert torch.equal(tensors["base_model.model.backbone.layers.0.mixer.conv1d.weight"],
                       load_file(os.path.join(tuned, "model.safetensors"))["backbone.layers.0.mixer.conv1d.weight"])
    assert "backbone.layers.0.mixer.in_proj" in report.ranks


def test_modules_within_sv_epsilon_are_left_out_and_peft_loads_the_rest(pairs, tmp_path):
    """A module whose singular values are all at or below --sv-epsilon has rank 0: mergekit writes [0, n] factors
    and rank_pattern 0, which peft refuses (`r` should be a positive integer). Here it is left out of the adapter
    (exclude_modules), and with no module left the run is refused, writing nothing."""
    peft = pytest.importorskip("peft", reason="peft (installed with lm_eval[hf], the test extra) checks the adapter")
    import transformers
    base, tuned = pairs["qwen2"]
    probe = extract_lora(tuned, base, str(tmp_path / "probe"), ExtractOptions(max_rank=1))
    sv = {m: float(torch.linalg.matrix_norm(  # the largest singular value of each module's difference
        (load_file(f"{tmp_path}/probe/adapter_model.safetensors")[f"base_model.model.{m}.lora_B.weight"]), 2)) ** 2
        for m in probe.ranks}
    epsilon = sorted(sv.values())[len(sv) // 2]  # half the modules have nothing above it
    report = extract_lora(tuned, base, str(tmp_path / "a"), ExtractOptions(max_rank=64, sv_epsilon=epsilon))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    dropped = sorted(m for m, s in sv.items() if s <= epsilon)
    assert dropped and not set(dropped) & set(report.ranks)
    # (those whose last name component is still a target are excluded, so that peft adds no LoRA to them)
    assert sorted(config["exclude_modules"]) == [m for m in dropped if m.split(".")[-1] in config["target_modules"]] != []
    assert not [n for n in tensors if any(n.startswith(f"base_model.model.{m}.") for m in dropped)]
    assert 0 not in config["rank_pattern"].values() and all(t.numel() for t in tensors.values())
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, str(tmp_path / "a")).merge_and_unload().state_dict()
    base_weights = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    for m in dropped:
        assert torch.equal(merged[f"{m}.weight"], base_weights[f"{m}.weight"]), m
    with pytest.raises(ConfigError, match="no module's difference has a singular value above --sv-epsilon 1000"):
        extract_lora(tuned, base, str(tmp_path / "none"), ExtractOptions(sv_epsilon=1000))
    assert not os.path.exists(tmp_path / "none")


def test_a_save_module_that_names_no_module_with_a_weight_is_refused(pairs, tmp_path):
    """--save-module mlp (a module holding others) or a misspelt name: mergekit lists it in modules_to_save with no
    tensor saved for it, an adapter peft fails to load (KeyError) or that saves nothing; refused here."""
    base, tuned = pairs["qwen2"]
    for name in ("mlp", "q_prjo"):
        with pytest.raises(ConfigError, match=f"--save-module '{name}': no module of {tuned} with a weight"):
            extract_lora(tuned, base, str(tmp_path / "out"), ExtractOptions(modules_to_save=[name]))
    assert not os.path.exists(tmp_path / "out")
    extract_lora(tuned, base, str(tmp_path / "full"), ExtractOptions(
        max_rank=4, modules_to_save=["model.layers.0.self_attn.q_proj", "o_proj"]))
    tensors = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.weight" in tensors
    assert "base_model.model.model.layers.1.self_attn.o_proj.weight" in tensors


def test_a_base_without_config_json_has_the_vocabulary_of_its_embeddings(pairs, tmp_path):
    """The base's vocabulary is its embedding tensor's rows: a base folder without config.json (only its tensors are
    read) was taken for one of another vocabulary (None), its embeddings saved whole despite --embed-lora and the
    card telling to resize the embeddings."""
    base, tuned = pairs["qwen2"]
    bare = shutil.copytree(base, tmp_path / "bare")
    os.remove(bare / "config.json")
    extract_lora(tuned, str(bare), str(tmp_path / "a"), ExtractOptions(max_rank=4, embed_lora=True))
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in tensors
    assert "vocabulary sizes differ" not in (tmp_path / "a" / "README.md").read_text()


def test_factoring_tied_embeddings_warns_that_peft_merges_their_update_twice(pairs, tmp_path, caplog):
    base, tuned = pairs["qwen2"]  # (tie_word_embeddings)
    extract_lora(tuned, base, str(tmp_path / "a"), ExtractOptions(max_rank=4, embed_lora=True))
    assert "adds the embeddings' update twice" in caplog.text
    caplog.clear()
    extract_lora(tuned, base, str(tmp_path / "b"), ExtractOptions(max_rank=4, embed_lora=True,
                                                                   exclude_regexes=["lm_head"]))
    assert "twice" not in caplog.text


def test_an_adapter_with_bias_changes_merges_as_peft_loads_it(pairs, tmp_path, caplog):
    """merge_engine reads an extracted adapter of a model with biases as BASE+ADAPTER as peft loads it: the
    lora_B.bias tensors passed over (peft has no lora_B bias without lora_bias), with a warning naming them."""
    from merge_engine.io.checkpoint import Checkpoint
    from merge_engine.io.lora import open_model
    base, tuned = pairs["qwen2"]
    extract_lora(tuned, base, str(tmp_path / "adapter"), ExtractOptions(max_rank=64))
    adapted, plain = open_model(f"{base}+{tmp_path / 'adapter'}"), Checkpoint(base)
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert torch.equal(adapted.read(bias), plain.read(bias))
    assert "lora_B biases without lora_bias" in caplog.text and "q_proj.lora_B.bias" in caplog.text
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(adapted.read(weight), Checkpoint(tuned).read(weight), atol=1e-5, rtol=0)


def test_a_config_transformers_refuses_is_one_line(pairs, tmp_path):
    """(A head count not dividing the width fails huggingface_hub's config validation with an error that is no
    ValueError: it ended in a traceback.)"""
    from merge_engine.errors import CheckpointError
    base, tuned = pairs["llama"]
    bad = shutil.copytree(tuned, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
    with pytest.raises(CheckpointError, match="cannot build its model from config.json.*multiple"):
        extract_lora(str(bad), base, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
