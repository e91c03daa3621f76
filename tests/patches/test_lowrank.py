"""Low-rank patches: the ranks chosen, exact recovery of a low-rank fine-tune, the same weights through apply,
through BASE+ADAPTER merge input, and through peft itself."""
import json
import os
import subprocess

import pytest
import torch

from merge_engine.demo import make_synthetic_llama
from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.lora import open_model
from merge_engine.io.safetensors_format import save_tensors
from merge_engine.patches import apply_patches, extract_patch, remove_patches
from merge_engine.patches.lowrank import rank_for
from merge_engine.patches.select import layer_of
from tests.conftest import ulp
from tests.patches.conftest import SHAPE, read_all, same_bits


def test_rank_for_energy_and_cap():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1: cumulative 16/22, 20/22, 21/22, 1
    assert rank_for(s, 3, None) == 3 and rank_for(s, 9, None) == 4
    assert rank_for(s, None, 0.7) == 1 and rank_for(s, None, 0.9) == 2 and rank_for(s, None, 1.0) == 4
    assert rank_for(s, 2, 1.0) == 2  # the cap wins


@pytest.fixture(scope="module")
def low_rank_tune(tmp_path_factory):
    """A float32 base and a fine-tune that adds a rank-2 update to every linear weight of the layers."""
    root = tmp_path_factory.mktemp("low_rank")
    base = make_synthetic_llama(str(root / "base"), dtype=torch.float32, seed=0, **SHAPE)
    tensors = read_all(base)
    g = torch.Generator().manual_seed(5)
    for name, t in tensors.items():
        if layer_of(name) is not None and t.dim() == 2:
            t += 1e-2 * torch.randn(t.shape[0], 2, generator=g) @ torch.randn(2, t.shape[1], generator=g)
    tuned = str(root / "tuned")
    os.makedirs(tuned)
    save_tensors(tensors, os.path.join(tuned, "model.safetensors"))
    with open(os.path.join(base, "config.json")) as f, open(os.path.join(tuned, "config.json"), "w") as g_:
        g_.write(f.read())
    return base, tuned


def test_a_low_rank_fine_tune_is_recovered_at_its_rank(low_rank_tune, tmp_path):
    base, tuned = low_rank_tune
    report = extract_patch(base, tuned, str(tmp_path / "lora"), "lora", energy=0.999999)
    assert {r.rank for r in report.rows} == {2} and max(r.relative_error for r in report.rows) < 1e-5
    assert report.unchanged == ["lm_head.weight"]  # the fine-tune left the head alone
    assert {n for n, _ in report.left_out} == {n for n in read_all(base) if "norm" in n or "embed" in n}
    apply_patches(base, [str(tmp_path / "lora")], str(tmp_path / "applied"))
    want, got = read_all(tuned), read_all(str(tmp_path / "applied"))
    for name in want:  # the SVD's fp32 error: a few fp32 ulps of the update (1e-2 * N(0, 1) * N(0, 1) * rank 2)
        assert (got[name].double() - want[name].double()).abs().max() <= 1e-6 + 2 * ulp(want[name], torch.float32).max()
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 2


def test_lora_patch_apply_equals_the_adapter_as_merge_input_and_removes(models, tmp_path):
    m = models(torch.bfloat16)
    report = extract_patch(m["base"], m["tuned"], str(tmp_path / "lora"), "lora", rank=4)
    assert {r.rank for r in report.rows} == {4}
    apply_patches(m["base"], [str(tmp_path / "lora")], str(tmp_path / "applied"))
    adapter = open_model(f"{m['base']}+{tmp_path / 'lora'}")
    assert same_bits(read_all(str(tmp_path / "applied")), {n: adapter.read(n) for n in adapter.tensors})
    remove_patches(str(tmp_path / "applied"), [str(tmp_path / "lora")], str(tmp_path / "removed"))
    base, removed, applied = read_all(m["base"]), read_all(str(tmp_path / "removed")), read_all(str(tmp_path / "applied"))
    for name in base:  # two roundings of at most half an ulp each (bf16 addition is not invertible)
        b, r = base[name].double(), removed[name].double()
        assert ((b - r).abs() <= ulp(torch.maximum(b.abs(), applied[name].double().abs()), torch.bfloat16)).all()


def test_a_patch_config_beside_an_adapter_must_say_lora(models, tmp_path):
    m = models(torch.bfloat16)
    extract_patch(m["base"], m["tuned"], str(tmp_path / "lora"), "lora", rank=2)
    config = tmp_path / "lora" / "patch_config.json"
    config.write_text(config.read_text().replace('"storage": "lora"', '"storage": "bfloat16"'))
    with pytest.raises(CheckpointError, match="says storage 'bfloat16' beside a PEFT adapter"):
        apply_patches(m["base"], [str(tmp_path / "lora")], str(tmp_path / "out"))


@pytest.mark.mergekit
def test_peft_loads_a_lora_patch_to_the_same_weights(models, tmp_path, mergekit_yaml):
    """peft (installed with mergekit) merges the patch into the base with merge_and_unload: the same bits as apply."""
    m = models(torch.bfloat16)
    extract_patch(m["base"], m["tuned"], str(tmp_path / "lora"), "lora", energy=0.9, rank=8)
    apply_patches(m["base"], [str(tmp_path / "lora")], str(tmp_path / "applied"))
    script = f"""
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({m['base']!r}, torch_dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, {str(tmp_path / 'lora')!r}).merge_and_unload()
save_file({{k: v.contiguous() for k, v in merged.state_dict().items()}}, {str(tmp_path / 'peft.safetensors')!r})
"""
    python = os.path.join(os.path.dirname(mergekit_yaml), "python")
    run = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    from safetensors.torch import load_file
    peft_state = load_file(str(tmp_path / "peft.safetensors"))
    ours = read_all(str(tmp_path / "applied"))
    assert same_bits(ours, {n: peft_state[n] for n in ours})
    assert not same_bits(ours, read_all(m["base"]))


def test_any_peft_adapter_applies_as_a_patch_without_the_base_check(models, tmp_path):
    from tests.lora_adapters import write_adapter
    m = models(torch.bfloat16)
    write_adapter(str(tmp_path / "adapter"), m["base"], r=3, seed=1)
    apply_patches(m["other"], [str(tmp_path / "adapter")], str(tmp_path / "out"))  # nothing to check it against
    assert Checkpoint(str(tmp_path / "out")).tensors.keys() == Checkpoint(m["other"]).tensors.keys()


def test_fused_experts_are_left_out_of_a_low_rank_patch_as_fused_experts(tmp_path):
    """A LoRA adapter holds 2-D linear weights: fused MoE experts ([experts, out, in]) are left out, and the report
    says why (not "not a linear weight")."""
    from tests.io.test_experts import fused, mixtral_tensors, write_model
    base_tensors = fused(mixtral_tensors(0))
    tuned_tensors = {n: t + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
                     for n, t in base_tensors.items()}
    base = write_model(tmp_path / "base", base_tensors)
    tuned = write_model(tmp_path / "tuned", tuned_tensors)
    report = extract_patch(base, tuned, str(tmp_path / "p"), storage="lora", rank=2)
    why = dict(report.left_out)
    experts = [n for n in base_tensors if ".experts." in n]
    assert experts and all(why[n].startswith("fused experts (3-D)") for n in experts)
    assert why["model.embed_tokens.weight"].startswith("not a linear weight")
