"""Optional dependencies, imported where a feature needs them: a missing one is a one-line error naming
the extra that installs it (pyproject.toml's [project.optional-dependencies]), not a traceback."""
from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from types import ModuleType

from merge_engine.errors import MergeEngineError

# transformers builds a model with process-wide settings changed, putting back what it found once done: torch's
# default dtype (set to the model's) and torch.nn.init's functions (no-ops where the weights are filled afterwards).
# Two models built at once in two threads put back each other's settings: the process keeps the model's dtype as
# its default and no weight initialisation. Held wherever merge_engine builds one.
BUILDING_TRANSFORMERS_MODEL = threading.Lock()


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


def require_isolated(module: str, extra: str, what: str) -> ModuleType:
    """require(), the module imported the first time in a thread of its own: a package that keeps the traceback of
    an optional import that failed (optuna: its redis backend, for the life of the process) keeps every frame on the
    stack at that import, and with them the callers' locals (a search's session, its inputs and live model)."""
    if module not in sys.modules:
        importer = threading.Thread(target=_import_quietly, args=(module,), name="me-import")
        importer.start()
        importer.join()
    return require(module, extra, what)


def _import_quietly(module: str) -> None:
    with contextlib.suppress(Exception):  # (require imports it again, in the caller's thread, to report a failure)
        importlib.import_module(module)


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
