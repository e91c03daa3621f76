"""Running one job over torch.distributed ranks: which rank this process is, which output shards it
writes, and the steps at whose end every rank learns whether all ranks succeeded (or all stop).

Control messages (plan digests, the temporary folder's path, each rank's status and figures) travel
over a gloo group, whatever the backend of the caller's group: a merge exchanges no tensor data, which
goes through the filesystem every rank shares. Nothing here initialises a process group except
torchrun_group, which only the command line uses, and only under torchrun.
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from merge_engine.errors import MergeEngineError, OutputError
from merge_engine.io.writer import LOCK_FILE, ShardedWriter
from merge_engine.runtime import launched_by_torchrun

# How long a rank waits at a step's end for the others: the longest a merge can be unbalanced, and how
# long the survivors of a killed rank wait when nothing else stops them (torchrun stops them at once).
STEP_TIMEOUT = timedelta(minutes=30)


# Seconds between the ranks' exchanges of progress (rank 0's bar) and failures (the others stop early).
PROGRESS_PERIOD = 1.0
RUNNING, FAILED, TERMINATED = 0, 1, 2  # a rank's state in the progress exchange


class RankFailed(MergeEngineError):
    """Another rank failed; this one stopped with it."""


class StoppedEarly(RankFailed):
    """This rank stopped in the middle of a step because another failed (which says why at the step's end)."""


@dataclass(frozen=True)
class Ranks:
    rank: int
    size: int
    local_rank: int
    host: str
    group: object  # the gloo ProcessGroup of control messages
    progress_group: object  # the gloo ProcessGroup of JobProgress' thread
    machines: tuple[int, ...]  # each rank's machine (hosts numbered in the order of their first rank)
    hosts: tuple[str, ...]  # each rank's host name

    @property
    def leader(self) -> bool:
        return self.rank == 0


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
            _groups.clear()  # no reference to a destroyed group outlives it (one destroyed at exit aborts)
            dist.destroy_process_group()


def _group_exists() -> bool:
    return dist.is_available() and dist.is_initialized()


_groups: dict[str, object] = {}  # the gloo groups made for the current process group (made once: a collective)
_cleared_at_exit: list[bool] = []  # whether _groups.clear is registered to run at exit (once a process)


def current_ranks() -> Ranks | None:
    """This process' place in the initialised process group; None without one, or with one rank.
    Collective: every rank of the group calls it at the same point (the first call makes gloo groups)."""
    if not _group_exists() or dist.get_world_size() < 2:
        return None
    if _groups.get("world") is not dist.group.WORLD:
        if not _cleared_at_exit:  # a group referenced here at the interpreter's teardown can abort it
            atexit.register(_groups.clear)
            _cleared_at_exit.append(True)
        gloo = dist.get_backend() == "gloo"
        _groups.update(world=dist.group.WORLD,
                       control=dist.group.WORLD if gloo else dist.new_group(backend="gloo", timeout=STEP_TIMEOUT),
                       progress=dist.new_group(backend="gloo", timeout=STEP_TIMEOUT))
        hosts: list = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname(), group=_groups["control"])
        _groups["hosts"] = tuple(hosts)
        _groups["machines"] = tuple(list(dict.fromkeys(hosts)).index(h) for h in hosts)
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 socket.gethostname(), _groups["control"], _groups["progress"], _groups["machines"],
                 _groups["hosts"])


