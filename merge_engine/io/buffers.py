"""Host buffers that the engine's reads reuse.

Every tensor the engine reads needs a host buffer, and fresh memory is not free: the kernel zeroes
each new page the first time it is touched. In a 1.1B TIES merge on 2 CPU cores that zeroing took
more CPU time than the merge math (27% of all perf samples were in clear_page). The pool hands out
the buffers of finished jobs instead: a job's inputs and its result, once the result is on disk. So
after the first jobs a merge touches little new memory. Freed buffers are kept up to `capacity`
bytes; beyond that the oldest are released. Oldest first, not newest: a model's tensors come in
layers of repeating sizes, so the buffers of the last jobs fit the next reads, while the first job's
(an embedding several times a layer tensor) would otherwise fill the pool for good and send half of
a 1.1B merge's reads to fresh memory (measured: 4.2 of 8.8 GB).

The methods' own temporaries (fp32 chunks of bf16 tensors, sums) come from the C library's heap, which
by default hands them back to the system as soon as they are freed: merge_engine.runtime's
tune_process_for_merging keeps them (process-wide, so only on request: the CLI makes it).
"""
from __future__ import annotations

import math
import threading

import torch


class BufferPool:
    def __init__(self, capacity: int, pin_memory: bool = False):
        self.capacity, self.pin_memory = capacity, pin_memory
        self._free: list[torch.Tensor] = []  # flat uint8 tensors over whole storages
        self._free_bytes = 0
        self._lock = threading.Lock()
        self.fresh = self.reused = 0  # buffers allocated / handed out again

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of this shape and dtype, on a reused buffer when one fits (take_bytes)."""
        nbytes = math.prod(shape) * dtype.itemsize
        return self.take_bytes(nbytes)[:nbytes].view(dtype).view(shape)

    def take_bytes(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 tensor of nbytes bytes, on a reused buffer when one fits: at least the size needed
        and at most twice it (plus 1 MiB), so that a large buffer is not tied up by a small tensor."""
        buffer = self._take_free(nbytes) if nbytes else None
        if buffer is None:
            self.fresh += 1
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
        return buffer[:nbytes]

    def _take_free(self, nbytes: int) -> torch.Tensor | None:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if nbytes <= b.numel() <= 2 * nbytes + (1 << 20)]
            if not fits:
                return None
            best = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            self._free_bytes -= best.numel()
            self.reused += 1
            return best

    def give(self, tensors: list[torch.Tensor]) -> None:
        """Take back host tensors that nothing will read or write again (each storage once); beyond
        capacity, release the buffers given back longest ago. All at once, under the lock: added one by one, a
        storage given twice (a tensor and a view of it) could be taken by another thread between the two and then
        pooled again while in use."""
        buffers = {}
        for t in tensors:
            buffer = _whole_storage(t)
            if buffer is not None and buffer.numel() <= self.capacity:
                buffers.setdefault(buffer.data_ptr(), buffer)
        with self._lock:
            for ptr, buffer in buffers.items():
                if any(b.data_ptr() == ptr for b in self._free):
                    continue
                self._free.append(buffer)
                self._free_bytes += buffer.numel()
                while self._free_bytes > self.capacity:
                    self._free_bytes -= self._free.pop(0).numel()


def _whole_storage(t: torch.Tensor) -> torch.Tensor | None:
    """A flat uint8 tensor over all of t's storage; None for device tensors and empty storages."""
    storage = t.untyped_storage()
    if t.device.type != "cpu" or storage.nbytes() == 0:
        return None
    return torch.empty(0, dtype=torch.uint8).set_(storage)
