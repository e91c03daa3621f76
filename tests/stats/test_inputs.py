"""`merge-engine stats` and `fisher`: bad inputs exit 2 with one line naming the file or option, before the
model is loaded, and no input is lost to --overwrite."""
from __future__ import annotations

import json
import os
import sys

import pytest

from merge_engine.cli import main
from merge_engine.stats import DataError, read_texts

COMMANDS = ("stats", "fisher")


def run_bad(argv, capsys, *needles):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("merge-engine: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("command", COMMANDS)
def test_inputs_apart_from_the_output(command, tiny_lm, text_file, tmp_path, capsys):
    model = tiny_lm("llama")
    out = tmp_path / "out"
    out.mkdir()
    data = out / "data.txt"
    data.write_text(open(text_file).read())
    run_bad([command, model, str(data), str(out), "--overwrite", "-q"], capsys, str(data), "inside the output folder")
    assert os.listdir(out) == ["data.txt"]
    inside = os.path.join(model, "out")
    run_bad([command, model, text_file, inside, "-q"], capsys, model, "inside the input folder")
    assert not os.path.exists(inside)


@pytest.mark.parametrize("command", COMMANDS)
def test_max_length_past_the_models_positions_is_refused(command, tiny_lm, text_file, tmp_path, capsys):
    model = tiny_lm("llama")
    limit = json.load(open(os.path.join(model, "config.json")))["max_position_embeddings"]
    run_bad([command, model, text_file, str(tmp_path / "out"), "--max-length", str(limit + 1), "-q"], capsys,
            f"--max-length {limit + 1}", str(limit), model)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_model_folder_without_a_tokenizer_is_named(command, tiny_lm, text_file, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):  # the weights, not the tokenizer
        os.link(os.path.join(tiny_lm("llama"), name), model / name)
    run_bad([command, str(model), text_file, str(tmp_path / "out"), "-q"], capsys,
            f"{model}: the model folder holds no tokenizer", "tokenizer.save_pretrained")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_base_plus_adapter_reference_is_refused_as_such(command, tiny_lm, text_file, tmp_path, capsys):
    """A merge config may name BASE+ADAPTER; the statistics passes load one model folder with transformers."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    ref = f"{tiny_lm('llama')}+{adapter}"
    run_bad([command, ref, text_file, str(tmp_path / "out"), "-q"], capsys,
            f"{ref}: a BASE+ADAPTER reference", "merge the adapter into a model folder first")
    assert not os.path.exists(tmp_path / "out")


def test_bad_exclude_regex_is_refused_with_the_arguments(tiny_lm, text_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["stats", tiny_lm("llama"), text_file, str(tmp_path / "out"), "--exclude", "(", "-q"])
    assert e.value.code == 2
    assert "argument --exclude: '(' is not a valid regular expression" in capsys.readouterr().err


def test_fifo_data_file_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "data.txt"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=f"{fifo}: data file is not a regular file"):
        read_texts(str(fifo))


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_on_a_read_only_file_system_is_refused_before_the_computation(command, tiny_lm, text_file,
                                                                                tmp_path):
    # fisher made its output folder only once its whole computation (hours on a large model) was done, and failed
    # then; the computation here ends the command to say it was reached
    from tests.cli.test_failures import in_own_mount_namespace
    ro = tmp_path / "ro"
    ro.mkdir()
    code = ("import sys; from merge_engine.stats import fisher, gram; from merge_engine.cli import main\n"
            "fisher.compute_fisher = gram.compute_grams = lambda *a, **k: sys.exit('computed')\n"
            "sys.exit(main(sys.argv[1:]))")
    done = in_own_mount_namespace('mount -t tmpfs -o ro tmpfs "$1" && exec "$2" -c "$3" "$4" "$5" "$6" "$1/out" -q',
                                  ro, sys.executable, code, command, tiny_lm("llama"), text_file)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"merge-engine: error: {ro}/out: the output cannot be made in {ro} (a read-only file system)\n"
