"""Key generation, the key file format, and block permutations (no checkpoints needed)."""
import json
import os
import re

import pytest
import torch

from merge_engine.demo import tiny_config
from merge_engine.errors import CheckpointError
from merge_engine.tiers import BlockPermutation, TierKey, TierKeyError, compose, generate_key, model_blocks
from merge_engine.tiers.generate import ByteStream


@pytest.fixture(scope="module")
def configs():
    return {arch: tiny_config(arch).to_dict() for arch in ("llama", "qwen2", "gpt2")}


def all_blocks(key):
    return [(kind, block) for kind in ("attn_heads", "mlp_cols") for swap in key.swaps(kind) for block in swap]


def test_same_secret_same_key_and_different_secret_different_key(configs):
    cfg = configs["qwen2"]
    a = generate_key(cfg, "correct horse", 0.4, 0.5)
    assert a == generate_key(cfg, b"correct horse", 0.4, 0.5)
    b = generate_key(cfg, "correct horse!", 0.4, 0.5)
    assert a.mlp_cols != b.mlp_cols
    assert len(a.attn_heads) == len(b.attn_heads) > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("fraction,share", [(0.05, 0.25), (0.3, 0.6)])
def test_budget_split_and_disjointness(configs, arch, fraction, share):
    cfg = configs[arch]
    blocks = model_blocks(cfg)
    key = generate_key(cfg, f"secret-{arch}", fraction, share)
    used = all_blocks(key)
    assert len(used) == len(set(used))  # no block twice
    target = int(blocks.swappable_params * fraction)
    targets = {"attn_heads": int(target * share)}
    targets["mlp_cols"] = target - targets["attn_heads"]
    if arch != "gpt2" and not key.attn_heads:  # the reference's qwen.py: a share too small for one swap goes to MLP
        targets["mlp_cols"] = target
    for kind, kt in targets.items():
        swap_params = 2 * blocks.counted_per_block(kind)
        keyed = len(key.swaps(kind)) * swap_params
        assert keyed <= kt < keyed + swap_params, (kind, keyed, kt)
        for (la, ia), (lb, ib) in key.swaps(kind):
            assert la != lb  # within-layer swaps would key nothing
            assert 0 <= ia < blocks.count(kind) and 0 <= ib < blocks.count(kind)
    assert key.meta["model_type"] == arch and key.meta["num_layers"] == 4


def test_gqa_head_blocks_are_kv_groups(configs):
    blocks = model_blocks(configs["qwen2"])
    qkv = blocks.parts["attn_qkv"]
    assert (blocks.num_heads, blocks.num_kv_heads, blocks.count("attn_heads")) == (4, 2, 2)
    q = next(m for m in qkv.members if m.suffix == "self_attn.q_proj.weight")
    k = next(m for m in qkv.members if m.suffix == "self_attn.k_proj.weight")
    assert q.indices(torch.tensor([1])).tolist() == list(range(32, 64))  # query heads 2 and 3
    assert k.indices(torch.tensor([1])).tolist() == list(range(16, 32))  # their kv head 1
    # q, k, v rows (+ biases) and o columns: (2 * group + 2) * head_dim * (hidden + bias)
    assert blocks.params_per_block("attn_heads") == (2 * 2 + 2) * 16 * 64 + (2 + 1 + 1) * 16
    # in key sizes, as the reference counts (qwen.py): without the biases
    assert blocks.counted_per_block("attn_heads") == (2 * 2 + 2) * 16 * 64


def test_unbiased_draws_cover_the_range():
    stream = ByteStream(b"\0" * 32, "test")
    counts = torch.bincount(torch.tensor([stream.below(3) for _ in range(3000)]), minlength=3)
    assert counts.min() > 900


def test_json_round_trip(configs):
    key = generate_key(configs["gpt2"], "s", 0.3, 0.5)
    text = key.to_json()
    data = json.loads(text)
    assert data["format"] == "merge_engine.tier_key" and data["version"] == 1
    assert data["attn_heads"] == [[list(a), list(b)] for a, b in key.attn_heads]
    back = TierKey.from_json(text)
    assert (back.attn_heads, back.mlp_cols, back.meta) == (key.attn_heads, key.mlp_cols, key.meta)


def test_published_format_is_read():
    published = {"attn_heads": [[[1, 0], [2, 2]]], "mlp_cols": [[[0, 5], [3, 10]], [[0, 6], [0, 7]]]}
    key = TierKey.from_json(json.dumps(published))
    assert key.attn_heads == (((1, 0), (2, 2)),)
    assert key.mlp_cols[1] == ((0, 6), (0, 7)) and key.meta == {}
    assert TierKey.from_json('{"mlp_cols": [[[0, 1], [1, 1]]]}').attn_heads == ()  # the reference's .get default


