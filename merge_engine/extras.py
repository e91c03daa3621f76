"""Optional dependencies, imported where a feature needs them: a missing one is a one-line error naming
the extra that installs it (pyproject.toml's [project.optional-dependencies]), not a traceback."""
from __future__ import annotations

import contextlib
import importlib
from types import ModuleType

from merge_engine.errors import MergeEngineError


class MissingExtraError(MergeEngineError):
    """An optional package a feature needs is not installed."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import module (e.g. 'transformers' or 'transformers.utils.logging'), or raise MissingExtraError:
    '<what> needs <package>: pip install "merge_engine[<extra>]"'."""
    package = module.partition(".")[0]
    try:
        importlib.import_module(package)  # first: a submodule already imported would hide a missing package
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f'{what} needs {package}: pip install "merge_engine[{extra}]"') from e


@contextlib.contextmanager
def optuna_log_level(optuna: ModuleType, level: int | None):
    """optuna's log level (process-wide) set to level for a block, then restored (None: left as it is)."""
    previous = optuna.logging.get_verbosity()
    if level is not None:
        optuna.logging.set_verbosity(level)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)
