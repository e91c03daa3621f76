"""The Grams folder format: stored shapes, packing both ways, and the manifest's validation."""
import json

import pytest
import torch
from safetensors.torch import save_file

from merge_engine.errors import CheckpointError
from merge_engine.io.grams import MANIFEST_FILE, as_matrix, gram_problem, load_gram_folder, stored_shape, to_stored


def symmetric(d: int) -> torch.Tensor:
    """Exactly symmetric: x.T @ x need not be (a BLAS may round [i, j] and [j, i] apart; some AMD builds do)."""
    x = torch.randn(3 * d, d, generator=torch.Generator().manual_seed(d))
    g = x.T @ x
    return (g + g.T) / 2


@pytest.mark.parametrize("packed", [False, True])
def test_stored_grams_read_back(packed):
    gram = symmetric(5)
    stored = to_stored(gram, "float32", packed)
    assert tuple(stored.shape) == stored_shape(5, packed)
    assert torch.equal(as_matrix(stored, 5), gram)


def write_folder(path, packed=False, edit=None):
    gram = to_stored(symmetric(4), "float32", packed)
    save_file({"fc.gram": gram}, str(path / "model.safetensors"))
    manifest = {"format": "merge_engine.grams", "version": 1, "model": "m", "examples": 2, "tokens": 7,
                "dtype": "float32", "packed": packed, "max_length": 16,
                "modules": {"fc": {"gram": "fc.gram", "in_features": 4, "transposed": False, "rows": 7}}}
    if edit:
        edit(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    return str(path)


@pytest.mark.parametrize("packed", [False, True])
def test_a_valid_folder_maps_weights_to_modules(tmp_path, packed):
    folder = load_gram_folder(write_folder(tmp_path, packed))
    assert folder.module_of("fc.weight")["gram"] == "fc.gram"
    assert folder.module_of("fc.bias") is None and folder.module_of("other.weight") is None


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(format="other"), "not a Grams manifest"),
    (lambda m: m.update(version=2), "unsupported version 2"),
    (lambda m: m.pop("tokens"), 'field "tokens" is missing'),
    (lambda m: m.update(dtype="float16"), '"dtype" must be one of'),
    (lambda m: m["modules"]["fc"].update(in_features=3), 'Gram tensor "fc.gram" is [4, 4], expected [3, 3]'),
    (lambda m: m["modules"]["fc"].update(rows=0), 'module "fc": expected'),
])
def test_invalid_manifests_name_the_file(tmp_path, edit, needle):
    with pytest.raises(CheckpointError, match="grams.json") as e:
        load_gram_folder(write_folder(tmp_path, edit=edit))
    assert needle in str(e.value)


def test_a_folder_without_manifest_is_refused(tmp_path):
    save_file({"fc.gram": symmetric(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a Grams folder"):
        load_gram_folder(str(tmp_path))


def test_a_matrix_that_cannot_be_a_gram_is_named():
    """X^T X has a diagonal of sums of squares and is symmetric (to fp32 rounding, far under 1e-4 of its
    largest entry); a solve would take anything else silently (Cholesky reads one triangle)."""
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    gram = x.T @ x
    assert gram_problem(gram) is None and gram_problem(torch.zeros(6, 6)) is None
    negative = gram.clone()
    negative[2, 2] = -1.0
    assert gram_problem(negative) == "has 1 negative diagonal entry (sums of squares)"
    skewed = gram.clone()
    skewed[0, 3] += 0.01 * float(gram.abs().max())
    assert gram_problem(skewed).startswith("is not symmetric (entries differ from their mirror by up to")
