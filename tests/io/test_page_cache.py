"""direct_io="auto": resident ranges are read plainly, the rest with O_DIRECT (merge_engine/io/page_cache.py)."""
import fcntl
import os

import pytest
import torch
from safetensors.torch import save_file

from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.page_cache import MIN_DIRECT_RUN, PAGE, ResidencyMap, read_spans


def _pages(pattern: str) -> torch.Tensor:
    return torch.tensor([c == "R" for c in pattern])


def test_spans_cover_the_range_in_order_and_alternate():
    long_gap = MIN_DIRECT_RUN // PAGE
    resident = _pages("RR" + "-" * long_gap + "R" + "-" + "RR" + "-" * (long_gap + 3))
    start, end = 3 * PAGE, (3 + len(resident)) * PAGE - 100
    spans = read_spans(resident, start, end)
    assert spans[0][0] == start and spans[-1][1] == end
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "contiguous"
    assert all(a[2] != b[2] for a, b in zip(spans, spans[1:])), "adjacent spans of one kind are merged"
    # the long missing runs direct, the one missing page between resident ones read plainly with them
    assert [(lo // PAGE - 3, -(-hi // PAGE) - 3, plain) for lo, hi, plain in spans] == [
        (0, 2, True), (2, 2 + long_gap, False), (2 + long_gap, 6 + long_gap, True),
        (6 + long_gap, len(resident), False)]


def test_spans_whole_range_one_way():
    assert read_spans(_pages("RRRR"), 0, 4 * PAGE) == [(0, 4 * PAGE, True)]
    assert read_spans(_pages("----"), 0, 4 * PAGE) == [(0, 4 * PAGE, False)]  # short, but nothing to join
    assert read_spans(None, 0, 4 * PAGE) == [(0, 4 * PAGE, False)]  # unknown: as direct_io="on"
    # a range starting inside its first page (pages larger than the 4 KiB direct-I/O block)
    assert read_spans(_pages("R-"), PAGE // 2, 2 * PAGE) == [(PAGE // 2, 2 * PAGE, True)]


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cold_model(tmp_path):
    """One safetensors file of 4 x 3 MiB tensors and small ones, dropped from the page cache; skips where
    the filesystem keeps no page cache apart from its files or refuses O_DIRECT (tmpfs)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {f"big{i}": torch.randn(3 * MIN_DIRECT_RUN // 4, generator=gen) for i in range(4)}
    tensors.update({f"small{i}": torch.randn(1000 + i, generator=gen).bfloat16() for i in range(3)})
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "model.safetensors"
    save_file(tensors, str(path))
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("this filesystem refuses O_DIRECT (tmpfs?): direct_io has nothing to choose here")
    _evict(path)
    if bool(ResidencyMap(str(path)).resident_pages(0, os.path.getsize(path)).any()):
        pytest.skip("this filesystem keeps the file in memory after POSIX_FADV_DONTNEED")
    return folder, path, tensors


class _ReadLog:
    """os.preadv wrapped: bytes read through O_DIRECT and plain descriptors."""

    def __init__(self, monkeypatch):
        self.direct = self.plain = 0
        real = os.preadv

        def preadv(fd, buffers, offset, *args):
            n = real(fd, buffers, offset, *args)
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                self.direct += n
            else:
                self.plain += n
            return n
        monkeypatch.setattr(os, "preadv", preadv)


def _read_all(ckpt, mode):
    return {n: ckpt.read_pooled(n, lambda k: torch.empty(k, dtype=torch.uint8), mode).clone() for n in ckpt.tensors}


def test_auto_reads_what_the_cache_holds_plainly_and_the_rest_direct(tmp_path, monkeypatch):
    folder, path, tensors = _cold_model(tmp_path)
    residency = ResidencyMap(str(path))
    size = os.path.getsize(path)
    ckpt = Checkpoint(str(folder))
    big = ckpt.tensors["big2"]

    _evict(path)  # the header's pages too: all cold, all direct, and the cache stays empty
    log = _ReadLog(monkeypatch)
    got = _read_all(ckpt, "auto")
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    assert log.plain == 0 and log.direct >= sum(t.nbytes for t in tensors.values())
    assert not bool(residency.resident_pages(0, size).any()), "direct reads filled the page cache"

    with open(path, "rb") as f:  # warm: what the cache holds is copied, nothing goes to the disk
        f.read()
    assert bool(residency.resident_pages(0, size).all())
    log.direct = log.plain = 0
    got = _read_all(ckpt, "auto")
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    assert log.direct == 0 and log.plain == sum(t.nbytes for t in tensors.values())

    _evict(path)  # half warm: the first half of one large tensor is in the cache (no read-ahead)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    os.pread(fd, big.nbytes // 2, big.data_start)
    os.close(fd)
    log.direct = log.plain = 0
    assert torch.equal(ckpt.read_pooled("big2", lambda k: torch.empty(k, dtype=torch.uint8), "auto"), tensors["big2"])
    # plain: the cached half (to a page either side); direct: the rest, rounded out to whole blocks
    assert abs(log.plain - big.nbytes // 2) <= PAGE
    assert big.nbytes - log.plain <= log.direct <= big.nbytes - log.plain + 2 * PAGE


def test_on_and_off_ignore_the_cache(tmp_path, monkeypatch):
    folder, path, tensors = _cold_model(tmp_path)
    with open(path, "rb") as f:
        f.read()
    ckpt = Checkpoint(str(folder))
    log = _ReadLog(monkeypatch)
    got = _read_all(ckpt, "on")
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    assert log.plain == 0
    log.direct = 0
    _evict(path)
    got = _read_all(ckpt, "off")
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    assert log.direct == 0
    with pytest.raises(ValueError, match="direct_io must be one of"):
        ckpt.read_pooled("big0", lambda k: torch.empty(k, dtype=torch.uint8), "yes")
