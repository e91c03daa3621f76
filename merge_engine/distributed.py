"""Running one job over torch.distributed ranks: which rank this process is, which output shards it
writes, and the steps at whose end every rank learns whether all ranks succeeded (or all stop).

Control messages (plan digests, the temporary folder's path, each rank's status and figures) travel
over a gloo group, whatever the backend of the caller's group: a merge exchanges no tensor data, which
goes through the filesystem every rank shares. Nothing here initialises a process group except
torchrun_group, which only the command line uses, and only under torchrun.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from merge_engine.errors import MergeEngineError, OutputError

# How long a rank waits at a step's end for the others: the longest a merge can be unbalanced, and how
# long the survivors of a killed rank wait when nothing else stops them (torchrun stops them at once).
STEP_TIMEOUT = timedelta(minutes=30)


class RankFailed(MergeEngineError):
    """Another rank failed; this one stopped with it."""


@dataclass(frozen=True)
class Ranks:
    rank: int
    size: int
    local_rank: int
    host: str
    group: object  # the gloo ProcessGroup of control messages

    @property
    def leader(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def torchrun_group() -> Iterator[bool]:
    """The command line's process group: joined, for the duration, when torchrun started this process
    (RANK, WORLD_SIZE, MASTER_ADDR... set) and none exists yet. gloo, as the ranks exchange only control
    messages. Yields whether this process is rank 0 (or alone)."""
    made = launched_by_torchrun() and not _group_exists()
    if made:
        dist.init_process_group("gloo", timeout=STEP_TIMEOUT)
    try:
        yield not _group_exists() or dist.get_rank() == 0
    finally:
        if made:
            dist.destroy_process_group()


def _group_exists() -> bool:
    return dist.is_available() and dist.is_initialized()


def current_ranks() -> Ranks | None:
    """This process' place in the initialised process group; None without one, or with one rank.
    Collective: every rank of the group calls it at the same point (it may make the gloo group)."""
    if not _group_exists() or dist.get_world_size() < 2:
        return None
    group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=STEP_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 socket.gethostname(), group)


def rank_device(device: torch.device, ranks: Ranks | None) -> torch.device:
    """Each rank's own GPU (cuda:LOCAL_RANK) when the device is CUDA without an index."""
    if ranks is not None and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ranks.local_rank)
    return device


def gather(ranks: Ranks, value: object) -> list:
    """Every rank's value, in rank order, on every rank."""
    values: list = [None] * ranks.size
    dist.all_gather_object(values, value, group=ranks.group)
    return values


def broadcast(ranks: Ranks, value: object) -> object:
    """Rank 0's value, on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=ranks.group)
    return box[0]


@contextmanager
def every_rank(ranks: Ranks | None, doing: str) -> Iterator[None]:
    """Run a step on every rank; at its end the ranks exchange their status. A rank whose step raised
    re-raises its own error; the others raise RankFailed naming the rank, its host and its error. A rank
    that dies instead makes the others' exchange time out (STEP_TIMEOUT), unless torchrun stops them first.
    No-op without ranks."""
    if ranks is None:
        yield
        return
    try:
        yield
    except KeyboardInterrupt:  # every rank gets the interrupt: no one waits for the others
        raise
    except BaseException as e:
        try:
            gather(ranks, (ranks.host, f"{type(e).__name__}: {e}" if not isinstance(e, MergeEngineError) else str(e)))
        except Exception:  # noqa: BLE001 (the others are gone too: this rank's own error says more)
            pass
        raise
    statuses = gather(ranks, (ranks.host, None))
    failed = [(rank, host, error) for rank, (host, error) in enumerate(statuses) if error is not None]
    if failed:
        raise RankFailed("; ".join(f"rank {rank} ({host}) failed while {doing}: {error}"
                                   for rank, host, error in failed))


def assign_shards(costs: Sequence[int], ranks: int) -> list[int]:
    """The rank that writes each shard: longest processing time first (each shard, costliest first, goes
    to the least loaded rank), deterministic (ties: lower shard index, then lower rank). Its largest
    load is at most 4/3 of the best possible, and within one shard of the mean."""
    loads = [0] * ranks
    owner = [0] * len(costs)
    for shard in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        owner[shard] = rank
        loads[rank] += costs[shard]
    return owner


def balance(costs: Sequence[int], owner: Sequence[int], ranks: int) -> float:
    """The largest rank's load over the mean load (1.0: perfect)."""
    loads = [0] * ranks
    for cost, rank in zip(costs, owner):
        loads[rank] += cost
    return max(loads) / max(sum(loads) / ranks, 1e-9)


def digest(*parts: object) -> str:
    """A hash of plain data (dataclasses, containers, tensors, dtypes, numbers, strings) that is the same
    in every process that built the same data: the plan check's fingerprint."""
    h = hashlib.sha256()
    _feed(h, parts)
    return h.hexdigest()


def _feed(h, x: object) -> None:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        h.update(type(x).__name__.encode())
        for f in dataclasses.fields(x):
            if f.repr:  # caches are not compared (repr=False)
                _feed(h, (f.name, getattr(x, f.name)))
    elif isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {list(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(x, dict):
        h.update(b"{")
        for k, v in x.items():
            _feed(h, (k, v))
        h.update(b"}")
    elif isinstance(x, (list, tuple)):
        h.update(b"(")
        for v in x:
            _feed(h, v)
        h.update(b")")
    elif hasattr(x, "path") and hasattr(x, "tensors"):  # a Checkpoint: the folder it reads
        h.update(f"checkpoint {x.path}".encode())
    else:  # numbers, strings, dtypes, None, enums; an object printed with its address is known by its type only
        text = repr(x)
        h.update((type(x).__qualname__ if " at 0x" in text else text).encode() + b";")


def check_same_plan(ranks: Ranks | None, fingerprint: str) -> None:
    """Refuse to go on unless every rank planned the same job (rank 0 compares the fingerprints)."""
    if ranks is None:
        return
    fingerprints = gather(ranks, fingerprint)
    differ = [rank for rank, f in enumerate(fingerprints) if f != fingerprints[0]]
    if differ:
        raise MergeEngineError(
            f"rank(s) {', '.join(map(str, differ))} planned a different job from rank 0's (plan digests "
            f"{', '.join(f'{r}: {fingerprints[r][:12]}' for r in [0, *differ])}): every rank must see the same "
            "config, the same input folders and run the same merge_engine version with the same options")


def check_folder_visible(ranks: Ranks, folder: str, marker: str, leader_host: str) -> None:
    """A rank that cannot see the temporary folder rank 0 made writes nowhere useful: say why."""
    if not os.path.exists(os.path.join(folder, marker)):
        raise OutputError(f"rank {ranks.rank} on {ranks.host} cannot see {folder}, the temporary output folder "
                          f"rank 0 made on {leader_host}: the output folder must be on a filesystem every rank "
                          "shares (the same path on every machine)")
