"""merge_engine: fast, streaming merges of neural-network checkpoints.

    from merge_engine import merge, MergeOptions
    merge("config.yml", "out/", MergeOptions(device="cuda"))

Low-level tensor ops (TIES, DARE, sign election, slerp, ...) live in `merge_engine.ops`.
"""
import os

# Large CPU tensors in transparent huge pages (torch's allocator reads this once, at its first large
# allocation): every tensor the engine reads or writes is fresh memory, and faulting it in 4 KB pages
# cost as much as the merge math itself (bench/RESULTS.md). An explicit setting by the user wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from merge_engine import ops  # noqa: E402
from merge_engine.config import MergeConfig, load_config, parse_config  # noqa: E402
from merge_engine.engine import MergeOptions, MergeReport, merge  # noqa: E402
from merge_engine.errors import CheckpointError, ConfigError, MergeEngineError, OutputError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "MergeConfig", "MergeEngineError", "MergeOptions", "MergeReport",
           "OutputError", "load_config", "merge", "ops", "parse_config"]
