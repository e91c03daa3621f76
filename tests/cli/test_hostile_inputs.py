"""Hostile inputs through the command line, each case asserting the whole contract: exit status 2, a
message naming the culprit, no traceback, no output or temporary folder left, the inputs unchanged."""
import json
import os
import shutil
import struct

import pytest
import yaml

from merge_engine import cli
from merge_engine.demo import make_synthetic_llama
from tests.conftest import folder_digest

SHAPE = dict(layers=1, hidden=16, intermediate=32, vocab=32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    base = make_synthetic_llama(str(work / "base"), seed=0, **SHAPE)
    return base, make_synthetic_llama(str(work / "expert"), seed=1, base=base, **SHAPE)


def layer_shard(folder) -> str:
    return os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[1])  # a layer's


def rewrite_header(path, change):
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header, data = json.loads(f.read(size)), f.read()
    raw = change(header)
    raw = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def rewrite_index(folder, change):
    path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(path))
    with open(path, "w") as f:
        f.write(change(index) if isinstance(change(index), str) else json.dumps(change(index)))


def rewrite_config(folder, **values):
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    with open(path, "w") as f:
        json.dump({**config, **values}, f)


def overlap(header):
    names = [n for n in header if n != "__metadata__"]
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
    return header


def duplicate(header):
    name = next(n for n in header if n != "__metadata__")
    text = json.dumps(header)
    return (text[:-1] + f', "{name}": ' + json.dumps(header[name]) + "}").encode()


def huge_shape(header):
    name = next(n for n in header if n != "__metadata__")
    return json.dumps(header).replace(json.dumps(header[name]["shape"]), "[1e999]", 1).encode()


def traversal(index):
    index["weight_map"][next(iter(index["weight_map"]))] = "../base/" + next(iter(index["weight_map"].values()))
    return index


CASES = {  # name: (change to the expert folder, change to the config, what the message must name)
    "header ranges overlap": (lambda f: rewrite_header(layer_shard(f), overlap), None, "overlaps"),
    "duplicate tensor names": (lambda f: rewrite_header(layer_shard(f), duplicate), None, "twice"),
    "metadata not strings": (lambda f: rewrite_header(layer_shard(f), lambda h: {**h, "__metadata__": {"a": 1}}),
                             None, "__metadata__"),
    "shape 1e999": (lambda f: rewrite_header(layer_shard(f), huge_shape), None, "malformed header entry"),
    "JSON nested deep": (lambda f: rewrite_header(layer_shard(f), lambda h: b"[" * 100_000 + b"]" * 100_000),
                         None, "nested too deeply"),
    "index leaves the folder": (lambda f: rewrite_index(f, traversal), None, "outside"),
    "index names a lone surrogate": (lambda f: rewrite_index(f, lambda i: {**i, "weight_map": {
        name: "\ud800.safetensors" for name in i["weight_map"]}}), None, "index.json: names '\\ud800.safetensors'"),
    "weight_map a list": (lambda f: rewrite_index(f, lambda i: {**i, "weight_map": list(i["weight_map"])}),
                          None, "weight_map"),
    "weight .nan": (None, lambda c: c["models"][1]["parameters"].update(weight=float("nan")), "weight"),
    "weight .inf": (None, lambda c: c["models"][1]["parameters"].update(weight=float("inf")), "weight"),
    "density misspelled, strict": (None, lambda c: c["models"][1]["parameters"].update(densty=0.5), "density"),
    "weight 1e400 written out": (None, lambda c: c["models"][1]["parameters"].update(weight=10**400),
                                 "parameters.weight: 'weight' must be a finite number"),
    "filter an int": (None, lambda c: c["models"][1]["parameters"].update(weight=[{"filter": 5, "value": 1.0}]),
                      "parameters.weight: filter must be a tensor-name substring"),
    "merge_method a list": (None, lambda c: c.update(merge_method=["ties"]), "merge_method: expected a method name"),
    "parameters a list": (None, lambda c: c.update(parameters=[1, 2]), "parameters: expected a mapping"),
    "parameter name an int": (None, lambda c: c["models"][1]["parameters"].update({5: 3}),
                              "models[1].parameters: parameter names must be strings"),
    "adapter path with a NUL": (None, lambda c: c["models"][1].update(model=c["models"][1]["model"] + "+/a\0"),
                                "models[1].model: "),
    "adapter path with a lone surrogate": (None, lambda c: c["models"][1].update(model=c["models"][1]["model"]
                                                                                   + "+/a\ud800"), "models[1].model: "),
    "config.json architectures an int": (lambda f: rewrite_config(f, architectures=5), None,
                                         "expert/config.json: 'architectures' must be a list"),
    "config.json architectures dicts": (lambda f: rewrite_config(f, architectures=[{"a": 1}]), None,
                                        "expert/config.json: 'architectures' must be a list"),
    "config.json architectures a string": (lambda f: rewrite_config(f, architectures="LlamaForCausalLM"), None,
                                           "expert/config.json: 'architectures' must be a list"),
    "config.json model_type a list": (lambda f: rewrite_config(f, model_type=["llama"]), None,
                                      "expert/config.json: 'model_type' must be a model type name"),
    "config.json text_config a string": (lambda f: rewrite_config(f, text_config="x"), None,
                                         "expert/config.json: 'text_config' must be a JSON object"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input(models, tmp_path, capsys, case):
    change_folder, change_config, culprit = CASES[case]
    base, expert = models
    mutant = str(tmp_path / "expert")
    shutil.copytree(expert, mutant)
    if change_folder:
        change_folder(mutant)
    config = {"merge_method": "ties", "base_model": base, "models": [
        {"model": base}, {"model": mutant, "parameters": {"weight": 1.0, "density": 0.5}}]}
    if change_config:
        change_config(config)
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    before = (folder_digest(base), folder_digest(mutant))
    status = cli.main([str(tmp_path / "c.yml"), str(tmp_path / "out"), "-q", "--strict"])
    err = capsys.readouterr().err
    assert status == 2 and culprit in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["c.yml", "expert"]  # no output, no .out.partial-*
    assert (folder_digest(base), folder_digest(mutant)) == before


def test_control_characters_in_a_name_are_shown_escaped(models, tmp_path, capsys):
    # a path (or a header's tensor name) holding terminal escapes must not colour, move or clear the user's terminal
    missing = str(tmp_path / "no\x1b[2Jsuch\rmodel")
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": models[0], "parameters": {"weight": 0.5}}, {"model": missing, "parameters": {"weight": 0.5}}]}))
    assert cli.main([str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no\\x1b[2Jsuch\\rmodel" in err and "\x1b" not in err and "\r" not in err


def test_control_characters_in_warnings_and_log_lines_are_shown_escaped():
    import subprocess
    import sys
    code = ("import logging, warnings; from merge_engine.cli.args import setup_logging; setup_logging(False); "
            "warnings.warn('a\\x1b[31mred'); logging.getLogger('merge_engine').info('b\\x1b[2Jclear'); "
            "logging.getLogger('merge_engine').warning('c')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "a\\x1b[31mred" in err and "b\\x1b[2Jclear" in err and "\x1b" not in err
    assert "\nmerge-engine: warning: c\n" in err  # log warnings as Python's: one prefix for both
