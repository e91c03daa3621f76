"""Sharded output: layout, index, atomic move into place, refusal to overwrite."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from merge_engine.errors import OutputError
from merge_engine.io.writer import ShardedWriter, plan_shards


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(10, 10, generator=g), "b": torch.randn(3, generator=g).bfloat16(),
            "c": torch.randn(50, generator=g), "d": torch.randn(1, generator=g).half()}


def entries(ts):
    return [(n, t.dtype, tuple(t.shape)) for n, t in ts.items()]


def test_plan_shards_respects_size_and_order():
    e = [("a", torch.float32, (10,)), ("b", torch.float32, (10,)), ("c", torch.float32, (30,)), ("d", torch.float32, (1,))]
    assert plan_shards(e, 80) == [[0, 1], [2], [3]]  # c (120 B) is larger than a shard: alone
    assert plan_shards(e, 10**9) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("shard_size", [10**9, 250])
def test_written_shards_and_index(tmp_path, shard_size):
    ts = tensors()
    out = tmp_path / "out"
    w = ShardedWriter(str(out), entries(ts), shard_size)
    for name in reversed(list(ts)):  # any write order
        w.write(name, ts[name])
    assert not out.exists()  # nothing visible before commit
    w.commit()
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    loaded = {}
    for f in files:
        loaded.update(load_file(str(out / f)))
    assert set(loaded) == set(ts) and all(torch.equal(loaded[n], ts[n]) for n in ts)
    if shard_size == 10**9:
        assert files == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(files) > 1
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
        assert set(index["weight_map"]) == set(ts)
        for name, f in index["weight_map"].items():
            assert name in load_file(str(out / f))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folder left


def test_commit_refuses_incomplete_output_and_abort_leaves_nothing(tmp_path):
    ts = tensors()
    w = ShardedWriter(str(tmp_path / "out"), entries(ts), 10**9)
    w.write("a", ts["a"])
    with pytest.raises(RuntimeError, match="never written"):
        w.commit()
    w.abort()
    assert os.listdir(tmp_path) == []


def test_wrong_shape_or_dtype_is_rejected(tmp_path):
    ts = tensors()
    w = ShardedWriter(str(tmp_path / "out"), entries(ts), 10**9)
    with pytest.raises(ValueError, match="'a'"):
        w.write("a", ts["a"].double())
    w.abort()


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    ts = tensors()
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):
        ShardedWriter(str(out), entries(ts), 10**9)
    assert (out / "precious.txt").read_text() == "keep me"
    w = ShardedWriter(str(out), entries(ts), 10**9, overwrite=True)
    for n, t in ts.items():
        w.write(n, t)
    w.commit()
    assert sorted(os.listdir(out)) == ["model.safetensors"]