def rank_device(device: torch.device, ranks: Ranks | None) -> torch.device:
    """Each rank's own GPU (cuda:LOCAL_RANK) when the device is CUDA without an index; with more ranks on a
    machine than GPUs, ranks share them (a merge holds a few tensors per rank)."""
    if ranks is not None and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ranks.local_rank % max(torch.cuda.device_count(), 1))
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
    re-raises its own error (or, if it only stopped early, the others'); the others raise RankFailed
    naming the rank, its host and its error. A rank that dies instead makes the others' exchange fail
    (or time out: STEP_TIMEOUT), unless torchrun stops them first. No-op without ranks."""
    if ranks is None:
        yield
        return
    try:
        yield
    except KeyboardInterrupt:  # every rank gets the interrupt: no one waits for the others
        raise
    except BaseException as e:
        try:
            statuses = gather(ranks, (ranks.host, _describe(e), isinstance(e, StoppedEarly)))
        except Exception:  # noqa: BLE001 (the others are gone too: this rank's own error says more)
            raise e from None
        if isinstance(e, StoppedEarly):
            _raise_failures(statuses, doing, e)
        raise
    try:
        statuses = gather(ranks, (ranks.host, None, False))
    except RuntimeError as e:  # gloo's "Connection closed by peer": a rank died (killed) during the step
        raise RankFailed(f"lost contact with the other ranks while {doing} (one was killed, crashed or did not answer "
                         f"in time: {e})") from e
    _raise_failures(statuses, doing)


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, MergeEngineError) else f"{type(e).__name__}: {e}"


def _raise_failures(statuses: list, doing: str, cause: BaseException | None = None) -> None:
    """RankFailed naming the ranks that failed (not those that only stopped because of them), if any."""
    failed = [(rank, host, error) for rank, (host, error, early) in enumerate(statuses) if error and not early]
    if failed:
        raise RankFailed("; ".join(f"rank {rank} ({host}) failed while {doing}: {error}"
                                   for rank, host, error in failed)) from cause


class JobProgress:
    """The job's bytes done over all ranks, and whether any rank has failed: a thread on every rank sums
    them (an all_reduce on a group of its own) every PROGRESS_PERIOD until every rank has ended. show(n)
    gets the job's bytes done (rank 0's progress bar); add() raises StoppedEarly once another rank has
    failed or was terminated (SIGTERM), naming it, or contact is lost (killed), so that no rank merges on for
    nothing; end() raises it where this rank's part was done by then. A terminated rank does not join the step's
    status exchange (every_rank), so this is where the others learn which it was."""

    def __init__(self, ranks: Ranks, show: Callable[[int], None]):
        self._ranks, self._show = ranks, show
        self._done = 0
        self._state = RUNNING
        self._ended = threading.Event()
        self._stop: str | None = None  # why this rank must stop
        self._stopped_by: str | None = None  # the rank that failed or was terminated, when one did
        self._thread = threading.Thread(target=self._exchange, name="me-progress", daemon=True)
        self._thread.start()

    def add(self, nbytes: int) -> None:
        self._done += nbytes
        if self._stop:
            raise StoppedEarly(self._stop)

    def end(self, failed: bool, terminated: bool = False) -> None:
        """This rank's part is over (failed, or terminated by SIGTERM); returns once every rank's is (or contact
        is lost)."""
        self._state = TERMINATED if terminated else FAILED if failed else RUNNING
        self._ended.set()
        self._thread.join()
        if self._stopped_by and not failed:  # this rank's part is done, but the job is not
            raise StoppedEarly(self._stopped_by)

    def _exchange(self) -> None:
        ranks = self._ranks
        try:
            while True:
                self._ended.wait(PROGRESS_PERIOD)
                state = torch.zeros(2 + ranks.size, dtype=torch.int64)  # bytes done, ranks ended, each one's state
                state[0], state[1], state[2 + ranks.rank] = self._done, self._ended.is_set(), self._state
                dist.all_reduce(state, group=ranks.progress_group)
                self._show(int(state[0]))
                stopped = [r for r in range(ranks.size) if state[2 + r] != RUNNING]
                if stopped and self._state == RUNNING:
                    r = stopped[0]
                    what = "was terminated (SIGTERM)" if state[2 + r] == TERMINATED else "failed"
                    self._stop = self._stopped_by = f"rank {r} ({ranks.hosts[r]}) {what}"
                if state[1] == ranks.size:
                    return
        except Exception as e:  # noqa: BLE001 (a rank died: this one stops; the step's end says more)
            self._stop = f"lost contact with the other ranks ({e})"


def own_items(items: Sequence, ranks: Ranks | None) -> list:
    """This rank's share of items (every size-th, from its rank on): each item goes to exactly one rank."""
    return list(items) if ranks is None else list(items[ranks.rank::ranks.size])


