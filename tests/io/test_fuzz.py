"""Seeded fuzzing of what a model folder says about itself: random mutations of valid safetensors headers
(bytes and JSON values) and shard indexes. Every mutant is either read as valid or refused with a
CheckpointError naming the file; nothing else escapes. A sample goes through the command line too:
exit 0 or 2, no traceback, nothing left behind, the inputs unchanged."""
import json
import os
import random
import shutil
import struct

import pytest
import yaml

from merge_engine import cli
from merge_engine.demo import make_synthetic_llama
from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint
from tests.conftest import folder_digest

CASES = 240  # mutants per run, from a fixed seed: the same ones every run
HOSTILE_VALUES = [None, True, -1, 2**70, 1e999, "F32", "../x", [], {}, [1, 2, 3], [-1, 4], "x" * 1000,
                  [[[[[]]]]], {"a": {"b": {}}}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    return make_synthetic_llama(str(work / "model"), layers=1, hidden=16, intermediate=32, vocab=32)


def header_of(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), f.read()


def mutate_header(path: str, rng: random.Random) -> None:
    header, data = header_of(path)
    kind = rng.choice(["bytes", "value", "key", "length"])
    raw = json.dumps(header).encode()
    if kind == "bytes":  # flip a few bytes of the JSON text
        raw = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        raw = bytes(raw)
    elif kind in ("value", "key"):  # one field of one entry replaced, or one entry renamed/duplicated
        name = rng.choice([n for n in header if n != "__metadata__"])
        if kind == "value":
            header[name][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(HOSTILE_VALUES)
        else:
            header[rng.choice(["__metadata__", name + "x", ""])] = header[name] if rng.random() < 0.5 else \
                rng.choice(HOSTILE_VALUES)
        raw = json.dumps(header).encode()
    length = len(raw) if kind != "length" else rng.choice([0, 7, len(raw) - 1, len(raw) + 9, 2**63])
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", length) + raw + data)


def mutate_index(path: str, rng: random.Random) -> None:
    index = json.load(open(path))
    weight_map = index["weight_map"]
    name = rng.choice(list(weight_map))
    choice = rng.randrange(4)
    if choice == 0:
        weight_map[name] = rng.choice(HOSTILE_VALUES + ["../../etc/passwd", "/etc/passwd", "missing.safetensors"])
    elif choice == 1:
        index["weight_map"] = rng.choice(HOSTILE_VALUES)
    elif choice == 2:
        weight_map[name + ".extra"] = weight_map[name]
    else:
        del weight_map[name]
    with open(path, "w") as f:
        json.dump(index, f)


def mutant(model: str, folder: str, seed: int) -> str:
    rng = random.Random(seed)
    shutil.copytree(model, folder)
    if rng.random() < 0.3:
        mutate_index(os.path.join(folder, "model.safetensors.index.json"), rng)
    else:
        shard = rng.choice(sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")))
        mutate_header(os.path.join(folder, shard), rng)
    return folder


def test_mutated_headers_and_indexes_are_read_or_refused_by_name(model, tmp_path):
    refused = 0
    for seed in range(CASES):
        folder = mutant(model, str(tmp_path / str(seed)), seed)
        try:
            Checkpoint(folder).close()
        except CheckpointError as e:
            refused += 1
            assert folder in str(e), (seed, str(e))
    assert refused > CASES // 2  # the mutations are hostile enough to be refused most of the time


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(0, CASES, 24))
def test_mutants_through_the_command_line(model, tmp_path, capsys, seed):
    folder = mutant(model, str(tmp_path / "mutant"), seed)
    before = folder_digest(folder)
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": m, "parameters": {"weight": 1.0}} for m in (model, folder)]}))
    status = cli.main([str(config), str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert status in (0, 2) and "Traceback" not in err, err
    if status == 2:
        assert err.startswith("merge-engine: error:") and not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    assert folder_digest(folder) == before
