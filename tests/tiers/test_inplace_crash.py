"""An in-place apply killed mid-way (after its journal and some writes) is rolled back to the original bytes, by
`recover` or by the next in-place command; a streamed apply refuses a half-keyed folder."""
import os
import shutil

import pytest

from merge_engine.errors import CheckpointError
from merge_engine.tiers import apply_key, apply_key_in_place, generate_key, recover, remove_key_in_place
from merge_engine.tiers.journal import JOURNAL_FILE, PARTIAL_SUFFIX
from tests.tiers.conftest import kill_when_paused, read_config, same_files


def changed_files(a, b) -> list[str]:
    return [n for n in sorted(os.listdir(a)) if open(os.path.join(a, n), "rb").read() !=
            open(os.path.join(b, n), "rb").read()]


def test_killed_in_place_apply_is_rolled_back(tier_model, tmp_path):
    model = tier_model("gpt2")
    key = generate_key(read_config(model), "s", 0.3, 0.6)
    key_path = str(tmp_path / "key.json")
    key.save(key_path)
    crashed = str(shutil.copytree(model, tmp_path / "crashed"))
    kill_when_paused(["key", "apply", crashed, key_path, "--in-place"])
    assert os.path.exists(os.path.join(crashed, JOURNAL_FILE))
    assert [n for n in changed_files(model, crashed) if n != JOURNAL_FILE]  # weights were half-written
    crashed_again = str(shutil.copytree(crashed, tmp_path / "crashed_again"))

    with pytest.raises(CheckpointError, match="recover"):
        apply_key(crashed, key, str(tmp_path / "out"))
    assert recover(crashed) is True
    same_files(model, crashed)
    assert recover(crashed) is False

    apply_key_in_place(crashed_again, key)  # rolls back first, then keys
    apply_key(model, key, str(tmp_path / "keyed"))
    same_files(tmp_path / "keyed", crashed_again)
    remove_key_in_place(crashed_again, key)
    same_files(model, crashed_again)


def test_partial_journal_means_nothing_was_touched(tier_model, tmp_path):
    model = tier_model("llama")
    work = shutil.copytree(model, tmp_path / "work")
    (work / (JOURNAL_FILE + PARTIAL_SUFFIX)).write_bytes(b"MERGE_ENGINE_KEY_JOURNAL_V1\n\x07")
    assert recover(str(work)) is False
    same_files(model, work)


def test_damaged_journal_is_reported_and_kept(tier_model, tmp_path):
    work = shutil.copytree(tier_model("llama"), tmp_path / "work")
    (work / JOURNAL_FILE).write_bytes(b"not a journal")
    with pytest.raises(CheckpointError, match="damaged key journal"):
        recover(str(work))
    assert (work / JOURNAL_FILE).exists()
