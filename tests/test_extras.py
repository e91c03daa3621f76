"""Optional dependencies: a missing one is a MissingExtraError naming the extra that installs it."""
import os
import pathlib
import re
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
