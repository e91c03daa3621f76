"""The demo's model makers, which callers run in their own processes (docs/search.md)."""
from pathlib import Path

import pytest
import torch

from merge_engine.demo import make_models

pytest.importorskip("transformers")


def _file_bytes(folder: str) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in Path(folder).glob("*.safetensors")}


def test_make_models_leaves_the_callers_random_stream_as_it_was(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = make_models(str(tmp_path / "a"), n_experts=1, layers=1, seed=5)
    assert torch.equal(torch.rand(3), expected), "make_models reseeded or drew from the global generator"
    second = make_models(str(tmp_path / "b"), n_experts=1, layers=1, seed=5)  # the global stream has moved on
    assert [_file_bytes(a) for a in first] == [_file_bytes(b) for b in second]


def test_the_demos_usage_names_how_it_is_run(capsys):
    from merge_engine.demo import main
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m merge_engine.demo")
