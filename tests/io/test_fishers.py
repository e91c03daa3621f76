"""The Fisher folder format: the manifest's validation, and folders without one."""
import json

import pytest
import torch
from safetensors.torch import save_file

from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.fishers import MANIFEST_FILE, check_fisher_folder, has_manifest, load_fisher_manifest


def write_folder(path, edit=None):
    save_file({"a": torch.ones(3), "b": torch.ones(2, 2)}, str(path / "model.safetensors"))
    manifest = {"format": "merge_engine.fisher", "version": 1, "model": "m", "variant": "empirical",
                "granularity": "per_batch", "examples": 2, "tokens": 9, "dtype": "float32", "seed": 0,
                "max_length": None, "sum_squares": 7.0, "tensors": 2}
    if edit:
        edit(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    return str(path)


def test_a_valid_manifest_is_returned(tmp_path):
    assert load_fisher_manifest(write_folder(tmp_path))["sum_squares"] == 7.0


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(format="other"), "not a Fisher manifest"),
    (lambda m: m.pop("seed"), 'field "seed" is missing'),
    (lambda m: m.update(examples=True), 'field "examples" has the wrong type'),
    (lambda m: m.update(variant="guessed"), 'field "variant" is \'guessed\''),
    (lambda m: m.update(sum_squares=-1.0), '"sum_squares" finite and >= 0'),
    (lambda m: m.update(sum_squares=10**400), '"sum_squares" finite and >= 0'),  # beyond float: no OverflowError
    (lambda m: m.update(tensors=3), "lists 3 tensors but the folder holds 2"),
])
def test_invalid_manifests_name_the_file(tmp_path, edit, needle):
    with pytest.raises(CheckpointError, match="fisher.json") as e:
        load_fisher_manifest(write_folder(tmp_path, edit))
    assert needle in str(e.value)


def test_a_folder_without_manifest(tmp_path):
    save_file({"a": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    assert not has_manifest(str(tmp_path))
    with pytest.raises(CheckpointError, match="not a Fisher folder"):
        load_fisher_manifest(str(tmp_path))


@pytest.mark.parametrize("manifest", [True, False])
def test_a_fisher_tensor_that_is_not_floating_point_is_refused_by_file_and_tensor(tmp_path, manifest):
    write_folder(tmp_path)
    save_file({"a": torch.ones(3), "b": torch.ones(2, 2, dtype=torch.int32)}, str(tmp_path / "model.safetensors"))
    if not manifest:
        (tmp_path / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: Fisher tensor 'b' is int32, not floating point"):
        check_fisher_folder(Checkpoint(str(tmp_path)))
    save_file({"a": torch.ones(3), "b": torch.ones(2, 2)}, str(tmp_path / "model.safetensors"))
    check_fisher_folder(Checkpoint(str(tmp_path)))
