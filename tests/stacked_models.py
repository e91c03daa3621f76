"""Tiny models with several layer stacks, random init: Qwen2-VL (a vision tower's blocks beside the
language model's layers) and T5 (encoder and decoder blocks of different depths)."""
from __future__ import annotations

import os

import torch


def make_qwen2_vl(root: str, n: int = 3, text_layers: int = 3, vision_layers: int = 2) -> list[str]:
    import transformers as tf
    cfg = tf.Qwen2VLConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=text_layers,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=None, eos_token_id=None,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=vision_layers, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=120, video_token_id=121, vision_start_token_id=122,
        vocab_size=128, hidden_size=32, num_hidden_layers=text_layers)  # also at the top, where mergekit reads them
    paths = []
    for i in range(n):
        torch.manual_seed(100 + i)
        model = tf.Qwen2VLForConditionalGeneration(cfg)
        with torch.no_grad():  # non-zero biases, so every tensor shows its merge
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        paths.append(os.path.join(root, f"qwen2vl-{i}"))
        model.save_pretrained(paths[-1])
    return paths


def make_t5(root: str, n: int = 3) -> list[str]:
    import transformers as tf
    cfg = tf.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=3, num_decoder_layers=2, num_heads=2,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # T5 v1.1, as mergekit's t5
    paths = []
    for i in range(n):
        torch.manual_seed(200 + i)
        paths.append(os.path.join(root, f"t5-{i}"))
        tf.T5ForConditionalGeneration(cfg).save_pretrained(paths[-1])
    return paths
