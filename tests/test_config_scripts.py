"""merge_engine/config_scripts.py and `merge-engine legacy|layershuffle|bakllama`: the configs mergekit-legacy,
mergekit-layershuffle and bakllama write, merged as mergekit merges them."""
from __future__ import annotations

import os
import random
import subprocess

import pytest
import torch
import yaml

from merge_engine.cli import main
from merge_engine.config_scripts import bakllama_config, layershuffle_config
from merge_engine.errors import ConfigError
from tests.conftest import find_mergekit


def _mergekit_tool(name: str) -> str:
    mergekit = find_mergekit()
    if mergekit is None:
        pytest.skip("mergekit is not installed (set MERGEKIT_YAML or run tools/test.sh with MERGEKIT=1)")
    return os.path.join(os.path.dirname(mergekit), name)


def _assert_same_folders(ours, theirs, folder_tensors) -> None:
    a, b = folder_tensors(ours), folder_tensors(theirs)
    assert sorted(a) == sorted(b)
    for name, t in b.items():
        assert a[name].dtype == t.dtype and torch.equal(a[name], t), name


@pytest.mark.parametrize("flags", [
    ["--density", "0.5", "--weight", "0.3", "--weight", "0.6"],  # ties: base appended, density for all three
    ["--method", "linear", "--weight", "0.5", "--weight", "0.7", "--weight", "0.2", "--no-normalize", "--bf16"],
    ["--method", "ties", "--density", "0.4", "--weight", "0.5", "--naive-count", "--int8-mask"],
    ["--method", "slerp", "--weight", "0.3"],
], ids=["ties", "linear-unnormalized-bf16", "ties-count", "slerp"])
def test_legacy_is_mergekit_legacy(flags, model_sets, tmp_path, folder_tensors):
    base, e1, e2, _ = model_sets("llama")
    models = ["--merge", e1] + (["--merge", e2] if "slerp" not in flags else [])
    argv = [*models, "--base-model", base, *flags]
    subprocess.run([_mergekit_tool("mergekit-legacy"), str(tmp_path / "theirs"), *argv], check=True,
                   capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES=""))
    assert main(["legacy", str(tmp_path / "ours"), *argv, "-q", "--device", "cpu"]) == 0
    _assert_same_folders(tmp_path / "ours", tmp_path / "theirs", folder_tensors)


@pytest.mark.parametrize("flags, match", [(["--method", "slerp", "--weight", "0.3", "--weight", "0.5"], "exactly one"),
                                          (["--density", "0.1", "--density", "0.2", "--density", "0.3",
                                            "--density", "0.4"], "4 --density values for 3 models")])
