"""Tiny model folders holding the tiny tokenizer, and a small text data file."""
from __future__ import annotations

import pytest
import torch

from merge_engine.demo import make_models
from tests.stats.tiny_text import SENTENCES, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """tiny_lm(arch) -> a 2-layer model folder (fp32) holding the tiny tokenizer. (transformers loads a
    Qwen2 folder's tokenizer as a Qwen2Tokenizer, which ignores this vocabulary: pass tiny_tokenizer() there.)"""
    root = tmp_path_factory.mktemp("stats_models")
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            path = make_models(str(root), arch, n_experts=0, layers=2, seed=7)[0]
            tiny_tokenizer().save_pretrained(path)
            cache[arch] = path
        return cache[arch]
    return get


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("\n".join(SENTENCES[:3]) + "\n\n" + "\n".join(SENTENCES[3:]) + "\n")
    return str(path)


@pytest.fixture
def gpt2_without_prefix(tiny_lm, tmp_path):
    """The tiny GPT-2 folder saved as the published GPT-2 is: weights named without the model's
    base_model_prefix (`h.0.attn...`, not `transformer.h.0.attn...`); transformers loads either."""
    import shutil

    from safetensors.torch import load_file, save_file
    folder = tmp_path / "gpt2-unprefixed"
    shutil.copytree(tiny_lm("gpt2"), folder)
    weights = load_file(folder / "model.safetensors")
    save_file({name.removeprefix("transformer."): t for name, t in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return str(folder)


@pytest.fixture(scope="session")
def renamed_on_load(tmp_path_factory):
    """renamed_on_load(model_type) -> a tiny random model folder (save_pretrained, holding the tiny tokenizer)
    whose tensors transformers 5 renames as it loads them: GPT-NeoX's embed_out is lm_head, Qwen2-VL's
    model.layers are model.language_model.layers, Mixtral's block_sparse_moe experts are fused into mlp.experts."""
    import transformers as tf
    root = tmp_path_factory.mktemp("renamed_on_load")
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64)
    models = {
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**text)),
        "qwen2_vl": lambda: tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(
            text_config=dict(**text, num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]}),
            vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2))),
        "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**text, num_key_value_heads=2, num_local_experts=2,
                                                                  num_experts_per_tok=1)),
    }
    cache: dict[str, str] = {}

    def get(model_type: str) -> str:
        if model_type not in cache:
            torch.manual_seed(0)
            cache[model_type] = str(root / model_type)
            models[model_type]().save_pretrained(cache[model_type])
            tiny_tokenizer().save_pretrained(cache[model_type])
        return cache[model_type]
    return get
