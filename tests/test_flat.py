"""merge_engine/flat.py: merges of raw weight files (mergekit-pytorch's configs): parity with mergekit-pytorch,
what a tensor some files lack gets, and refusals before anything is written."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merge_engine import MergeOptions
from merge_engine.errors import CheckpointError, ConfigError, OutputError
from merge_engine.flat import flat_merge, parse_flat_config
from tests.conftest import find_mergekit


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """base.safetensors and three fine-tunes of it (base + noise): m0 a torch.save file, m2 with one tensor more.
    Shapes of a diffusion model's (a 4-D convolution), a counter that is not floating point, a 0-d scale and a
    tensor of 0 elements."""
    root = tmp_path_factory.mktemp("flat")
    g = torch.Generator().manual_seed(0)
    base = {"down.0.weight": torch.randn(17, 9, generator=g), "down.0.bias": torch.randn(17, generator=g),
            "unet.conv.weight": torch.randn(4, 3, 3, 3, generator=g), "steps": torch.tensor([3, 4]),
            "scale": torch.tensor(0.5), "empty": torch.zeros(0, 4)}
    save_file(base, str(root / "base.safetensors"))
    paths = {"base": str(root / "base.safetensors")}
    for i in range(3):
        tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in base.items()}
        if i == 2:
            tuned["extra.weight"] = torch.randn(3, 5, generator=g)
        paths[f"m{i}"] = str(root / (f"m{i}.bin" if i == 0 else f"m{i}.safetensors"))
        torch.save(tuned, paths[f"m{i}"]) if i == 0 else save_file(tuned, paths[f"m{i}"])
    return paths


def ties_config(files, models=("m0", "m1", "m2")) -> dict:
    return {"merge_method": "ties", "base_model": files["base"], "dtype": "float32",
            "parameters": {"density": [0.5, 0.9], "weight": 0.5},
            "models": [{"model": files[m], "parameters": {"weight": [0.3 + 0.1 * i, 1.0]}}
                       for i, m in enumerate(models)]}


def linear_config(files) -> dict:
    return {"merge_method": "linear", "dtype": "bfloat16",
            "models": [{"model": files["m1"], "parameters": {"weight": 1}},
                       {"model": files["m2"], "parameters": {"weight": [0.5, 0.2]}}]}


def model_stock_config(files) -> dict:
    return {"merge_method": "model_stock", "base_model": files["base"], "parameters": {"filter_wise": True},
            "models": [{"model": files[m]} for m in ("m0", "m1")]}


@pytest.mark.parametrize("config, flag", [(ties_config, "-i"), (linear_config, "-i"), (linear_config, "-u"),
                                          (model_stock_config, "-i")])
def test_identical_to_mergekit_pytorch(config, flag, weight_files, tmp_path):
    """The same tensors as mergekit-pytorch's (parameters at t = 0: each gradient's first value), for a pickled and
    safetensors inputs, with the tensor one file alone holds skipped (-i) or merged from it alone (-u)."""
    mergekit = find_mergekit()
    if mergekit is None:
        pytest.skip("mergekit is not installed (set MERGEKIT_YAML or run tools/test.sh with MERGEKIT=1)")
    path = tmp_path / "flat.yml"
    path.write_text(yaml.safe_dump(config(weight_files)))
    subprocess.run([os.path.join(os.path.dirname(mergekit), "mergekit-pytorch"), str(path), str(tmp_path / "theirs"),
                    flag], check=True, capture_output=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    from merge_engine.cli import main
    assert main(["pytorch", str(path), str(tmp_path / "ours"), flag, "-q"]) == 0
    ours, theirs = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ours", "theirs"))
    assert sorted(ours) == sorted(theirs) and ("extra.weight" in ours) == (flag == "-u")
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name


def test_model_stock_filter_wise_merges_a_0d_tensor_as_one_row(weight_files, tmp_path):
    """A 0-d tensor is one filter: filter_wise gives what the whole-tensor cosine gives (it failed mid-merge)."""
    rows = flat_merge(model_stock_config(weight_files), tmp_path / "rows", MergeOptions(quiet=True), "intersection")
    whole = model_stock_config(weight_files)
    whole["parameters"]["filter_wise"] = False
    flat_merge(whole, tmp_path / "whole", MergeOptions(quiet=True), "intersection")
    by_row, by_whole = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("rows", "whole"))
    assert rows.tensors == 6 and by_row["scale"].shape == () and torch.equal(by_row["scale"], by_whole["scale"])


def test_union_merges_a_tensor_from_the_files_that_hold_it(weight_files, tmp_path):
    flat_merge(linear_config(weight_files), tmp_path / "out", MergeOptions(quiet=True), missing="union")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    m1, m2 = load_file(weight_files["m1"]), load_file(weight_files["m2"])
    assert torch.equal(out["extra.weight"], m2["extra.weight"].bfloat16())  # one input: itself
    # weights at t = 0: 1 and 0.5, normalised (linear's default)
    want = ((m1["down.0.weight"].bfloat16().float() + 0.5 * m2["down.0.weight"].bfloat16().float()) / 1.5)
    assert torch.allclose(out["down.0.weight"].float(), want, atol=1e-2)
    assert torch.equal(out["steps"], m1["steps"])


def test_multislerp_of_three_merges_a_tensor_of_0_elements(weight_files, tmp_path):
    """Nothing to interpolate is not antipodal inputs (mergekit 0.1.5 fails on it, saying so): an empty result."""
    config = {"merge_method": "multislerp", "parameters": {"weight": 1.0},
              "models": [{"model": weight_files[m]} for m in ("m0", "m1", "m2")]}
    flat_merge(config, tmp_path / "out", MergeOptions(quiet=True), missing="intersection")
    empty = load_file(str(tmp_path / "out" / "model.safetensors"))["empty"]
    assert empty.shape == (0, 4) and empty.dtype == torch.float32


def test_a_tensor_some_files_lack_is_refused_by_default_naming_them(weight_files, tmp_path):
    with pytest.raises(ConfigError, match=r"tensor 'extra.weight' is missing from .*m1.safetensors"):
        flat_merge(linear_config(weight_files), tmp_path / "out", MergeOptions(quiet=True))
    with pytest.raises(ConfigError, match="lacks tensors that .*hold \\('extra.weight' first.*ties needs the base's"):
        flat_merge(ties_config(weight_files), tmp_path / "out", MergeOptions(quiet=True), missing="union")
    nuslerp = {"merge_method": "nuslerp", "parameters": {"weight": 0.5},
               "models": [{"model": weight_files["m1"]}, {"model": weight_files["m2"]}]}
    with pytest.raises(ConfigError, match=r"tensors only .*m2.safetensors hold \('extra.weight' first\): .*needs "
                                          r"exactly 2 .*got 1 \(--tensor-intersection skips them\)"):
        flat_merge(nuslerp, tmp_path / "out", MergeOptions(quiet=True), missing="union")
    assert not (tmp_path / "out").exists()


def test_config_and_file_problems_are_named(weight_files, tmp_path):
    with pytest.raises(ConfigError, match="slices: not a key of mergekit-pytorch's configs"):
        parse_flat_config({**linear_config(weight_files), "slices": []})
    with pytest.raises(ConfigError, match="models: expected a list"):
        parse_flat_config({"merge_method": "linear"})
    def two(first: str) -> dict:
        return {**linear_config(weight_files), "parameters": {"weight": 1.0},
                "models": [{"model": first}, {"model": weight_files["m1"]}]}
    folder = two(str(tmp_path))
    with pytest.raises(ConfigError, match="expected a weight file"):
        flat_merge(folder, tmp_path / "out", MergeOptions(quiet=True))
    shapes = tmp_path / "other.safetensors"
    save_file({"down.0.weight": torch.zeros(3, 3)}, str(shapes))
    mismatch = r"m1.safetensors: tensor 'down.0.weight' has shape \[17, 9\] but .*other.safetensors has \[3, 3\]"
    with pytest.raises(ConfigError, match=mismatch):
        flat_merge(two(str(shapes)), tmp_path / "out", MergeOptions(quiet=True), missing="intersection")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises((ConfigError, CheckpointError), match="broken.safetensors"):
        flat_merge(two(str(broken)), tmp_path / "out", MergeOptions(quiet=True))
    assert not (tmp_path / "out").exists()


def test_a_fifo_or_a_symlink_loop_is_named_for_what_it_is(weight_files, tmp_path):
    """Neither is opened (a FIFO would block the read) and neither is called a folder or a missing file."""
    os.mkfifo(tmp_path / "fifo.safetensors")
    os.symlink(tmp_path / "loop.bin", tmp_path / "loop.bin")
    for path, why in (("fifo.safetensors", "not a regular file"), ("loop.bin", "symbolic link loop")):
        config = {**linear_config(weight_files), "parameters": {"weight": 1.0},
                  "models": [{"model": str(tmp_path / path)}, {"model": weight_files["m1"]}]}
        with pytest.raises(ConfigError, match=f"{path}: .*{why}"):
            flat_merge(config, tmp_path / "out", MergeOptions(quiet=True))
    assert not (tmp_path / "out").exists()


def test_a_pickle_of_one_tensor_is_refused_as_a_tensor(weight_files, tmp_path):
    torch.save(torch.ones(17, 9), tmp_path / "one.bin")  # torch.save(model.weight, ...) for (model.state_dict(), ...)
    config = {**linear_config(weight_files), "parameters": {"weight": 1.0},
              "models": [{"model": str(tmp_path / "one.bin")}, {"model": weight_files["m1"]}]}
    with pytest.raises(ConfigError, match=r"one.bin: holds a tensor, not a state dict"):
        flat_merge(config, tmp_path / "out", MergeOptions(quiet=True))


def test_an_intersection_of_nothing_is_reported(weight_files, tmp_path, caplog):
    """Files with no tensor name in common (the wrong files, or torch.save files of something else) merge nothing
    under -i: said, not a silent empty model.safetensors."""
    save_file({"other.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    config = {**linear_config(weight_files), "parameters": {"weight": 1.0},
              "models": [{"model": str(tmp_path / "other.safetensors")}, {"model": weight_files["m1"]}]}
    flat_merge(config, tmp_path / "out", MergeOptions(quiet=True), missing="intersection")
    assert "no tensor name is in every file" in caplog.text and "other.safetensors" in caplog.text


def test_a_fisher_folder_of_no_tensor_of_the_files_is_refused(weight_files, tmp_path):
    """Statistics collected from another model would leave every tensor merged without them (a plain average),
    unsaid: refused, as the config merges refuse them."""
    (tmp_path / "fisher").mkdir()
    save_file({"other.weight": torch.ones(2)}, str(tmp_path / "fisher" / "model.safetensors"))
    config = {"merge_method": "fisher", "models": [{"model": weight_files[m], "fisher": str(tmp_path / "fisher")}
                                                   for m in ("m0", "m1")]}
    with pytest.raises(ConfigError, match=r"fisher: holds the Fisher of no tensor of this merge"):
        flat_merge(config, tmp_path / "out", MergeOptions(quiet=True))
    assert not (tmp_path / "out").exists()


def test_fisher_folders_weigh_the_tensors_they_hold(weight_files, tmp_path):
    """A fisher method's `fisher: FOLDER` is read (it was never opened, every tensor averaged plainly)."""
    for m, importance in (("m0", 1000.0), ("m1", 1.0)):
        (tmp_path / m).mkdir()
        save_file({"down.0.weight": torch.full((17, 9), importance)}, str(tmp_path / m / "model.safetensors"))
    config = {"merge_method": "fisher", "models": [{"model": weight_files[m], "fisher": str(tmp_path / m)}
                                                   for m in ("m0", "m1")]}
    flat_merge(config, tmp_path / "out", MergeOptions(quiet=True))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    m0, m1 = torch.load(weight_files["m0"]), load_file(weight_files["m1"])
    assert torch.allclose(out["down.0.weight"], (1000 * m0["down.0.weight"] + m1["down.0.weight"]) / 1001)
    assert torch.allclose(out["down.0.bias"], (m0["down.0.bias"] + m1["down.0.bias"]) / 2)  # no Fisher: averaged
    with pytest.raises(OutputError, match="m0 is inside the input folder .*m0"):  # --overwrite: m0's Fisher gone
        flat_merge(config, tmp_path / "m0", MergeOptions(quiet=True, overwrite=True))
    assert (tmp_path / "m0" / "model.safetensors").exists()


