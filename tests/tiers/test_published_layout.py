"""Keys of the published code on a model whose config.json head_dim is not hidden_size / num_attention_heads
(Qwen3-0.6B's kind; here a Qwen3 with head_dim 32, hidden 64 and 4 heads: the reference's head_dim is 16). The
reference (qwen.py, apply_qwen_permutation) always derives head_dim as hidden / heads, so its key means other rows
than a key made here: every path (streamed, in place, in memory, KeyedModel) applies a key without merge_engine's
metadata as the reference does, checked against a by-hand restatement of its definition."""
import json
import shutil

import pytest
import torch

from merge_engine.tiers import (
    KeyedModel,
    TierKey,
    TierKeyError,
    apply_key,
    apply_key_in_memory,
    apply_key_in_place,
    generate_key,
    key_report,
    remove_key_in_memory,
)
from tests.tiers.conftest import bits, read_config

transformers = pytest.importorskip("transformers")

# within and across layers, attention (kv groups 0 and 1 of 2) and MLP columns
PUBLISHED = {"attn_heads": [[[0, 1], [2, 0]], [[1, 0], [1, 1]]], "mlp_cols": [[[0, 5], [3, 90]], [[2, 7], [2, 8]]]}


@pytest.fixture(scope="module", params=["qwen3", "qwen3_hidden80"])
def model_folder(request, tier_model, tmp_path_factory) -> str:
    """The tier tests' Qwen3 (head_dim 32, hidden 64: 16-row blocks that tile its tensors), or one with hidden 80
    (20-row blocks: k and v's 64 rows keep a remainder no block holds)."""
    if request.param == "qwen3":
        return tier_model("qwen3")
    config = transformers.Qwen3Config(vocab_size=256, hidden_size=80, head_dim=32, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("qwen3_hidden80")
    transformers.Qwen3ForCausalLM(config).save_pretrained(folder)
    return str(folder)


def published_key(tmp_path) -> TierKey:
    path = tmp_path / "published.json"
    path.write_text(json.dumps(PUBLISHED))  # as the reference writes it: no format, no metadata
    return TierKey.load(str(path))


def rows(start: int, count: int) -> torch.Tensor:
    return torch.arange(start, start + count)


def reference_apply(state: dict, cfg: dict) -> dict:
    """The reference's apply_qwen_permutation restated: head_dim = hidden / heads; a KV index i moves q rows
    [i*g*hd, (i+1)*g*hd), k and v rows [i*hd, (i+1)*hd) and o_proj columns like q; an MLP index moves a gate row,
    an up row and a down column. Disjoint swaps: each reads the original values."""
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    group = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    original, out = state, {n: t.clone() for n, t in state.items()}

    def move(name, dim, dst, src):
        (la, ia), (lb, ib) = dst, src
        target = out[name.format(la)]
        source = original[name.format(lb)]
        target.index_copy_(dim, ia, source.index_select(dim, ib))

    attn = "model.layers.{}.self_attn."
    for a, b in PUBLISHED["attn_heads"]:
        for dst, src in ((a, b), (b, a)):
            q = [(layer, rows(i * group * hd, group * hd)) for layer, i in (dst, src)]
            kv = [(layer, rows(i * hd, hd)) for layer, i in (dst, src)]
            move(attn + "q_proj.weight", 0, *q)
            move(attn + "k_proj.weight", 0, *kv)
            move(attn + "v_proj.weight", 0, *kv)
            move(attn + "o_proj.weight", 1, *q)
    mlp = "model.layers.{}.mlp."
    for a, b in PUBLISHED["mlp_cols"]:
        for dst, src in ((a, b), (b, a)):
            cols = [(layer, torch.tensor([i])) for layer, i in (dst, src)]
            move(mlp + "gate_proj.weight", 0, *cols)
            move(mlp + "up_proj.weight", 0, *cols)
            move(mlp + "down_proj.weight", 1, *cols)
    return out


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    assert all(torch.equal(bits(got[n]), bits(want[n])) for n in want), [n for n in want
                                                                         if not torch.equal(got[n], want[n])]


def test_every_path_applies_a_published_key_as_the_reference(model_folder, folder_tensors, tmp_path, caplog):
    folder = model_folder
    cfg = read_config(folder)
    assert cfg["head_dim"] != cfg["hidden_size"] // cfg["num_attention_heads"]
    key = published_key(tmp_path)
    state = folder_tensors(folder)
    want = reference_apply(state, cfg)
    assert any(not torch.equal(want[n], state[n]) for n in state if "self_attn" in n)
    apply_key(folder, key, str(tmp_path / "streamed"))
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert f"head_dim = hidden_size / num_attention_heads = {hd}, not config.json's head_dim 32" in caplog.text
    assert_same(folder_tensors(tmp_path / "streamed"), want)
    in_place = shutil.copytree(folder, tmp_path / "in_place")
    apply_key_in_place(str(in_place), key)
    assert_same(folder_tensors(in_place), want)
    memory = {n: t.clone() for n, t in state.items()}
    apply_key_in_memory(memory, key, cfg)
    assert_same(memory, want)
    remove_key_in_memory(memory, key, cfg)
    assert_same(memory, state)


@pytest.mark.parametrize("method", ["rebuild", "swap"])
def test_a_keyed_model_with_a_published_key_computes_the_reference_keyed_model(model_folder, tmp_path, method):
    folder = model_folder
    key = published_key(tmp_path)
    apply_key(folder, key, str(tmp_path / "keyed"))
    ids = torch.tensor([[1, 5, 9, 200, 3, 17]])
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "keyed").eval()(ids).logits
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        keyed = KeyedModel(model, key, configuration="keyed", method=method)
        assert torch.equal(keyed(ids).logits, want)


