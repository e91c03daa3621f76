"""Tiny sharded checkpoints for the tier tests, and an independent, by-hand implementation of keying."""
from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from merge_engine.demo import make_models
from merge_engine.tiers.inplace import PAUSE_ENV

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# arch -> dtype: Llama (MHA, bf16), Qwen2 (GQA: 4 heads, 2 kv heads; q/k/v biases), GPT-2 (Conv1D, fused qkv),
# GPT-Neo (the reference code's layout); made by tier_config: Llama with GQA, Qwen3 (GQA, q/k norms, head_dim 32 set
# explicitly: heads * head_dim = 128 is not hidden_size 64), Qwen3-MoE (its attention), Mistral (GQA, a sliding window)
ARCHS = {"llama": torch.bfloat16, "qwen2": torch.float32, "gpt2": torch.float32, "gpt_neo": torch.float32}
MORE_ARCHS = {"llama_gqa": torch.bfloat16, "qwen3": torch.bfloat16, "qwen3_moe": torch.float32,
              "mistral": torch.float32}


def tier_config(arch: str):
    """Configs of the architectures demo.tiny_config does not make."""
    import transformers as tf
    small = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=128)
    if arch == "gpt_neo":
        return tf.GPTNeoConfig(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, max_position_embeddings=128,
                               attention_types=[[["global", "local"], 2]], window_size=8)
    if arch == "llama_gqa":
        return tf.LlamaConfig(intermediate_size=112, tie_word_embeddings=False, **small)
    if arch == "mistral":
        return tf.MistralConfig(intermediate_size=112, sliding_window=8, **small)
    if arch == "qwen3":
        return tf.Qwen3Config(intermediate_size=96, head_dim=32, tie_word_embeddings=True, **small)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                 head_dim=32, **small)
    from merge_engine.demo import tiny_config
    return tiny_config(arch)


def make_model(path: str, arch: str) -> str:
    import transformers as tf
    torch.manual_seed(0)
    dtype = {**ARCHS, **MORE_ARCHS}[arch]
    tf.AutoModelForCausalLM.from_config(tier_config(arch)).to(dtype).save_pretrained(path, max_shard_size="60KB")
    return path


@pytest.fixture(scope="session")
def tier_model(tmp_path_factory):
    """tier_model(arch) -> folder of a 4-layer model sharded at 60KB (built once per session)."""
    root = tmp_path_factory.mktemp("tier_models")
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            cache[arch] = make_models(str(root / arch), arch, 0, ARCHS[arch], "60KB")[0] \
                if arch in ARCHS and arch != "gpt_neo" else make_model(str(root / arch), arch)
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


# Each key list of the published format and the block parts its swaps move (blocks.py's table, restated here from
# the reference's definitions: permute.py's _apply_*_swap for GPT-Neo; the natural meaning on the other layouts).
KIND_PARTS = {"attn_heads": ("qkv", "out"), "attn_out_heads": ("out",), "mlp_cols": ("up", "down"),
              "mlp_up_cols": ("up",), "mlp_down_cols": ("down",)}


def head_dim(cfg: dict) -> int:
    if cfg["model_type"] == "gpt_neo":
        return cfg["hidden_size"] // cfg["num_heads"]
    if cfg["model_type"] == "gpt2":
        return cfg["n_embd"] // cfg["n_head"]
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def part_views(sd: dict, cfg: dict, part: str, layer: int, index: int) -> list[torch.Tensor]:
    """Views of every slice of one part of one block, written out per architecture from the Hugging Face layouts."""
    hd = head_dim(cfg)
    if cfg["model_type"] == "gpt_neo":
        p = f"transformer.h.{layer}."
        rows = slice(index * hd, (index + 1) * hd)
        return {"up": lambda: [sd[p + "mlp.c_fc.weight"][index], sd[p + "mlp.c_fc.bias"][index]],
                "down": lambda: [sd[p + "mlp.c_proj.weight"][:, index]],
                "qkv": lambda: [sd[p + f"attn.attention.{x}_proj.weight"][rows] for x in "qkv"],
                "out": lambda: [sd[p + "attn.attention.out_proj.weight"][:, rows]]}[part]()
    if cfg["model_type"] == "gpt2":
        p, h = f"transformer.h.{layer}.", cfg["n_embd"]
        cols = [slice(q * h + index * hd, q * h + (index + 1) * hd) for q in range(3)]
        return {"up": lambda: [sd[p + "mlp.c_fc.weight"][:, index], sd[p + "mlp.c_fc.bias"][index]],
                "down": lambda: [sd[p + "mlp.c_proj.weight"][index]],
                "qkv": lambda: [sd[p + "attn.c_attn.weight"][:, c] for c in cols] +
                [sd[p + "attn.c_attn.bias"][c] for c in cols],
                "out": lambda: [sd[p + "attn.c_proj.weight"][index * hd:(index + 1) * hd]]}[part]()
    p = f"model.layers.{layer}."
    if part == "up":
        return [sd[p + "mlp.gate_proj.weight"][index], sd[p + "mlp.up_proj.weight"][index]]
    if part == "down":
        return [sd[p + "mlp.down_proj.weight"][:, index]]
    group = cfg["num_attention_heads"] // cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    q, kv = slice(index * group * hd, (index + 1) * group * hd), slice(index * hd, (index + 1) * hd)
    if part == "out":
        return [sd[p + "self_attn.o_proj.weight"][:, q]]
    views = [sd[p + "self_attn.q_proj.weight"][q], sd[p + "self_attn.k_proj.weight"][kv],
             sd[p + "self_attn.v_proj.weight"][kv]]
    if cfg["model_type"] == "qwen2":
        views += [sd[p + "self_attn.q_proj.bias"][q], sd[p + "self_attn.k_proj.bias"][kv],
                  sd[p + "self_attn.v_proj.bias"][kv]]
    return views


def block_views(sd: dict, cfg: dict, kind: str, layer: int, index: int) -> list[torch.Tensor]:
    """Views of every slice a swap of this key list moves in one block."""
    return [v for part in KIND_PARTS[kind] for v in part_views(sd, cfg, part, layer, index)]


def swap_by_hand(sd: dict, cfg: dict, key) -> dict:
    """A new state dict with every swap of the key done by plain tensor indexing (the swaps are disjoint part by
    part, so every one reads the original values)."""
    original = {n: t.clone() for n, t in sd.items()}
    out = {n: t.clone() for n, t in sd.items()}
    for kind in KIND_PARTS:
        for a, b in key.swaps(kind):
            for dst, src in ((a, b), (b, a)):
                for d, s in zip(block_views(out, cfg, kind, *dst), block_views(original, cfg, kind, *src)):
                    d.copy_(s)
    return out


def kill_when_paused(argv: list[str]) -> None:
    """Run `merge-engine ARGV` (an in-place command) in a subprocess, paused by the test hook after 3 tensors
    are rewritten, and SIGKILL it there."""
    env = dict(os.environ, **{PAUSE_ENV: "3"}, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "merge_engine", *argv], stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        lines = []
        while not lines or lines[-1].strip() != "paused":
            lines.append(proc.stderr.readline())
            assert lines[-1], f"the command ended before pausing: {''.join(lines)}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stderr.close()