def test_command_line_refuses_both_missing_flags(weight_files, tmp_path, capsys):
    from merge_engine.cli import main
    path = tmp_path / "flat.yml"
    path.write_text(yaml.safe_dump(linear_config(weight_files)))
    with pytest.raises(SystemExit):
        main(["pytorch", str(path), str(tmp_path / "out"), "-i", "-u"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["pytorch", str(path), str(tmp_path / "out"), "-i", "--out-shard-size", "100"]) == 0
    assert "merged 6 tensors" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_tensors_only_an_unlisted_base_holds_are_not_merged_as_in_mergekit(weight_files, tmp_path):
    """The tensor names come from the listed models; an unlisted base_model is one more input of each."""
    base = load_file(weight_files["base"])
    save_file({**base, "base_only.weight": torch.ones(2, 2)}, str(tmp_path / "base.safetensors"))
    config = {**ties_config(weight_files, models=("m1", "m2")), "base_model": str(tmp_path / "base.safetensors")}
    flat_merge(config, tmp_path / "out", MergeOptions(quiet=True), missing="intersection")
    assert "base_only.weight" not in load_file(str(tmp_path / "out" / "model.safetensors"))
    listed = {**config, "models": [*config["models"], {"model": config["base_model"]}]}
    flat_merge(listed, tmp_path / "listed", MergeOptions(quiet=True), missing="intersection")
    assert "base_only.weight" not in load_file(str(tmp_path / "listed" / "model.safetensors"))  # others lack it
    with pytest.raises(ConfigError, match="tensor 'base_only.weight' is missing from"):
        flat_merge(listed, tmp_path / "refused", MergeOptions(quiet=True))
