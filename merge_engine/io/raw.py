"""The bytes of a tensor in host memory, as a buffer that os.preadv / os.pwrite read and write in place; and
fsync by path."""
from __future__ import annotations

import ctypes
import os

import torch

DIRECT_ALIGN = 4096  # O_DIRECT wants block-aligned file offsets, lengths and buffer addresses


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory, without a copy (and without numpy, which
    torch does not require). The view keeps the tensor alive."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * nbytes).from_address(t.data_ptr())
    array.owner = t  # the memory is the tensor's: hold it as long as the view exists
    return memoryview(array).cast("B")


def fsync_path(path: str) -> None:
    """fsync a file or a folder (its entries) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
