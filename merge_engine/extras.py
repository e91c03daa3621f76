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


def transformers_config_errors() -> tuple[type[Exception], ...]:
    """What transformers raises on a config.json it cannot take, read or built into a model: huggingface_hub's
    validation of a config's values (a head count not dividing the width, for one) raises an error that is no
    ValueError; a value of the wrong type, or 0 heads, fails in transformers' own arithmetic."""
    import huggingface_hub.errors
    return (OSError, ValueError, KeyError, TypeError, ZeroDivisionError,
            getattr(huggingface_hub.errors, "StrictDataclassError", ValueError))


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


class _SharedSetting:
    """A process-wide setting that blocks in several threads set at once (two searches), ending in any order: the
    value the first block found is put back when the last one ends (each putting back what it found would leave the
    value of the block that ended first, for good)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._blocks = 0
        self._found = None

    @contextlib.contextmanager
    def set_to(self, value, get, put):
        with self._lock:
            if not self._blocks:
                self._found = get()
            self._blocks += 1
            put(value)
        try:
            yield
        finally:
            with self._lock:
                self._blocks -= 1
                if not self._blocks:
                    put(self._found)


_OPTUNA_LOG_LEVEL = _SharedSetting()


def optuna_log_level(optuna: ModuleType, level: int | None):
    """optuna's log level (process-wide) set to level for a block, then restored (None: left as it is)."""
    if level is None:
        return contextlib.nullcontext()
    return _OPTUNA_LOG_LEVEL.set_to(level, optuna.logging.get_verbosity, optuna.logging.set_verbosity)
