"""Optional dependencies: a missing one is a MissingExtraError naming the extra that installs it."""
import os
import pathlib
import re
import sys
import weakref

import pytest

from merge_engine.errors import MergeEngineError
from merge_engine.extras import MissingExtraError, optuna_log_level, require, require_isolated


def test_an_installed_module_is_returned():
    assert require("json.decoder", "hf", "x").__name__ == "json.decoder"


def test_a_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(MissingExtraError, match=r'^lambda tuning needs optuna: pip install "merge_engine\[tune\]"$'):
        require("optuna", "tune", "lambda tuning")
    assert issubclass(MissingExtraError, MergeEngineError)


def test_a_submodule_of_a_missing_package(monkeypatch):
    """An already imported submodule does not hide its missing package."""
    pytest.importorskip("transformers.utils.logging")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match="needs transformers"):
        require("transformers.utils.logging", "hf", "quiet loading")


def test_bmm_tuning_without_optuna(monkeypatch):
    from merge_engine.tuning import tune_bmm
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(MissingExtraError, match=r'lambda tuning needs optuna: pip install "merge_engine\[tune\]"'):
        tune_bmm(None, lambda state: 0.0)


def test_the_demo_without_transformers_is_one_line(monkeypatch, tmp_path, capsys):
    from merge_engine import demo
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert demo.main([str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("merge_engine.demo: error: ") and "[hf]" in err, err


def extra_packages(extra: str) -> set[str]:
    """The packages pyproject.toml's extra installs (their import names, which these all share)."""
    tomllib = pytest.importorskip("tomllib")
    with open(pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
        requirements = tomllib.load(f)["project"]["optional-dependencies"][extra]
    return {re.match(r"[A-Za-z0-9_]+", r).group(0).lower() for r in requirements}


def test_the_tune_extra_is_enough_for_bmm_tuning(monkeypatch, tmp_path):
    """[tune] installs what BMM's lambda search needs (README): it runs with the other extras' packages
    missing. Its session's live model is a transformers model, which [tune] lacked."""
    from merge_engine.demo import make_synthetic_llama
    from merge_engine.tuning import BMMProblem, tune_bmm
    for package in (extra_packages("hf") | extra_packages("eval")) - extra_packages("tune"):
        monkeypatch.setitem(sys.modules, package, None)
    shape = dict(layers=1, hidden=32, intermediate=48, vocab=64)
    base = make_synthetic_llama(os.path.join(tmp_path, "base"), **shape)
    experts = [make_synthetic_llama(os.path.join(tmp_path, f"e{i}"), **shape, base=base, seed=i) for i in (1, 2)]
    config = {"merge_method": "bmm", "base_model": base, "parameters": {"data_free": True, "lambda": 1.0},
              "models": [{"model": e} for e in experts]}
    problem = BMMProblem(config, device="cpu", progress=False)
    result = tune_bmm(problem, lambda state: -float(state["model.layers.0.mlp.up_proj.weight"].norm()), n_trials=2)
    assert result.config["merge_method"] == "bmm"


# a package that keeps the ImportError of an optional dependency, as optuna keeps redis's for the life of the process
KEEPS_ITS_IMPORT_ERROR = """
try:
    import merge_engine_no_such_module
except ImportError as e:
    kept = e
"""


class Held:
    """Stands for what a caller holds while it first imports an optional package (a search's session)."""


def import_holding(importer, name: str) -> weakref.ref:
    held = Held()
    importer(name, "tune", "x")
    return weakref.ref(held)


@pytest.mark.parametrize("importer, freed", [(require, False), (require_isolated, True)])
def test_an_isolated_import_keeps_no_frame_of_its_callers(tmp_path, monkeypatch, importer, freed):
    """The traceback such a package keeps holds every frame on the stack at its first import: require_isolated
    imports it on a thread of its own, so the caller's locals are freed when it returns (require: kept for ever)."""
    name = f"keeps_import_error_{importer.__name__}"
    (tmp_path / f"{name}.py").write_text(KEEPS_ITS_IMPORT_ERROR)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    assert (import_holding(importer, name)() is None) == freed


def test_an_isolated_import_that_fails_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(MissingExtraError, match=r'^x needs optuna: pip install "merge_engine\[tune\]"$'):
        require_isolated("optuna", "tune", "x")
    with pytest.raises(MissingExtraError, match="x needs merge_engine_no_such_module"):
        require_isolated("merge_engine_no_such_module", "tune", "x")


def test_optuna_log_level_blocks_ending_out_of_order_restore_the_level_found():
    # before, each block put back the level it found: two searches in two threads, the first to start ending first,
    # left optuna at the second's level (WARNING) for good
    optuna = pytest.importorskip("optuna")
    found = optuna.logging.get_verbosity()
    first, second = optuna_log_level(optuna, optuna.logging.WARNING), optuna_log_level(optuna, optuna.logging.ERROR)
    try:
        first.__enter__()
        second.__enter__()
        assert optuna.logging.get_verbosity() == optuna.logging.ERROR
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)
        assert optuna.logging.get_verbosity() == found
    finally:
        optuna.logging.set_verbosity(found)
