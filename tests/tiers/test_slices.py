"""Positional reads and writes of selections (merge_engine/tiers/slices.py), by segments and through the
whole-tensor path, against plain torch indexing of the same tensor."""
import os

import pytest
import torch

from merge_engine.io.raw import tensor_bytes
from merge_engine.tiers import slices
from merge_engine.tiers.slices import Stored, as_bits, read_runs, to_runs, write_runs

SHAPES = [(37,), (29, 13), (7, 11, 5)]


@pytest.fixture(params=[0, 10**9], ids=["whole-tensor", "segments"])
def max_segments(request, monkeypatch):
    monkeypatch.setattr(slices, "MAX_SEGMENTS", request.param)
    return request.param


def stored_tensor(tmp_path, shape, seed):
    """A bf16 tensor written after a 24-byte prefix in a file, and where it lies."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    path = tmp_path / "t.bin"
    path.write_bytes(b"x" * 24 + bytes(tensor_bytes(as_bits(t).contiguous())) + b"y" * 8)
    return t, Stored(str(path), 24, shape, 2)


def random_selection(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:max(1, n // 3)].sort().values


@pytest.mark.parametrize("shape", SHAPES)
def test_reads_and_writes_match_indexing(tmp_path, max_segments, shape):
    for dim in range(len(shape)):
        t, where = stored_tensor(tmp_path, shape, seed=dim)
        index = random_selection(shape[dim], seed=100 + dim)
        fd = os.open(where.path, os.O_RDWR)
        try:
            got = read_runs(fd, where, dim, to_runs(index))
            assert torch.equal(got, as_bits(t).index_select(dim, index)), f"dim {dim}"
            new = torch.randn(got.shape).to(torch.bfloat16)
            write_runs(fd, where, dim, to_runs(index), as_bits(new))
            expected = as_bits(t).index_copy(dim, index, as_bits(new))
            assert torch.equal(read_runs(fd, where, 0, [(0, shape[0])]), expected), f"dim {dim}"
        finally:
            os.close(fd)
        data = open(where.path, "rb").read()
        assert data[:24] == b"x" * 24 and data[-8:] == b"y" * 8  # nothing written outside the tensor