@pytest.mark.parametrize("text,needle", [
    ('{"mlp_cols": [[[0, 1], [1, 2]], [[1, 2], [3, 4]]]}', r"mlp_cols\[1\] \[\[1, 2\], \[3, 4\]\] overlaps mlp_cols\[0\]"),
    ('{"mlp_cols": [[[0, 1], [0, 1]]]}', "with itself"),
    ('{"mlp_cols": [[[0, -1], [1, 2]]]}', "not a swap"),
    ('{"mlp_cols": [[0, 1]]}', "not a swap"),
    ('{"attn_heads": [], "mlp_cols": [], "version": 2}', "newer"),
    ('{"attn_heads": [], "mlp_cols": [], "version": "1"}', "version must be a positive integer, got '1'"),
    ('{"attn_heads": [], "mlp_cols": [], "version": true}', "version must be a positive integer, got True"),
    ('{"attn_heads": [], "mlp_cols": [], "version": -7}', "version must be a positive integer, got -7"),
    ('{"attn_heads": [], "mlp_cols": [], "format": "other"}', "unknown key format"),
    ('{"attn_heads": [], "mlp_cols": [], "mlp_up_cols": [[[0, 1], [1, 1]], [[1, 1], [2, 2]]]}', "overlaps"),
    ('{"model_type": "llama", "num_hidden_layers": 4}', "not a tier key"),
    ("[1, 2", "invalid JSON"),
])
def test_malformed_keys_are_refused(text, needle):
    with pytest.raises(TierKeyError, match=needle) as e:
        TierKey.from_json(text, source="bad.json")
    assert "bad.json" in str(e.value)


def test_a_key_file_past_the_size_cap_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    from merge_engine.tiers import key as key_module
    path = tmp_path / "key.json"
    path.write_text('{"mlp_cols": [' + ", ".join(["[[0, 1], [1, 1]]"] * 100) + "]}")
    monkeypatch.setattr(key_module, "MAX_KEY_BYTES", path.stat().st_size - 1)
    with pytest.raises(TierKeyError, match=f"{path}: more than 0 MiB, not a tier key"):
        TierKey.load(str(path))
    monkeypatch.setattr(key_module, "MAX_KEY_BYTES", path.stat().st_size)
    with pytest.raises(TierKeyError, match=r"mlp_cols\[1\] \[\[0, 1\], \[1, 1\]\] overlaps mlp_cols\[0\]"):
        TierKey.load(str(path))


def test_a_field_no_format_reads_is_named_with_the_closest_list(recwarn):
    key = TierKey.from_json('{"attn_heads": [[[0, 1], [1, 1]]], "mlp_col": [[[0, 1], [1, 1]]], "notes": "x"}', "k.json")
    assert key.mlp_cols == () and key.attn_heads == (((0, 1), (1, 1)),)  # ignored, as the reference ignores it
    assert [str(w.message) for w in recwarn] == [
        "k.json: field 'mlp_col' is not part of a tier key (did you mean 'mlp_cols'?): ignored",
        "k.json: field 'notes' is not part of a tier key: ignored"]


def test_fifo_key_file_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "key.json"
    os.mkfifo(fifo)
    with pytest.raises(TierKeyError, match=f"{fifo}: cannot read key file .*FIFO"):
        TierKey.load(str(fifo))


def test_compose_and_inverse():
    k1 = TierKey(attn_heads=(((0, 0), (1, 1)),), mlp_cols=(((0, 5), (2, 7)), ((1, 3), (3, 3))))
    k2 = TierKey(mlp_cols=(((2, 7), (1, 3)),))
    assert k1.inverse() is k1 and compose(k1, k1).is_identity()
    tier = compose(k1, k2)
    # apply k1 then k2: block (2, 7) receives what k1 put at (1, 3), i.e. the original (3, 3)
    for part in ("mlp_up", "mlp_down"):  # an mlp_cols swap moves both parts of a column
        assert tier.source(part, (2, 7)) == (3, 3)
        assert tier.source(part, (1, 3)) == (0, 5)
        assert tier.source(part, (0, 5)) == (2, 7)
    assert compose(tier, tier.inverse()).is_identity() and compose(tier.inverse(), tier).is_identity()
    assert compose(k1, k2).inverse() == compose(k2, k1)  # keys are involutions
    src_layer, src_index = tier.index_tables("mlp_up", 4, 8)
    assert (src_layer[2, 7].item(), src_index[2, 7].item()) == (3, 3)
    assert (src_layer[0, 0].item(), src_index[0, 0].item()) == (0, 0)
    dst, layer, index = tier.layer_moves("mlp_down")[2]
    assert (dst.tolist(), layer.tolist(), index.tolist()) == ([7], [3], [3])
    with pytest.raises(ValueError, match="not a permutation"):
        BlockPermutation({"mlp_cols": {(0, 1): (0, 2)}})
    with pytest.raises(ValueError, match="part mlp_up is given twice"):
        BlockPermutation({"mlp_cols": {}, "mlp_up": {}})