def sum_over_ranks(ranks: Ranks | None, tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor summed, in float64 whatever its dtype (so that only the order of the local sums
    differs from one process's), then cast back; the same result on every rank."""
    if ranks is None:
        return tensor
    wide = tensor.detach().to("cpu", torch.float64)
    dist.all_reduce(wide, group=ranks.group)
    return wide.to(tensor.device, tensor.dtype)


def sum_counts(ranks: Ranks | None, counts: dict[str, int]) -> dict[str, int]:
    """Every rank's counts summed, key by key (keys in the first rank's order, then the others')."""
    if ranks is None:
        return counts
    total: dict[str, int] = {}
    for rank_counts in gather(ranks, counts):
        for key, n in rank_counts.items():
            total[key] = total.get(key, 0) + n
    return total


def assign_shards(costs: Sequence[int], ranks: int, machines: Sequence[int] = ()) -> list[int]:
    """The rank that writes each shard: longest processing time first (each shard, costliest first, goes
    to the least loaded rank), deterministic (ties: lower shard index, then lower rank). Its largest
    load is at most 4/3 of the best possible, and within one shard of the mean. With machines (each
    rank's machine), the shards go to machines first by the same rule, on each machine's load per rank,
    then each machine's shards to its ranks: the ranks of a machine share its disk and network, so the
    busiest machine, not the busiest rank, bounds the job."""
    if len(set(machines)) in (0, 1, ranks):
        return _least_loaded_first(costs, [1] * ranks)
    rank_counts = [list(machines).count(m) for m in range(max(machines) + 1)]
    machine_of_shard = _least_loaded_first(costs, rank_counts)
    owner = [0] * len(costs)
    for machine, count in enumerate(rank_counts):
        shards = [s for s, m in enumerate(machine_of_shard) if m == machine]
        its_ranks = [r for r, m in enumerate(machines) if m == machine]
        for shard, local in zip(shards, _least_loaded_first([costs[s] for s in shards], [1] * count)):
            owner[shard] = its_ranks[local]
    return owner


def _least_loaded_first(costs: Sequence[int], widths: Sequence[int]) -> list[int]:
    """Each item, costliest first, to the bin of least load per unit of width (ties: lower index)."""
    loads = [0] * len(widths)
    owner = [0] * len(costs)
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        b = min(range(len(widths)), key=lambda j: (loads[j] / widths[j], j))
        owner[item] = b
        loads[b] += costs[item]
    return owner


def own_shards(ranks: Ranks | None, costs: Sequence[int]) -> list[int] | None:
    """The shards this rank writes (assign_shards); None, all of them, without ranks."""
    if ranks is None:
        return None
    return [shard for shard, rank in enumerate(assign_shards(costs, ranks.size, ranks.machines))
            if rank == ranks.rank]


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


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # a path's undecodable bytes, as the file system holds them


def _feed(h, x: object) -> None:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        h.update(_bytes(type(x).__name__))
        for f in dataclasses.fields(x):
            if f.repr:  # caches are not compared (repr=False)
                _feed(h, (f.name, getattr(x, f.name)))
    elif isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        h.update(_bytes(f"tensor {t.dtype} {list(t.shape)}"))
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
    elif hasattr(x, "path") and hasattr(x, "tensors"):  # a Checkpoint: the folder it reads (a LoRA one: and its adapter)
        h.update(_bytes(f"checkpoint {type(x).__name__} {getattr(x, 'reference', x.path)}"))
    else:  # numbers, strings, dtypes, None, enums; an object printed with its address is known by its type only
        text = repr(x)
        h.update(_bytes(type(x).__qualname__ if " at 0x" in text else text) + b";")


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
            "config, the same input folders and output folder, and run the same merge_engine version with the same "
            "options")


def check_same_device_type(ranks: Ranks | None, device: torch.device) -> None:
    """Refuse ranks that would compute on different device types (`--device auto` on a mix of GPU and CPU
    machines): CPU and GPU kernels may round differently, and one output would hold both's bits."""
    if ranks is None:
        return
    types = gather(ranks, device.type)
    differ = [rank for rank, kind in enumerate(types) if kind != types[0]]
    if differ:
        raise MergeEngineError(
            f"rank(s) {', '.join(map(str, differ))} would merge on another device type than rank 0's "
            f"({', '.join(f'rank {r}: {types[r]}' for r in [0, *differ])}): every rank must merge on the same kind "
            "of device (pass --device cpu, or run every rank on a GPU machine)")


def open_shared_writer(ranks: Ranks | None, make: Callable[[str | None], ShardedWriter]) -> ShardedWriter:
    """This rank's writer of one output: make(None) makes the temporary folder (rank 0, or a process
    alone), make(folder) joins it (the other ranks, once they have checked that they see it)."""
    if ranks is None:
        return make(None)
    made = None
    with every_rank(ranks, "making the temporary output folder"):
        made = make(None) if ranks.leader else None
    folder, leader_host = broadcast(ranks, (made.tmp_dir, ranks.host) if made else None)
    try:
        with every_rank(ranks, "opening the temporary output folder"):
            if not ranks.leader:
                check_folder_visible(ranks, folder, leader_host)
                made = make(folder)
    except BaseException:
        if made:
            made.abort()
        raise
    return made


def commit_shared_writer(ranks: Ranks | None, writer: ShardedWriter) -> None:
    """Once every rank has flushed its shards: rank 0 moves the folder into place, then the others let go."""
    with every_rank(ranks, "moving the output into place"):
        if writer.maker:
            writer.commit()
    if not writer.maker:
        writer.release()


def data_digest(model_dir: str, sequences: list[list[int]], options: object, out_dir: str) -> str:
    """The fingerprint of a statistics run (stats, fisher): the model, the tokenized data, the options
    (quiet, which only rank 0 is not, left out) and the output folder."""
    lengths = torch.tensor([len(s) for s in sequences])
    tokens = torch.tensor([t for s in sequences for t in s])
    return digest(os.path.abspath(model_dir), lengths, tokens, dataclasses.replace(options, quiet=False),
                  os.path.realpath(out_dir))


def check_folder_visible(ranks: Ranks, folder: str, leader_host: str) -> None:
    """A rank that cannot see the temporary folder rank 0 made writes nowhere useful: say why."""
    if not os.path.exists(os.path.join(folder, LOCK_FILE)):
        raise OutputError(f"rank {ranks.rank} on {ranks.host} cannot see {folder}, the temporary output folder "
                          f"rank 0 made on {leader_host}: the output folder must be on a filesystem every rank "
                          "shares (the same path on every machine)")
