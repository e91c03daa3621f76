"""Tiny Llama-shaped checkpoints for the patch tests: a base, fine-tunes of it (base + small seeded noise, as
real fine-tunes move weights by a few percent), and an unrelated model of the same shapes."""
from __future__ import annotations

import pytest
import torch

from merge_engine.demo import make_synthetic_llama
from merge_engine.io.checkpoint import Checkpoint

SHAPE = dict(layers=3, hidden=32, intermediate=48, vocab=64, heads=4, kv_heads=4)


def read_all(path: str) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    try:
        return {name: ckpt.read(name) for name in ckpt.tensors}
    finally:
        ckpt.close()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(bits(a[n]), bits(b[n])) for n in a)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """dtype -> {"base", "tuned", "tuned2", "other"} folders."""
    root = tmp_path_factory.mktemp("patch_models")

    def make(dtype):
        name = str(dtype).removeprefix("torch.")
        base = make_synthetic_llama(str(root / f"base_{name}"), dtype=dtype, seed=0, **SHAPE)
        return {"base": base,
                "tuned": make_synthetic_llama(str(root / f"tuned_{name}"), dtype=dtype, seed=1, base=base, noise=1e-3,
                                              **SHAPE),
                "tuned2": make_synthetic_llama(str(root / f"tuned2_{name}"), dtype=dtype, seed=2, base=base,
                                               noise=1e-3, **SHAPE),
                "other": make_synthetic_llama(str(root / f"other_{name}"), dtype=dtype, seed=3, **SHAPE)}

    made = {}

    def get(dtype=torch.bfloat16):
        if dtype not in made:
            made[dtype] = make(dtype)
        return made[dtype]

    return get
