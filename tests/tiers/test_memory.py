"""Keys applied to a model in memory (a loaded transformers model or a state dict): equal to the streamed apply bit
for bit, removed back to the original bits, validated before anything changes."""
import random

import pytest
import torch

from merge_engine.errors import MergeEngineError
from merge_engine.tiers import (
    BlockPermutation,
    TierKey,
    TierKeyError,
    apply_key,
    apply_key_in_memory,
    compose,
    generate_key,
    remove_key_in_memory,
)
from merge_engine.tiers.memory import _cycles, _two_involutions
from tests.tiers.conftest import bits, read_config
from tests.tiers.test_partial_swaps import mixed_key

transformers = pytest.importorskip("transformers")


def load(folder) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto")


def assert_equal_to_folder(state: dict, folder_state: dict) -> None:
    for name, want in folder_state.items():
        assert torch.equal(bits(state[name]), bits(want)), name


def random_permutation(seed: int) -> BlockPermutation:
    """A general permutation of the MLP columns and heads of a 4-layer model: random cycles, lengths 2 to 6."""
    rng = random.Random(seed)
    maps = {}
    for part, count in (("mlp_up", 96), ("mlp_down", 96), ("attn_qkv", 2), ("attn_out", 2)):
        blocks = [(layer, i) for layer in range(4) for i in range(count)]
        rng.shuffle(blocks)
        m, pos = {}, 0
        while pos + 6 <= min(len(blocks), 30):
            k = rng.randint(2, 6)
            cycle = blocks[pos:pos + k]
            pos += k
            m.update({cycle[i]: cycle[(i + 1) % k] for i in range(k)})
        maps[part] = m
    return BlockPermutation(maps)


@pytest.mark.parametrize("arch", ("llama", "qwen2", "gpt2", "gpt_neo", "qwen3"))
def test_in_memory_equals_streamed_for_keys_and_tiers_and_removes_exactly(arch, tier_model, folder_tensors, tmp_path):
    folder = tier_model(arch)
    cfg = read_config(folder)
    keys = [mixed_key(cfg, 5), generate_key(cfg, "memory secret", 0.3, 0.6)]
    apply_key(folder, keys, str(tmp_path / "keyed"))
    model = load(folder)
    run = apply_key_in_memory(model, keys)
    assert run.tensors_changed > 0 and run.params_moved > 0
    assert_equal_to_folder(model.state_dict(), folder_tensors(tmp_path / "keyed"))
    remove_key_in_memory(model, keys)
    assert_equal_to_folder(model.state_dict(), folder_tensors(folder))


@pytest.mark.parametrize("seed", range(3))
def test_general_permutations_take_two_rounds_of_swaps(seed, tier_model, folder_tensors, tmp_path):
    folder = tier_model("qwen2")
    cfg = read_config(folder)
    perm = compose(random_permutation(seed), mixed_key(cfg, seed))
    state = folder_tensors(folder)
    apply_key(folder, perm, str(tmp_path / "keyed"))
    apply_key_in_memory(state, perm, cfg)
    assert_equal_to_folder(state, folder_tensors(tmp_path / "keyed"))
    remove_key_in_memory(state, perm, cfg)
    assert_equal_to_folder(state, folder_tensors(folder))


def test_two_involutions_make_every_cycle():
    rng = random.Random(0)
    for k in range(2, 12):
        cycle = [(0, i) for i in rng.sample(range(100), k)]
        first, second = _two_involutions([cycle])
        for swaps in (first, second):  # disjoint swaps
            flat = [b for row in swaps for b in (row[:2], row[2:])]
            assert len(flat) == len(set(flat))
        values = {b: b for b in cycle}
        for swaps in (first, second):
            for la, ia, lb, ib in swaps:
                values[la, ia], values[lb, ib] = values[lb, ib], values[la, ia]
        assert all(values[cycle[i]] == cycle[(i + 1) % k] for i in range(k))
    moved = {(0, 1): (1, 2), (1, 2): (0, 1), (2, 0): (2, 3), (2, 3): (3, 3), (3, 3): (2, 0)}
    assert sorted(map(len, _cycles(moved))) == [2, 3]


def test_refusals_change_nothing(tier_model, folder_tensors):
    folder = tier_model("qwen2")
    cfg = read_config(folder)
    state = folder_tensors(folder)
    before = {n: t.clone() for n, t in state.items()}
    good = generate_key(cfg, "s", 0.3, 0.6)
    bad = TierKey(mlp_cols=[((0, 1), (3, 96))])  # column 96 of 96
    with pytest.raises(TierKeyError, match=r"mlp_cols\[0\] names MLP column 96"):
        apply_key_in_memory(state, [good, bad], cfg)
    other = generate_key({**cfg, "num_hidden_layers": 6}, "s", 0.3, 0.6)
    with pytest.raises(TierKeyError, match="num_layers 6"):
        apply_key_in_memory(state, other, cfg)
    missing = {n: t for n, t in state.items() if "layers.2.mlp.up_proj" not in n}
    with pytest.raises(MergeEngineError, match="layer 2 has no 'mlp.up_proj.weight'"):
        apply_key_in_memory(missing, good, cfg)
    with pytest.raises(MergeEngineError, match="needs config"):
        apply_key_in_memory(state, good)
    # one layer's down_proj in another dtype: its bits would be read as the other's; refused before any swap
    mixed = dict(state, **{"model.layers.2.mlp.down_proj.weight": state["model.layers.2.mlp.down_proj.weight"].half()})
    with pytest.raises(MergeEngineError, match=r"'model.layers.2.mlp.down_proj.weight' is float16 on cpu but "
                                               r"'model.layers.0.mlp.down_proj.weight' is float32 on cpu"):
        apply_key_in_memory(mixed, good, cfg)
    assert all(torch.equal(state[n], before[n]) for n in before)


def test_a_swap_refused_by_its_op_changes_no_tensor(tier_model, folder_tensors):
    # the checks of every swap run before the first: tensors sharing memory are refused by swap_blocks_ itself
    folder = tier_model("qwen2")
    cfg = read_config(folder)
    state = folder_tensors(folder)
    up = "model.layers.{}.mlp.up_proj.weight"
    state[up.format(3)] = state[up.format(1)]
    before = {n: t.clone() for n, t in state.items()}
    with pytest.raises(ValueError, match="swap_blocks_"):
        apply_key_in_memory(state, generate_key(cfg, "s", 0.3, 0.6), cfg)
    assert all(torch.equal(state[n], before[n]) for n in before)