def test_legacy_refuses_values_it_cannot_place(flags, match, model_sets, tmp_path, capsys):
    base, e1, e2, _ = model_sets("llama")
    assert main(["legacy", str(tmp_path / "out"), "--merge", e1, "--merge", e2, "--base-model", base, *flags]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_layershuffle_merges_the_config_it_writes_as_mergekit_merges_it(model_sets, tmp_path, mergekit,
                                                                       folder_tensors):
    """(mergekit 0.1.5's layershuffle itself fails: it asks its architecture object for a method it lacks.)"""
    _, e1, e2, _ = model_sets("llama")
    config = tmp_path / "shuffle.yml"
    assert main(["layershuffle", str(tmp_path / "ours"), "-m", e1, "-m", e2, "--full-random", "-w", "0.5", "-w", "1",
                 "--random-seed", "7", "--write-yaml", str(config), "-q", "--device", "cpu"]) == 0
    mergekit(str(config), str(tmp_path / "theirs"))
    _assert_same_folders(tmp_path / "ours", tmp_path / "theirs", folder_tensors)


@pytest.mark.parametrize("full_random", [False, True])
def test_layershuffle_draws_follow_the_seed_and_cover_the_stack(full_random):
    models, layers = ["a", "b", "c"], {"a": 8, "b": 6, "c": 10}
    weights = [0.5, 1.0, 0.3]
    configs = [layershuffle_config(models, layers, weights, full_random, rng=random.Random(seed))
               for seed in (4, 4, 5)]
    assert configs[0] == configs[1] and configs[0] != configs[2]
    sources = [s["sources"][0] for s in configs[0]["slices"]]
    assert all(src["model"] in models for src in sources)
    if full_random:  # int(layers * weight) one-layer slices per model, each among its first that many
        for m, w in zip(models, weights):
            count = int(layers[m] * w)
            mine = [src["layer_range"] for src in sources if src["model"] == m]
            assert len(mine) == count and all(r[1] == r[0] + 1 and 0 <= r[0] < count for r in mine)
    else:  # the first model's positions in order, consecutive slices from different models
        ranges = [src["layer_range"] for src in sources]
        assert [r[0] for r in ranges] == [0] + [r[1] for r in ranges[:-1]] and ranges[-1][1] == 8
        assert all(x["model"] != y["model"] for x, y in zip(sources, sources[1:]))


@pytest.mark.parametrize("weights, full_random, match", [([0, 0], False, "sum must be positive"),
                                                        ([1, -1], False, "negative"), ([1.5, 1], True, "between 0 and 1"),
                                                        ([1], False, "1 --weight values for 2 models")])
def test_layershuffle_refuses_weights_it_cannot_draw_by(weights, full_random, match):
    with pytest.raises(ConfigError, match=match):
        layershuffle_config(["a", "b"], {"a": 4, "b": 4}, weights, full_random)


def test_layershuffle_dry_run_writes_the_config_only(model_sets, tmp_path):
    _, e1, e2, _ = model_sets("llama")
    config = tmp_path / "shuffle.yml"
    assert main(["layershuffle", str(tmp_path / "out"), "-m", e1, "-m", e2, "--random-seed", "2", "--dry-run",
                 "--write-yaml", str(config)]) == 0
    assert not (tmp_path / "out").exists()
    assert yaml.safe_load(config.read_text())["merge_method"] == "passthrough"


def test_bakllama_stacks_slices_as_mergekit_merges_the_same_slices(model_sets, tmp_path, mergekit, folder_tensors):
    """mergekit 0.1.5's bakllama fails (it builds slices its schema refuses): its intended config, merged by
    mergekit-yaml, is the reference; the scale applies to down_proj alone."""
    base, e1, _, _ = model_sets("llama")
    text = yaml.safe_dump({"layer_slices": [{"model": base, "start": 0, "end": 2},
                                            {"model": e1, "start": 1, "end": 4, "scale": 0.5}]})
    (tmp_path / "bak.yml").write_text(text)
    (tmp_path / "theirs.yml").write_text(yaml.safe_dump(bakllama_config(text)))
    mergekit(str(tmp_path / "theirs.yml"), str(tmp_path / "theirs"))
    assert main(["bakllama", str(tmp_path / "bak.yml"), str(tmp_path / "ours"), "-q", "--device", "cpu"]) == 0
    _assert_same_folders(tmp_path / "ours", tmp_path / "theirs", folder_tensors)
    ours, source = folder_tensors(tmp_path / "ours"), folder_tensors(e1)
    assert torch.equal(ours["model.layers.2.mlp.down_proj.weight"], source["model.layers.1.mlp.down_proj.weight"] * 0.5)
    assert torch.equal(ours["model.layers.2.mlp.up_proj.weight"], source["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.parametrize("raw, match", [({"layer_slices": []}, "non-empty list"),
                                        ({"layer_slices": [{"model": "m", "start": 0}]}, r"layer_slices\[0\]"),
                                        ({"layer_slices": [{"model": "m", "start": 0, "end": 1, "scale": "x"}]},
                                         "scale must be a number")])
def test_bad_bakllama_files_are_named(raw, match):
    with pytest.raises(ConfigError, match=match):
        bakllama_config(yaml.safe_dump(raw), source="bak.yml")
