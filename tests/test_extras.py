"""Optional dependencies: a missing one is a MissingExtraError naming the extra that installs it."""
import sys

import pytest

from merge_engine.errors import MergeEngineError
from merge_engine.extras import MissingExtraError, require


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
