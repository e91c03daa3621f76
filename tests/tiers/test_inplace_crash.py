"""An in-place apply killed mid-way (after its journal and some writes) is rolled back to the original bytes, by
`recover` or by the next in-place command; a streamed apply refuses a half-keyed folder."""
import json
import os
import shutil
import struct

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


def journal_with(work, **changes) -> None:
    """A real journal of rows 0-1 of one tensor of the folder, with its entry's fields changed."""
    from merge_engine.io.checkpoint import Checkpoint
    from merge_engine.tiers.journal import MAGIC, Journal
    from merge_engine.tiers.moves import stored
    from merge_engine.tiers.slices import OpenFiles
    ckpt = Checkpoint(str(work))
    name = next(n for n, info in sorted(ckpt.tensors.items()) if len(info.shape) == 2)
    with OpenFiles() as files:
        Journal.write(str(work), [(name, stored(ckpt.tensors[name]), 0, [(0, 2)])], files)
    ckpt.close()
    raw = (work / JOURNAL_FILE).read_bytes()
    size = struct.unpack("<Q", raw[len(MAGIC):len(MAGIC) + 8])[0]
    header = json.loads(raw[len(MAGIC) + 8:len(MAGIC) + 8 + size])
    header["entries"][0].update(changes)
    new = json.dumps(header).encode()
    (work / JOURNAL_FILE).write_bytes(MAGIC + struct.pack("<Q", len(new)) + new + raw[len(MAGIC) + 8 + size:])


@pytest.mark.parametrize("changes, needle", [({"dim": 7}, "dim 7"), ({"itemsize": 0}, "itemsize 0"),
                                             ({"runs": [[-2, 0]]}, r"run \[-2, 0\]"),
                                             ({"offset": 10**9}, "past the end of the")])
def test_out_of_range_journal_entries_are_refused_before_any_write(tier_model, tmp_path, changes, needle):
    model = tier_model("llama")
    work = shutil.copytree(model, tmp_path / "work")
    journal_with(work, **changes)
    with pytest.raises(CheckpointError, match=f"{JOURNAL_FILE}: damaged key journal .*{needle}"):
        recover(str(work))
    assert changed_files(model, work) == []  # nothing written back
    assert (work / JOURNAL_FILE).exists()


def test_fifo_journal_is_refused_not_waited_on(tier_model, tmp_path):
    work = shutil.copytree(tier_model("llama"), tmp_path / "work")
    os.mkfifo(work / JOURNAL_FILE)
    with pytest.raises(CheckpointError, match=f"{JOURNAL_FILE}: damaged key journal .*FIFO"):
        recover(str(work))
