"""merge_engine: fast, streaming merges of neural-network checkpoints.

    from merge_engine import merge, MergeOptions
    merge("config.yml", "out/", MergeOptions(device="cuda"))

Low-level tensor ops (TIES, DARE, sign election, slerp, ...) live in `merge_engine.ops`.

Importing the package changes nothing process-wide. Processes that exist to merge can opt into two
process-wide memory settings with `tune_process_for_merging()` (the `merge-engine` command does).
"""
from merge_engine import ops
from merge_engine.config import MergeConfig, load_config, parse_config
from merge_engine.engine import MergeOptions, MergeReport, merge
from merge_engine.errors import CheckpointError, ConfigError, MergeEngineError, OutputError
from merge_engine.runtime import tune_process_for_merging

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "MergeConfig", "MergeEngineError", "MergeOptions", "MergeReport",
           "OutputError", "load_config", "merge", "ops", "parse_config", "tune_process_for_merging"]
