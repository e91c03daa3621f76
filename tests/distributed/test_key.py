"""Streamed key apply and remove over 2 and 3 gloo ranks: the same files, byte for byte, as one process."""
from __future__ import annotations

import os

import pytest

from merge_engine.tiers import apply_key, generate_key, remove_key
from tests.distributed.ranks import run_ranks
from tests.tiers.conftest import read_config, same_files

ARCHS = ("llama", "gpt2")  # separate q/k/v and MLP tensors; GPT-2's fused qkv (Conv1D)


def keys_of(model: str) -> list:
    cfg = read_config(model)
    return [generate_key(cfg, "first secret", 0.3, 0.6), generate_key(cfg, "second secret", 0.25, 0.6)]


def apply_then_remove(rank: int, models: list[str], root: str) -> None:
    for model in models:
        name = os.path.basename(model)
        keys = keys_of(model)
        apply_key(model, keys, os.path.join(root, name, "keyed"))
        remove_key(os.path.join(root, name, "keyed"), keys, os.path.join(root, name, "public"))


@pytest.mark.parametrize("size", [2, 3])
def test_distributed_key_apply_and_remove_are_bit_identical(tier_model, tmp_path, size):
    models = [tier_model(arch) for arch in ARCHS]
    results = run_ranks(apply_then_remove, size, str(tmp_path / "results"), models, str(tmp_path / "dist"))
    assert [r["error"] for r in results] == [None] * size, [r.get("traceback") for r in results]
    for model in models:
        name = os.path.basename(model)
        apply_key(model, keys_of(model), str(tmp_path / "single" / name))
        same_files(tmp_path / "single" / name, tmp_path / "dist" / name / "keyed")
        same_files(model, tmp_path / "dist" / name / "public")
        assert sorted(os.listdir(tmp_path / "dist" / name)) == ["keyed", "public"]  # no temporary folder left
