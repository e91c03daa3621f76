"""Tiny sharded checkpoints for the tier tests, and an independent, by-hand implementation of keying."""
from __future__ import annotations

import filecmp
import json
import os

import pytest
import torch

from merge_engine.demo import make_models

# arch -> dtype: Llama (MHA, bf16), Qwen2 (GQA: 4 heads, 2 kv heads; q/k/v biases), GPT-2 (Conv1D, fused qkv),
# GPT-Neo (the reference code's layout)
ARCHS = {"llama": torch.bfloat16, "qwen2": torch.float32, "gpt2": torch.float32, "gpt_neo": torch.float32}


def make_gpt_neo(path: str) -> str:
    import transformers as tf
    cfg = tf.GPTNeoConfig(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, max_position_embeddings=128,
                          attention_types=[[["global", "local"], 2]], window_size=8)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path, max_shard_size="60KB")
    return path


@pytest.fixture(scope="session")
def tier_model(tmp_path_factory):
    """tier_model(arch) -> folder of a 4-layer model sharded at 60KB (built once per session)."""
    root = tmp_path_factory.mktemp("tier_models")
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            cache[arch] = make_gpt_neo(str(root / arch)) if arch == "gpt_neo" else \
                make_models(str(root / arch), arch, 0, ARCHS[arch], "60KB")[0]
        return cache[arch]
    return get


def read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def same_files(a: str, b: str) -> None:
    """The same file names with the same bytes."""
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def block_views(sd: dict, cfg: dict, kind: str, layer: int, index: int) -> list[torch.Tensor]:
    """Views of every slice of one block, written out per architecture from the Hugging Face layouts."""
    if cfg["model_type"] == "gpt_neo":
        p, hd = f"transformer.h.{layer}.", cfg["hidden_size"] // cfg["num_heads"]
        if kind == "mlp_cols":
            return [sd[p + "mlp.c_fc.weight"][index], sd[p + "mlp.c_fc.bias"][index],
                    sd[p + "mlp.c_proj.weight"][:, index]]
        rows = slice(index * hd, (index + 1) * hd)
        return [sd[p + f"attn.attention.{x}_proj.weight"][rows] for x in "qkv"] + [
            sd[p + "attn.attention.out_proj.weight"][:, rows]]
    if cfg["model_type"] == "gpt2":
        p, h = f"transformer.h.{layer}.", cfg["n_embd"]
        hd = h // cfg["n_head"]
        if kind == "mlp_cols":
            return [sd[p + "mlp.c_fc.weight"][:, index], sd[p + "mlp.c_fc.bias"][index],
                    sd[p + "mlp.c_proj.weight"][index]]
        cols = [slice(part * h + index * hd, part * h + (index + 1) * hd) for part in range(3)]
        return ([sd[p + "attn.c_attn.weight"][:, c] for c in cols] + [sd[p + "attn.c_attn.bias"][c] for c in cols]
                + [sd[p + "attn.c_proj.weight"][index * hd:(index + 1) * hd]])
    p = f"model.layers.{layer}."
    if kind == "mlp_cols":
        return [sd[p + "mlp.gate_proj.weight"][index], sd[p + "mlp.up_proj.weight"][index],
                sd[p + "mlp.down_proj.weight"][:, index]]
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    group = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    q, kv = slice(index * group * hd, (index + 1) * group * hd), slice(index * hd, (index + 1) * hd)
    views = [sd[p + "self_attn.q_proj.weight"][q], sd[p + "self_attn.k_proj.weight"][kv],
             sd[p + "self_attn.v_proj.weight"][kv], sd[p + "self_attn.o_proj.weight"][:, q]]
    if cfg["model_type"] == "qwen2":
        views += [sd[p + "self_attn.q_proj.bias"][q], sd[p + "self_attn.k_proj.bias"][kv],
                  sd[p + "self_attn.v_proj.bias"][kv]]
    return views


def swap_by_hand(sd: dict, cfg: dict, key) -> dict:
    """A new state dict with every swap of the key done by plain tensor indexing."""
    original = {n: t.clone() for n, t in sd.items()}
    out = {n: t.clone() for n, t in sd.items()}
    for kind in ("attn_heads", "mlp_cols"):
        for a, b in key.swaps(kind):
            for dst, src in ((a, b), (b, a)):
                for d, s in zip(block_views(out, cfg, kind, *dst), block_views(original, cfg, kind, *src)):
                    d.copy_(s)
    return out
