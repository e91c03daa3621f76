"""Key sizes: swap counts equal the published generators' for the same fraction, of the swappable parameters or of
the whole model; the model's parameter count from its headers or its config.

The reference formulas below are restated from the published code (McGill-NLP/tiered-language-models at 72216f6:
scripts/keys/generate_key.py for GPT-Neo, src/tiered/permutation/qwen.py for Llama/Qwen), not imported from ours.
"""
import pytest

from merge_engine.tiers import generate_key, key_report, model_blocks
from merge_engine.tiers.generate import parameter_count, swap_counts
from tests.conftest import pickled_copy
from tests.tiers.conftest import read_config

# (layers, heads, hidden, mlp) of the published 180M model, with its vocabulary and context (generate_key.sh,
# configs/keys/180m/both/key_5pct.json: 5 head swaps and 2219 MLP swaps at --target_total_pct 0.05)
NEO_180M = dict(num_layers=12, num_heads=12, hidden_size=768, intermediate_size=6144, vocab_size=50257,
                max_position_embeddings=2048)


def neo_config(num_layers, num_heads, hidden_size, intermediate_size, vocab_size=256, max_position_embeddings=128):
    return {"model_type": "gpt_neo", "num_layers": num_layers, "num_heads": num_heads, "hidden_size": hidden_size,
            "intermediate_size": intermediate_size, "vocab_size": vocab_size,
            "max_position_embeddings": max_position_embeddings, "attention_types": [[["global"], num_layers]],
            "tie_word_embeddings": True}


def published_neo_counts(layers, heads, hidden, mlp, pct, attn_ratio, mlp_mode="both", attn_mode="full"):
    head_dim = hidden // heads
    per_head = hidden * head_dim if attn_mode == "out" else 4 * hidden * head_dim
    per_col = {"up": hidden + 1, "down": hidden, "both": 2 * hidden + 1}[mlp_mode]
    attn = hidden * hidden if attn_mode == "out" else 4 * hidden * hidden
    mlp_sw = {"up": hidden * mlp + mlp, "down": mlp * hidden, "both": 2 * hidden * mlp + mlp}[mlp_mode]
    swappable = layers * (attn + mlp_sw)
    target = int(swappable * pct)
    target_attn = int(target * attn_ratio)
    return target_attn // (2 * per_head), (target - target_attn) // (2 * per_col), swappable


def published_neo_total(layers, heads, hidden, mlp, vocab=50257, positions=1024):
    """count_total_params of its GPTNeoForCausalLMTiered: tied embeddings, plus an lm_head bias."""
    layer = 4 * hidden * hidden + hidden + (hidden * mlp + mlp) + (mlp * hidden + hidden) + 4 * hidden
    return vocab * hidden + positions * hidden + layers * layer + 2 * hidden + vocab


def published_qwen_counts(layers, hidden, heads, kv_heads, inter, pct, attn_ratio, head_dim=None):
    """head_dim: a config's own, where it is not hidden / heads (the reference always takes hidden / heads)."""
    hd = head_dim or hidden // heads
    group = heads // kv_heads
    kv_dim = kv_heads * hd
    swappable = layers * (2 * heads * hd * hidden + 2 * kv_dim * hidden + 3 * inter * hidden)
    per_attn_swap = 2 * (2 * hidden * group * hd + 2 * hidden * hd)
    per_mlp_swap = 2 * 3 * hidden
    target = int(swappable * pct)
    target_attn = int(target * attn_ratio)
    attn_swaps = target_attn // per_attn_swap
    target_mlp = target if attn_swaps == 0 and target_attn > 0 else target - target_attn
    return attn_swaps, target_mlp // per_mlp_swap


def test_the_published_180m_key_sizes_both_ways():
    cfg = neo_config(**NEO_180M)
    blocks = model_blocks(cfg)
    shape = (12, 12, 768, 6144)
    total = published_neo_total(*shape, positions=2048)
    of_model = generate_key(cfg, "180m", 0.05, fraction_of="model", total_params=total)
    assert (len(of_model.attn_heads), len(of_model.mlp_cols)) == (5, 2219)  # the bundled key_5pct.json
    of_swappable = swap_counts(blocks, ("attn_heads", "mlp_cols"), 0.05, 0.25)
    assert tuple(of_swappable.values()) == (4, 1727)  # its launcher's --target_pct 0.05
    assert blocks.swappable_params == published_neo_counts(*shape, 0.05, 0.25)[2]


@pytest.mark.parametrize("shape", [(12, 12, 768, 6144), (16, 16, 1344, 6456), (4, 4, 64, 256)])
@pytest.mark.parametrize("attn_mode,mlp_mode", [("full", "both"), ("out", "up"), ("full", "down"), ("out", "both")])
@pytest.mark.parametrize("pct,share", [(0.05, 0.25), (0.2, 0.6)])
def test_gpt_neo_counts_match_the_published_generator(shape, attn_mode, mlp_mode, pct, share):
    blocks = model_blocks(neo_config(*shape))
    kinds = ({"full": "attn_heads", "out": "attn_out_heads"}[attn_mode],
             {"both": "mlp_cols", "up": "mlp_up_cols", "down": "mlp_down_cols"}[mlp_mode])
    assert tuple(swap_counts(blocks, kinds, pct, share).values()) == \
        published_neo_counts(*shape, pct, share, mlp_mode, attn_mode)[:2]


