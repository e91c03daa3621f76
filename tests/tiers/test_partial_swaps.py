"""Partial swaps (attn_out_heads, mlp_up_cols, mlp_down_cols), Qwen3 and Qwen3-MoE, explicit head_dim.

Every keyed checkpoint is compared bit for bit with tests/tiers/conftest.py's by-hand implementation, written from
the published reference's definitions (McGill-NLP/tiered-language-models, permute.py: a partial swap moves one side
of a block: out_proj columns; c_fc row and bias; c_proj column). Round trips are byte for byte, streamed and in place.
"""
import random
import shutil

import pytest
import torch

from merge_engine.tiers import (
    BlockPermutation,
    KeyedModel,
    TierKey,
    TierKeyError,
    apply_key,
    apply_key_in_place,
    generate_key,
    key_report,
    model_blocks,
    remove_key,
    remove_key_in_place,
)
from tests.tiers.conftest import KIND_PARTS, bits, read_config, same_files, swap_by_hand, tier_config

ARCHS = ("gpt_neo", "llama_gqa", "qwen2", "qwen3", "gpt2")


def mixed_key(cfg: dict, seed: int, swaps_per_kind: int = 6) -> TierKey:
    """A key with every list of the format, disjoint part by part, within and across layers, drawn at random."""
    blocks = model_blocks(cfg)
    rng = random.Random(seed)
    used: set[tuple[str, tuple[int, int]]] = set()
    lists = {}
    for kind, parts in KIND_PARTS.items():
        count = blocks.count(kind)
        free = [(layer, i) for layer in range(blocks.num_layers) for i in range(count)
                if not any((p, (layer, i)) in used for p in parts)]
        rng.shuffle(free)
        n = min(swaps_per_kind, len(free) // 2, 1 if kind.startswith("attn") else swaps_per_kind)
        lists[kind] = [(free[2 * j], free[2 * j + 1]) for j in range(n)]
        used |= {(p, b) for swap in lists[kind] for b in swap for p in parts}
    return TierKey(**lists)


def assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(bits(got[name]), bits(want[name])), name


@pytest.mark.parametrize("arch", ARCHS)
def test_partial_and_whole_swaps_match_by_hand_and_round_trip(arch, tier_model, folder_tensors, tmp_path):
    model = tier_model(arch)
    cfg = read_config(model)
    k1, k2 = mixed_key(cfg, 1), mixed_key(cfg, 2)
    assert all(k1.swaps(kind) for kind in KIND_PARTS)
    apply_key(model, [k1, k2], str(tmp_path / "keyed"))
    original = folder_tensors(model)
    assert_same_tensors(folder_tensors(tmp_path / "keyed"), swap_by_hand(swap_by_hand(original, cfg, k1), cfg, k2))
    remove_key(str(tmp_path / "keyed"), [k1, k2], str(tmp_path / "public"))
    same_files(model, tmp_path / "public")
    work = shutil.copytree(model, tmp_path / "work")
    apply_key_in_place(str(work), [k1, k2])
    same_files(tmp_path / "keyed", work)
    remove_key_in_place(str(work), [k1, k2])
    same_files(model, work)


def test_qwen3_norms_stay_and_explicit_head_dim_is_used(tier_model, folder_tensors, tmp_path):
    model = tier_model("qwen3")
    cfg = read_config(model)
    blocks = model_blocks(cfg)
    assert (blocks.head_dim, blocks.count("attn_heads")) == (32, 2)  # hidden / heads would say 16
    key = generate_key(cfg, "qwen3 secret", 0.3, 0.6)
    assert key.attn_heads and key.mlp_cols
    apply_key(model, key, str(tmp_path / "keyed"))
    before, after = folder_tensors(model), folder_tensors(tmp_path / "keyed")
    norms = [n for n in before if n.endswith(("q_norm.weight", "k_norm.weight"))]
    assert len(norms) == 8 and all(torch.equal(before[n], after[n]) for n in norms)
    q = [n for n in before if n.endswith("q_proj.weight") and not torch.equal(before[n], after[n])]
    assert q  # whole 64-row q groups (2 query heads x head_dim 32) moved


@pytest.mark.parametrize("arch", ("gpt_neo", "qwen3", "llama_gqa"))
def test_partial_swaps_within_a_layer_change_the_model_and_whole_ones_do_not(arch, tier_model, tmp_path):
    """A whole block moved within its layer is a symmetry; any partial swap is not: the keyed model's logits change,
    and key report counts only the former as moves that change nothing."""
    transformers = pytest.importorskip("transformers")
    model = tier_model(arch)
    within = {kind: [((layer, 0), (layer, 1)) for layer in range(4)] for kind in KIND_PARTS}
    logits = {}
    for name in ("public", *KIND_PARTS):
        folder = model
        if name != "public":
            folder = str(tmp_path / name)
            apply_key(model, BlockPermutation.from_swaps({name: within[name]}), folder)
            report = key_report(model, BlockPermutation.from_swaps({name: within[name]}))
            assert (report.params_within == report.params_moved) == (name in ("attn_heads", "mlp_cols"))
        lm = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            logits[name] = lm(torch.arange(3, 19)[None]).logits
    for name in KIND_PARTS:
        same = torch.allclose(logits[name], logits["public"], atol=1e-4, rtol=1e-4)
        assert same == (name in ("attn_heads", "mlp_cols")), name


@pytest.mark.parametrize("arch", ("gpt_neo", "qwen3"))
def test_keyed_forward_with_partial_swaps_equals_the_permuted_model(arch, tier_model):
    transformers = pytest.importorskip("transformers")
    model_dir = tier_model(arch)
    cfg = read_config(model_dir)
    keys = [mixed_key(cfg, 3), mixed_key(cfg, 4)]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    permuted = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    state = model.state_dict()
    for key in keys:
        state = swap_by_hand(state, cfg, key)
    permuted.load_state_dict(state)
    ids = torch.arange(5, 21)[None]
    keyed = KeyedModel(model, keys)
    with torch.no_grad(), keyed.configuration("keyed"):
        got = model(ids).logits
    with torch.no_grad():
        assert torch.equal(got, permuted(ids).logits)


def test_overlapping_swaps_are_refused_by_name():
    with pytest.raises(TierKeyError, match=r"mlp_up_cols\[0\] \[\[0, 1\], \[2, 3\]\] overlaps mlp_cols\[0\] "
                                           r"\[\[0, 1\], \[1, 2\]\]: both move the mlp_up part of block \[0, 1\]"):
        TierKey(mlp_cols=[((0, 1), (1, 2))], mlp_up_cols=[((0, 1), (2, 3))])
    with pytest.raises(TierKeyError, match=r"attn_out_heads\[1\] .* overlaps attn_heads\[0\]"):
        TierKey.from_json('{"attn_heads": [[[0, 0], [1, 0]]], "attn_out_heads": [[[2, 0], [3, 0]], '
                          '[[1, 0], [2, 1]]]}')
    with pytest.raises(TierKeyError, match=r"mlp_down_cols\[1\] .* overlaps mlp_down_cols\[0\]"):
        TierKey(mlp_down_cols=[((0, 1), (1, 2)), ((1, 2), (3, 3))])
    # an up-only and a down-only swap of the same column share no part
    key = TierKey(mlp_up_cols=[((0, 1), (1, 2))], mlp_down_cols=[((0, 1), (1, 2))])
    assert key.permutation() == BlockPermutation.from_swaps({"mlp_cols": [((0, 1), (1, 2))]})


def test_out_of_range_partial_swaps_are_refused_by_name(tier_model, tmp_path):
    model = tier_model("qwen3")
    with pytest.raises(TierKeyError, match=r"attn_out_heads\[0\] names KV group 2, but .* has 2 per layer"):
        apply_key(model, TierKey(attn_out_heads=[((0, 2), (1, 0))]), str(tmp_path / "out"))
    with pytest.raises(TierKeyError, match=r"mlp_up_cols\[0\] names layer 4"):
        apply_key(model, TierKey(mlp_up_cols=[((4, 2), (1, 0))]), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_qwen3_moe_keys_its_attention_and_refuses_mlp_swaps_by_name(tier_model, folder_tensors, tmp_path):
    model = tier_model("qwen3_moe")
    cfg = read_config(model)
    with pytest.raises(TierKeyError, match="qwen3_moe has no mlp_cols blocks .*mixture of experts"):
        generate_key(cfg, "moe secret", 0.3, 0.6)
    key = generate_key(cfg, "moe secret", 0.3, 1.0)
    assert key.attn_heads and not key.mlp_cols
    apply_key(model, key, str(tmp_path / "keyed"))
    assert_same_tensors(folder_tensors(tmp_path / "keyed"), swap_by_hand(folder_tensors(model), cfg, key))
    for kind in ("mlp_cols", "mlp_up_cols", "mlp_down_cols"):
        with pytest.raises(TierKeyError, match=f"{kind} swaps are not supported on qwen3_moe"):
            apply_key(model, TierKey(**{kind: [((0, 1), (1, 1))]}), str(tmp_path / "refused"))


def test_qwen3_moe_key_too_small_for_one_attention_swap_says_to_raise_the_fraction():
    """With an attention share of 1 (what the MLP refusal asks for), a fraction that buys no KV-group swap must not
    fall back to MLP swaps and be told to use an attention share of 1 again."""
    cfg = tier_config("qwen3_moe").to_dict()
    with pytest.raises(TierKeyError, match=r"buys no attn_heads swap.*raise the fraction") as refused:
        generate_key(cfg, "moe secret", 0.01, 1.0)
    assert "attention share" not in str(refused.value)


def test_published_keys_with_partial_lists_are_read_and_ours_write_them_only_when_used():
    published = {"attn_heads": [[[1, 0], [2, 2]]], "attn_out_heads": [[[0, 1], [0, 3]]],
                 "mlp_cols": [[[0, 5], [3, 10]]], "mlp_up_cols": [[[0, 1], [0, 2]]], "mlp_down_cols": [[[1, 3], [1, 7]]]}
    import json
    key = TierKey.from_json(json.dumps(published))
    assert {k: [[list(a), list(b)] for a, b in key.swaps(k)] for k in published} == published
    back = json.loads(key.to_json())
    assert {k: back[k] for k in published} == published
    whole = json.loads(TierKey(mlp_cols=[((0, 1), (1, 1))]).to_json())
    assert "mlp_up_cols" not in whole and whole["attn_heads"] == []  # the reference's to_dict does the same


def test_generated_partial_keys_follow_the_modes(tier_model):
    cfg = tier_config("gpt_neo").to_dict()
    key = generate_key(cfg, "s", 0.3, 0.5, attn_mode="out", mlp_mode="up")
    assert key.attn_out_heads and key.mlp_up_cols and not (key.attn_heads or key.mlp_cols or key.mlp_down_cols)
    assert any(a[0] == b[0] for a, b in key.mlp_up_cols)  # partial swaps may pair within a layer
    down = generate_key(cfg, "s", 0.3, 0.5, mlp_mode="down")
    assert down.attn_heads and down.mlp_down_cols and all(a[0] != b[0] for a, b in down.attn_heads)


def published_read(text: str, num_layers: int, num_heads: int, mlp_dim: int) -> dict:
    """A strict reader of the published format, restated from the reference (key.py: PermutationKey.from_dict reads
    the five lists with dict.get; validate_key checks layer, head and column bounds): every swap must be exactly
    [[layer, index], [layer, index]] of ints in range."""
    import json
    data = json.loads(text)
    lists = {kind: data.get(kind, []) for kind in KIND_PARTS}
    for kind, swaps in lists.items():
        bound = num_heads if kind.startswith("attn") else mlp_dim
        for swap in swaps:
            assert type(swap) is list and len(swap) == 2, swap
            for block in swap:
                assert type(block) is list and len(block) == 2 and all(type(v) is int for v in block), swap
                assert 0 <= block[0] < num_layers and 0 <= block[1] < bound, swap
    return lists


def test_our_keys_pass_a_strict_reader_of_the_published_format():
    cfg = tier_config("gpt_neo").to_dict()
    keys = [mixed_key(cfg, 7), generate_key(cfg, "s", 0.3, 0.5, attn_mode="out", mlp_mode="up"),
            generate_key(cfg, "s", 0.3, 0.5, mlp_mode="down"), generate_key(cfg, "s", 0.3, 0.5)]
    for key in keys:
        lists = published_read(key.to_json(), cfg["num_layers"], cfg["num_heads"], cfg["intermediate_size"] or 256)
        assert lists == {kind: [[list(a), list(b)] for a, b in key.swaps(kind)] for kind in KIND_PARTS}
