"""Ranks for the distributed tests: torch.multiprocessing spawns them on this machine, each joins a gloo
group on a free port, runs a module-level function, and leaves what it saw in a JSON file per rank."""
from __future__ import annotations

import json
import os
import socket
import traceback
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = timedelta(seconds=60)  # a test's ranks exchange control messages only: a hang fails quickly


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, size: int, results: str, *args) -> list[dict]:
    """Run fn(rank, *args) on `size` ranks; return each rank's {"error": message or None, "type": ...,
    "value": what fn returned (JSON)}. An exception in fn is recorded, not raised."""
    os.makedirs(results, exist_ok=True)
    mp.spawn(_rank_main, args=(size, free_port(), fn, results, args), nprocs=size, join=True)
    return [json.load(open(os.path.join(results, f"rank{r}.json"))) for r in range(size)]


def _rank_main(rank: int, size: int, port: int, fn, results: str, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=TIMEOUT)
    outcome = {"error": None, "type": None, "value": None}
    try:
        outcome["value"] = fn(rank, *args)
    except Exception as e:  # noqa: BLE001 (recorded for the test to check)
        outcome.update(error=str(e), type=type(e).__name__, traceback=traceback.format_exc())
    finally:
        dist.destroy_process_group()
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
