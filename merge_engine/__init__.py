"""merge_engine: fast, streaming merges of neural-network checkpoints.

    from merge_engine import merge, MergeOptions
    merge("config.yml", "out/", MergeOptions(device="cuda"))

Low-level tensor ops (TIES, DARE, sign election, slerp, ...) live in `merge_engine.ops`.
"""
from merge_engine import ops
from merge_engine.config import MergeConfig, load_config, parse_config
from merge_engine.engine import MergeOptions, MergeReport, merge
from merge_engine.errors import CheckpointError, ConfigError, MergeEngineError, OutputError

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "MergeConfig", "MergeEngineError", "MergeOptions", "MergeReport",
           "OutputError", "load_config", "merge", "ops", "parse_config"]
