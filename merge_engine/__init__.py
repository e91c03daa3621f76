"""merge_engine: fast, streaming merges of neural-network checkpoints.

    from merge_engine import merge, MergeOptions
    merge("config.yml", "out/", MergeOptions(device="cuda"))

Models and tensors already in memory merge with `merge_state_dicts` and `merge_tensors` (mergekit 0.1.5's Python
API). Low-level tensor ops (TIES, DARE, sign election, slerp, ...) live in `merge_engine.ops`.

Importing the package changes nothing process-wide. Processes that exist to merge can opt into two
process-wide memory settings with `tune_process_for_merging()` (the `merge-engine` command does). The
names below are loaded on first use (PEP 562), so that importing merge_engine (or merge_engine.cli,
merge_engine.runtime) allocates no tensor: torch reads its huge-page setting at its first CPU
allocation, and the opt-in must come before it to take effect.
"""
import importlib

__version__ = "0.1.0"
_EXPORTS = {"MergeConfig": "config", "load_config": "config", "parse_config": "config",
            "MergeOptions": "engine", "MergeReport": "engine", "merge": "engine", "MergeSession": "session",
            "CheckpointError": "errors", "ConfigError": "errors", "MergeEngineError": "errors", "OutputError": "errors",
            "build_moe": "moe", "transplant_tokenizer": "tokensurgeon",
            "merge_state_dicts": "in_memory", "merge_tensors": "in_memory", "PerGroupValues": "in_memory",
            "tune_process_for_merging": "runtime"}
__all__ = sorted([*_EXPORTS, "ops"])


def __getattr__(name: str):
    if name == "ops":
        return importlib.import_module("merge_engine.ops")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'merge_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"merge_engine.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
