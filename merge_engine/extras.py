"""Optional dependencies, imported where a feature needs them: a missing one is a one-line error naming
the extra that installs it (pyproject.toml's [project.optional-dependencies]), not a traceback."""
from __future__ import annotations

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
