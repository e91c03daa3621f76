"""Tiny models with several layer stacks, random init: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (with its projector's stack of
mergers) and Mistral 3 (a vision tower's blocks beside the language model's layers) and T5 (encoder and decoder
blocks of different depths)."""
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
    return _save_variants(root, "qwen2vl", tf.Qwen2VLForConditionalGeneration, cfg, n)


def make_qwen2_5_vl(root: str, n: int = 3) -> list[str]:
    import transformers as tf
    cfg = tf.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=None, eos_token_id=None,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                           window_size=8),
        image_token_id=120, video_token_id=121, vision_start_token_id=122)
    return _save_variants(root, "qwen2_5_vl", tf.Qwen2_5_VLForConditionalGeneration, cfg, n)


def make_qwen3_vl(root: str, n: int = 3) -> list[str]:
    import transformers as tf
    cfg = tf.Qwen3VLConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 1, 2]),  # three mergers, as mergekit's definition has
        image_token_id=120, video_token_id=121, vision_start_token_id=122)
    return _save_variants(root, "qwen3_vl", tf.Qwen3VLForConditionalGeneration, cfg, n)


def make_mistral3(root: str, n: int = 3) -> list[str]:
    import transformers as tf
    cfg = tf.Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=128, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, head_dim=8, image_size=28, patch_size=14),
        image_token_index=120, spatial_merge_size=1)
    return _save_variants(root, "mistral3", tf.Mistral3ForConditionalGeneration, cfg, n)


def _save_variants(root: str, name: str, model_class, cfg, n: int) -> list[str]:
    paths = []
    for i in range(n):
        torch.manual_seed(100 + i)
        model = model_class(cfg)
        with torch.no_grad():  # non-zero biases, so every tensor shows its merge
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        paths.append(os.path.join(root, f"{name}-{i}"))
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


def make_gemma3(root: str, n: int = 3) -> list[str]:
    import transformers as tf
    cfg = tf.Gemma3Config(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4)
    return _save_variants(root, "gemma3", tf.Gemma3ForConditionalGeneration, cfg, n)


def make_llama4(root: str, n: int = 3) -> list[str]:
    import transformers as tf
    cfg = tf.Llama4Config(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=48, intermediate_size_mlp=48,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         num_local_experts=2),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                           projector_output_dim=32))
    return _save_variants(root, "llama4", tf.Llama4ForConditionalGeneration, cfg, n)


def make_whisper(root: str, n: int = 3) -> list[str]:
    import transformers as tf
    cfg = tf.WhisperConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, num_mel_bins=8,
                           max_source_positions=16, max_target_positions=16, pad_token_id=1, bos_token_id=2,
                           eos_token_id=3, decoder_start_token_id=2)
    return _save_variants(root, "whisper", tf.WhisperForConditionalGeneration, cfg, n)