def test_arguments_of_the_wrong_kind_are_named():
    from merge_engine.errors import CheckpointError
    from merge_engine.tiers import apply_key_in_memory
    config = tiny_config("llama", layers=2).to_dict()
    with pytest.raises(TierKeyError, match="the secret must be a string or bytes, got a NoneType"):
        generate_key(config, None, fraction=0.2)
    with pytest.raises(CheckpointError, match="a model's config must be a mapping"):
        generate_key(None, "s", fraction=0.2)
    state = {"x": torch.zeros(1)}
    with pytest.raises(TierKeyError, match="a key must be a TierKey .* got a str"):
        apply_key_in_memory(state, "x", config)


def test_a_key_too_large_for_a_key_file_is_refused_before_drawing():
    """Sizes the config check accepts (2**20 each) ask for ~6e10 swaps: drawing them would fill memory, and the
    key could not be read back (key files stop at 256 MiB): refused at once, naming the config."""
    huge = {"model_type": "llama", "hidden_size": 1 << 20, "intermediate_size": 1 << 20, "num_hidden_layers": 1 << 20,
            "num_attention_heads": 1 << 20, "num_key_value_heads": 1 << 20}
    with pytest.raises(TierKeyError, match=r"huge.json: [\d,]+ swaps make a key larger than a key file may be"):
        generate_key(huge, "s", 0.05, source="huge.json")


def test_a_key_that_swaps_nothing_but_has_a_misspelt_list_is_refused(tmp_path):
    """{"attn_heads": [], "mlp_col": [...]} would apply as the identity key (an unkeyed copy) after a warning."""
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"attn_heads": [], "mlp_col": [[[0, 1], [1, 2]]]}))
    with pytest.warns(UserWarning, match="did you mean 'mlp_cols'"), \
            pytest.raises(TierKeyError, match=r"swaps nothing, but has 'mlp_col': a misspelt swap list\?"):
        TierKey.load(str(path))


def test_an_oversized_key_file_is_refused_by_its_size_unread(tmp_path, monkeypatch):
    from merge_engine.tiers import key as key_module
    path = tmp_path / "big.json"
    with open(path, "wb") as f:
        f.truncate(256 * 2**20 + 1)  # sparse: no data written

    class Unread:
        def __init__(self, opened):
            self.opened = opened

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.opened.close()

        def fileno(self):
            return self.opened.fileno()

        def read(self, *args):
            pytest.fail("read an oversized key file")
    real = key_module.open_regular
    monkeypatch.setattr(key_module, "open_regular", lambda p: Unread(real(p)))
    with pytest.raises(TierKeyError, match="more than 256 MiB, not a tier key"):
        TierKey.load(str(path))


@pytest.mark.parametrize("field, value", [("hidden_size", "64"), ("intermediate_size", 112.5),
                                          ("num_hidden_layers", True)])
def test_config_sizes_must_be_integers(field, value):
    """int() would take "64" as 64 and 112.5 as 112: a config.json no transformers model could be built from."""
    cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 112,
           "num_hidden_layers": 2, field: value}
    with pytest.raises(CheckpointError, match=f"c.json: cannot read the llama sizes.*{value!r} is not an integer"):
        model_blocks(cfg, "c.json")


@pytest.mark.parametrize("model_type", [["llama"], {"llama": 1}, None])
def test_a_model_type_that_is_not_a_name_is_refused_by_file(model_type):
    cfg = {"model_type": model_type, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 112,
           "num_hidden_layers": 2}
    with pytest.raises(CheckpointError, match=rf"c.json: model_type {re.escape(repr(model_type))} is not supported"):
        model_blocks(cfg, "c.json")


def test_a_key_file_named_up_to_255_bytes_is_written_owner_only(configs, tmp_path):
    import stat
    key = generate_key(configs["llama"], "secret", 0.2, 0.5)
    path = tmp_path / ("k" * 250 + ".json")  # PATH.partial-PID would pass the 255-byte name limit
    key.save(str(path))
    assert TierKey.load(str(path)).mlp_cols == key.mlp_cols
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == [path.name]  # no partial file left


KILLED_SAVE = """
import os, signal, sys
from merge_engine.tiers import TierKey
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed while writing, as by the OOM killer
TierKey.from_json('{"attn_heads": [[[0, 0], [1, 0]]]}').save(sys.argv[1])
"""


def test_a_killed_saves_partial_file_is_removed_by_the_next_save_and_others_kept(tmp_path):
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "a.json")], capture_output=True, text=True)
    assert res.returncode == -9, res.stderr
    [left] = os.listdir(tmp_path)
    assert left.startswith(".key-") and left.endswith(".partial")
    kept = [f".key-{os.getppid()}.0123abcd.partial", ".key-abc123xy.partial"]  # a running process'; not ours
    for name in kept:
        (tmp_path / name).write_text("{}")
    TierKey.from_json('{"attn_heads": [[[0, 1], [1, 1]]]}').save(str(tmp_path / "b.json"))
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["b.json"])
