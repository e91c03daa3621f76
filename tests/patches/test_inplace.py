"""Patches applied and removed in place: the same bytes as the streamed commands, exact restores, and an in-place
apply killed mid-way rolled back by `patch recover`."""
import filecmp
import os
import shutil

import pytest
import torch

from merge_engine.errors import CheckpointError
from merge_engine.patches import apply_patches, apply_patches_in_place, extract_patch, recover, remove_patches_in_place
from merge_engine.tiers.journal import JOURNAL_FILE
from tests.patches.conftest import read_all, same_bits
from tests.tiers.conftest import kill_when_paused, same_files


@pytest.fixture(scope="module")
def patched(models, tmp_path_factory):
    m = models(torch.bfloat16)
    root = tmp_path_factory.mktemp("inplace")
    extract_patch(m["base"], m["tuned"], str(root / "p"))
    apply_patches(m["base"], [(str(root / "p"), 0.5)], str(root / "streamed"))
    return m, str(root / "p"), str(root / "streamed")


def test_in_place_equals_streamed_and_remove_restores_the_files(patched, tmp_path):
    m, patch, streamed = patched
    work = str(shutil.copytree(m["base"], tmp_path / "work"))
    run = apply_patches_in_place(work, [(patch, 0.5)])
    assert run.output == run.model and run.tensors_changed == len(read_all(m["base"]))
    same_files(streamed, work)  # same layout, same bytes
    exact = str(shutil.copytree(m["base"], tmp_path / "exact"))
    apply_patches_in_place(exact, [patch])
    assert same_bits(read_all(exact), read_all(m["tuned"]))
    remove_patches_in_place(exact, [patch])
    same_files(m["base"], exact)  # one float patch at scale 1: the exact bytes back


def test_a_refused_in_place_apply_changes_nothing(patched, tmp_path):
    m, patch, _ = patched
    work = str(shutil.copytree(m["other"], tmp_path / "work"))
    with pytest.raises(CheckpointError, match="differs from the base"):
        apply_patches_in_place(work, [patch])
    same_files(m["other"], work)


def test_killed_in_place_apply_is_rolled_back_by_recover(patched, tmp_path):
    m, patch, _ = patched
    work = str(shutil.copytree(m["base"], tmp_path / "work"))
    kill_when_paused(["patch", "apply", work, patch, "--in-place"])
    assert os.path.exists(os.path.join(work, JOURNAL_FILE))
    shards = [f for f in os.listdir(m["base"]) if f.endswith(".safetensors")]
    assert not all(filecmp.cmp(os.path.join(work, f), os.path.join(m["base"], f), shallow=False) for f in shards)
    for read in (lambda: apply_patches(work, [patch], str(tmp_path / "out")), lambda: read_all(work)):
        with pytest.raises(CheckpointError, match="recover"):  # half-patched: nothing reads it
            read()
    assert recover(work) is True
    same_files(m["base"], work)
    assert recover(work) is False


def test_a_refusal_after_tensors_were_rewritten_rolls_them_back(patched, tmp_path):
    """The base check fails only on the last tensor in file order: the tensors rewritten before it are rolled back."""
    from safetensors.torch import load_file, save_file

    from merge_engine.io.checkpoint import Checkpoint
    m, patch, _ = patched
    work = str(shutil.copytree(m["base"], tmp_path / "work"))
    ckpt = Checkpoint(work)
    last = max(ckpt.tensors, key=lambda n: (ckpt.tensors[n].file, ckpt.tensors[n].data_start))
    shard = ckpt.tensors[last].file
    ckpt.close()
    tensors = load_file(shard)
    tensors[last].view(-1)[0] += 1
    save_file(tensors, shard, metadata={"format": "pt"})
    before = str(shutil.copytree(work, tmp_path / "before"))
    with pytest.raises(CheckpointError, match=f"tensor '{last}' differs from the base"):
        apply_patches_in_place(work, [patch])
    same_files(before, work)
    assert not os.path.exists(os.path.join(work, JOURNAL_FILE))