def test_published_and_own_keys_together_are_refused_on_such_a_model(tier_model, tmp_path):
    folder = tier_model("qwen3")
    own = generate_key(read_config(folder), "s", 0.3, 0.6)
    assert own.attn_heads
    with pytest.raises(TierKeyError, match="keys of the published code .* and keys made here mean different "
                                           "attention rows on this model"):
        apply_key(folder, [published_key(tmp_path), own], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_published_key_without_attention_swaps_goes_with_keys_made_here(model_folder, folder_tensors, tmp_path):
    # MLP columns mean the same in both layouts: no warning, no refusal
    folder = model_folder
    mlp_only = tmp_path / "mlp.json"
    mlp_only.write_text(json.dumps({"attn_heads": [], "mlp_cols": PUBLISHED["mlp_cols"]}))
    own = generate_key(read_config(folder), "s", 0.3, 0.6)
    assert own.attn_heads
    apply_key(folder, [TierKey.load(str(mlp_only)), own], str(tmp_path / "out"))
    assert (tmp_path / "out").exists()


def test_a_published_key_saved_again_keeps_its_meaning(tmp_path):
    key = published_key(tmp_path)
    key.save(str(tmp_path / "again.json"))
    again = TierKey.load(str(tmp_path / "again.json"))
    assert again.published and again == key and "format" not in json.loads((tmp_path / "again.json").read_text())
    with_meta = tmp_path / "meta.json"  # metadata without our format field: kept, still a published key
    with_meta.write_text(json.dumps({"model_type": "qwen3", "num_layers": 4, **PUBLISHED}))
    TierKey.load(str(with_meta)).save(str(tmp_path / "meta_again.json"))
    again = TierKey.load(str(tmp_path / "meta_again.json"))
    assert again.published and again.meta == {"model_type": "qwen3", "num_layers": 4}


def test_a_published_block_past_the_tensors_is_refused_by_name_on_every_path(tmp_path):
    """head_dim 8 under hidden 64 / 4 heads: the reference's 16-row blocks hold one KV index of the 2 (its code raises
    an IndexError for the other). Streaming said the intact weights file "ended early"; in memory a kernel error
    named no swap; key report and KeyedModel accepted the block."""
    config = transformers.Qwen3Config(vocab_size=64, hidden_size=64, head_dim=8, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=40)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    path = tmp_path / "published.json"
    path.write_text(json.dumps({"attn_heads": [[[0, 0], [1, 0]], [[0, 1], [1, 1]]]}))
    key = TierKey.load(str(path))
    refusal = r"attn_heads\[1\] names KV group 1, but .* has 1 per layer \(the published code's blocks"
    before, names = (folder / "model.safetensors").read_bytes(), sorted(p.name for p in folder.iterdir())
    for run in (lambda: apply_key(str(folder), key, str(tmp_path / "out")),
                lambda: apply_key_in_place(str(folder), key),
                lambda: key_report(str(folder), key),
                lambda: apply_key_in_memory(model, key),
                lambda: KeyedModel(model, key)):
        with pytest.raises(TierKeyError, match=refusal):
            run()
    assert (folder / "model.safetensors").read_bytes() == before  # and no journal was left
    assert sorted(p.name for p in folder.iterdir()) == names
    assert not (tmp_path / "out").exists()
