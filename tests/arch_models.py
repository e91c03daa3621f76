"""Tiny models of architectures (mergekit 0.1.5 has definitions of all but GPT-Neo), random init (transformers, fixed seeds): a
base and experts that are the base plus noise, as fine-tunes are."""
from __future__ import annotations

import os

import torch

DECODER = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
# name -> (transformers config class, model class, config arguments)
ARCHITECTURES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", DECODER),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**DECODER, "head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**DECODER, "pad_token_id": 0}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**DECODER, "head_dim": 8}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {**DECODER, "use_qk_norm": True}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {**DECODER, "new_decoder_architecture": True, "num_kv_heads": 2,
                                                     "tie_word_embeddings": False}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", DECODER),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", DECODER),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", DECODER),
    "phi": ("PhiConfig", "PhiForCausalLM", DECODER),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(vocab_size=128, hidden_size=32, num_hidden_layers=3,
                                                      state_size=4, expand=2, conv_kernel=4)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(vocab_size=128, n_embd=32, n_layer=3, n_head=4,
                                                                      n_positions=64)),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", {**DECODER, "pad_token_id": 1}),
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM", dict(vocab_size=128, dim=32, hidden_dim=64, n_layers=3,
                                                                     n_heads=4, max_position_embeddings=64)),
    "llama_classifier": ("LlamaConfig", "LlamaForSequenceClassification", {**DECODER, "num_labels": 3,
                                                                           "pad_token_id": 0}),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", {
        **DECODER, "layer_types": ["mamba", "attention", "mamba"], "num_local_experts": 4, "num_experts_per_tok": 2,
        "shared_intermediate_size": 32, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8}),
    # no mergekit definition: its layer count is num_layers, its layers' attention kinds runs of attention_types
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(vocab_size=128, hidden_size=32, num_layers=3, num_heads=4,
                                                          attention_types=[[["global", "local"], 1], [["global"], 1]],
                                                          max_position_embeddings=64, window_size=8)),
    # experts as transformers 5 holds them (fused), saved as checkpoints have them (one tensor per expert)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**DECODER, "head_dim": 8, "num_experts": 4,
                                                           "num_experts_per_tok": 2, "moe_intermediate_size": 16}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {**DECODER, "num_experts": 4, "num_experts_per_tok": 2}),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", {**DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**DECODER, "num_experts": 4, "num_experts_per_tok": 2,
                                                           "moe_intermediate_size": 16,
                                                           "shared_expert_intermediate_size": 32}),
}


def make_architecture(root: str, name: str, n: int = 3) -> list[str]:
    """n folders of architecture `name` under root: the base, then base + noise (seeded by position)."""
    import transformers as tf
    config_class, model_class, arguments = ARCHITECTURES[name]
    config = getattr(tf, config_class)(**arguments)
    paths = []
    for i in range(n):
        torch.manual_seed(0)
        model = getattr(tf, model_class)(config)
        with torch.no_grad():  # non-zero biases and norms off their init, so every tensor shows its merge
            gen = torch.Generator().manual_seed(10 + i)
            for p in model.parameters():
                p.add_((0.02 if i else 0.01) * torch.randn(p.shape, generator=gen))
        paths.append(os.path.join(root, f"{name}-{i}"))
        model.save_pretrained(paths[-1])
    return paths
