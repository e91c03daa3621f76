"""The demo's model makers, which callers run in their own processes (docs/search.md), and the demo's output folder."""
import os
import tempfile
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


def test_the_demo_keeps_a_folder_holding_the_users_files(tmp_path, capsys):
    # it merged with overwrite=True: `tools/demo.sh ~/work` replaced ~/work, files and all
    from merge_engine.demo import main
    (tmp_path / "notes.txt").write_text("mine")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"merge_engine.demo: error: {tmp_path}: the folder holds other files than an earlier demo's output; " \
                  "name a new or empty folder\n"
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.slow  # generates checkpoints
def test_a_rerun_of_the_demo_replaces_its_earlier_output(tmp_path):
    from merge_engine.demo import WORK_PREFIX, main
    out = tmp_path / "demo_out"
    out.mkdir()
    (out / "mergekit_config.yml").write_text(f"base_model: {tempfile.gettempdir()}/{WORK_PREFIX}x1y2z3/llama-base\n")
    (out / "model.safetensors").write_bytes(b"an earlier demo's")
    assert main([str(out)]) == 0
    assert "model.safetensors" not in os.listdir(out) and "model.safetensors.index.json" in os.listdir(out)
