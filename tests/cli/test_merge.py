"""The command line on bad input: a non-zero exit, one clear message that names the file (and the
tensor where there is one), and no output folder (nor any temporary leftovers)."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_engine.cli import main


def ties(base, experts, **params):
    return {"merge_method": "ties", "base_model": base, "dtype": "float32",
            "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.5, **params}} for e in experts]}


def clone(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def rewrite_tensor(folder, name, fn):
    """Apply fn to the dict of tensors of the single-file checkpoint in folder."""
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    fn(tensors, name)
    save_file(tensors, path, metadata={"format": "pt"})


def run_bad(config, write_yaml, tmp_path, capsys, *needles, extra=()):
    out = tmp_path / "out"
    code = main([write_yaml(config), str(out), "-q", *extra])
    err = capsys.readouterr().err
    assert code != 0
    assert "error" in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]
    return err


def test_missing_model_path(model_sets, write_yaml, tmp_path, capsys):
    base, e1, _, _ = model_sets("llama")
    missing = str(tmp_path / "no_such_model")
    run_bad(ties(base, [e1, missing]), write_yaml, tmp_path, capsys, missing, "does not exist")


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_header(model_sets, write_yaml, tmp_path, capsys, damage):
    base, e1, e2, _ = model_sets("llama")
    bad = clone(e2, tmp_path / "bad")
    path = os.path.join(bad, "model.safetensors")
    with open(path, "r+b") as f:
        if damage == "truncated":
            f.truncate(os.path.getsize(path) // 2)
        else:
            f.seek(8)
            f.write(b"\xff\xfe not json")
    run_bad(ties(base, [e1, bad]), write_yaml, tmp_path, capsys, path)


def test_shape_mismatch_names_tensor(model_sets, write_yaml, tmp_path, capsys):
    base, e1, e2, _ = model_sets("llama")
    bad = clone(e2, tmp_path / "bad")
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_tensor(bad, name, lambda ts, n: ts.__setitem__(n, ts[n][:-1].clone()))
    run_bad(ties(base, [e1, bad]), write_yaml, tmp_path, capsys, bad, name)


def test_missing_tensor_names_tensor(model_sets, write_yaml, tmp_path, capsys):
    base, e1, e2, _ = model_sets("llama")
    bad = clone(e2, tmp_path / "bad")
    name = "model.layers.2.self_attn.k_proj.weight"
    rewrite_tensor(bad, name, lambda ts, n: ts.pop(n))
    run_bad(ties(base, [e1, bad]), write_yaml, tmp_path, capsys, bad, name)


def test_unknown_method(model_sets, write_yaml, tmp_path, capsys):
    base, e1, _, _ = model_sets("llama")
    cfg = ties(base, [e1])
    cfg["merge_method"] = "tiez"
    run_bad(cfg, write_yaml, tmp_path, capsys, "tiez", "ties")


def test_a_negative_dare_density_is_refused(model_sets, write_yaml, tmp_path, capsys):
    base, e1, e2, _ = model_sets("llama")
    cfg = ties(base, [e1, e2], density=-0.5)
    cfg["merge_method"] = "dare_ties"
    run_bad(cfg, write_yaml, tmp_path, capsys, "density", "-0.5", "Bernoulli")


def test_non_numeric_weight(model_sets, write_yaml, tmp_path, capsys):
    base, e1, _, _ = model_sets("llama")
    cfg = ties(base, [e1])
    cfg["models"][0]["parameters"]["weight"] = "half"
    run_bad(cfg, write_yaml, tmp_path, capsys, "weight", "half", e1)


def test_existing_output_is_not_touched(model_sets, write_yaml, tmp_path, capsys):
    base, e1, _, _ = model_sets("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = main([write_yaml(ties(base, [e1])), str(out), "-q"])
    assert code != 0 and "--overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["notes.txt"]


def test_all_problems_reported_together(model_sets, write_yaml, tmp_path, capsys):
    base, e1, e2, _ = model_sets("llama")
    bad = clone(e2, tmp_path / "bad")
    names = ["model.layers.0.mlp.down_proj.weight", "model.norm.weight"]
    for n in names:
        rewrite_tensor(bad, n, lambda ts, n: ts.__setitem__(n, torch.zeros(3)))
    missing = str(tmp_path / "gone")
    run_bad(ties(base, [e1, missing]), write_yaml, tmp_path, capsys, missing)
    run_bad(ties(base, [e1, bad]), write_yaml, tmp_path, capsys, *names)