@pytest.mark.parametrize("shape", [(4, 64, 4, 2, 96), (24, 896, 14, 2, 4864), (28, 3584, 28, 4, 18944)])
@pytest.mark.parametrize("pct,share", [(0.05, 0.25), (0.3, 0.6), (0.01, 0.02)])
def test_qwen2_counts_match_the_published_generator(shape, pct, share):
    """Its count leaves the q/k/v biases out; with them, the tiny model got 71 MLP swaps where it makes 70."""
    layers, hidden, heads, kv, inter = shape
    cfg = {"model_type": "qwen2", "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
           "num_key_value_heads": kv, "intermediate_size": inter}
    got = swap_counts(model_blocks(cfg), ("attn_heads", "mlp_cols"), pct, share)
    assert tuple(got.values()) == published_qwen_counts(*shape, pct, share)


def test_qwen3_with_its_own_head_dim_counts_its_real_heads():
    """Qwen3-0.6B: config.head_dim 128, hidden / heads 64. The reference counts q and o as hidden x hidden and a head
    as 64 rows; keys made here move whole 128-row heads and count them as they are, so the same fraction gives other
    swap counts than the reference's (the figures docs/keyed-tiers.md quotes)."""
    layers, hidden, heads, kv, inter = 28, 1024, 16, 8, 3072
    cfg = {"model_type": "qwen3", "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
           "num_key_value_heads": kv, "intermediate_size": inter, "head_dim": 128}
    got = tuple(swap_counts(model_blocks(cfg), ("attn_heads", "mlp_cols"), 0.05, 0.25).values())
    assert got == published_qwen_counts(layers, hidden, heads, kv, inter, 0.05, 0.25, head_dim=128) == (3, 2688)
    assert published_qwen_counts(layers, hidden, heads, kv, inter, 0.05, 0.25) == (5, 2150)


def test_parameter_count_from_headers_and_from_config(tier_model, tmp_path):
    pytest.importorskip("transformers")
    folder = tier_model("qwen2")
    import json
    import os
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings once
    assert parameter_count(folder, cfg) == parameter_count(os.path.join(folder, "config.json"), cfg) == params
    assert cfg["tie_word_embeddings"]  # a pickled state dict stores the head as a second name of the embedding
    pickled = pickled_copy(folder, tmp_path / "pickled", tie=("lm_head.weight", "model.embed_tokens.weight"))
    assert parameter_count(pickled, cfg) == params
    # the published 180M formula counts an lm_head bias its custom class adds; transformers' GPT-Neo has none
    neo = neo_config(**NEO_180M)
    assert parameter_count("config.json", neo) == published_neo_total(12, 12, 768, 6144, positions=2048) - 50257


@pytest.mark.parametrize("attn_mode,mlp_mode", [("full", "both"), ("out", "up"), ("full", "down"), ("out", "both")])
def test_key_report_gives_a_generated_keys_fraction_as_the_published_generator_prints_it(tier_model, attn_mode,
                                                                                          mlp_mode):
    """Its "% of swappable subset" divides by the swappable parameters of the modes the key was made with; so does
    `key generate --fraction`. The report divided partial keys by the whole blocks' count (9% for a 25% key)."""
    folder = tier_model("gpt_neo")
    cfg = read_config(folder)
    layers, heads, hidden = cfg["num_layers"], cfg["num_heads"], cfg["hidden_size"]
    inter = cfg["intermediate_size"] or 4 * hidden
    key = generate_key(cfg, "report", 0.2, 0.4, attn_mode=attn_mode, mlp_mode=mlp_mode)
    attn_kind, mlp_kind = ({"full": "attn_heads", "out": "attn_out_heads"}[attn_mode],
                           {"both": "mlp_cols", "up": "mlp_up_cols", "down": "mlp_down_cols"}[mlp_mode])
    head_dim = hidden // heads
    per_head = hidden * head_dim if attn_mode == "out" else 4 * hidden * head_dim
    per_col = {"up": hidden + 1, "down": hidden, "both": 2 * hidden + 1}[mlp_mode]
    keyed = 2 * (len(key.swaps(attn_kind)) * per_head + len(key.swaps(mlp_kind)) * per_col)  # its actual_total
    swappable = published_neo_counts(layers, heads, hidden, inter, 0.2, 0.4, mlp_mode, attn_mode)[2]
    report = key_report(folder, key)
    assert (report.counted_moved, report.swappable_params) == (keyed, swappable)
    assert report.fraction_of_swappable == keyed / swappable
