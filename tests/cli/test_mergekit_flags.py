"""mergekit-yaml's command-line flags (mergekit 0.1.5, `mergekit-yaml --help`), each as click spells it, with
its --no- form: accepted by `merge-engine`, so that a mergekit command line runs unchanged. What
--lora-merge-dtype changes is tested against mergekit in tests/test_parity_mergekit.py; --no-safe-serialization,
which changes nothing here, says so."""
import pytest
import torch

from merge_engine.cli.merge import build_parser, run

BOOLEAN = ["allow-crimes", "unsafe-truncate-embeddings", "trust-remote-code", "quiet", "cuda", "low-cpu-memory",
           "lazy-unpickle", "read-to-gpu", "multi-gpu", "async-write", "copy-tokenizer", "clone-tensors",
           "write-model-card", "safe-serialization"]
VALUED = {"--device": "cpu", "--transformers-cache": "/tmp", "--lora-merge-cache": "/tmp", "--lora-merge-dtype": "bfloat16",
          "--random-seed": "3", "--write-threads": "2", "--out-shard-size": "1B", "--num-threads": "1", "-j": "1"}


@pytest.mark.parametrize("flag", [f"--{f}" for f in BOOLEAN] + [f"--no-{f}" for f in BOOLEAN] + ["--gpu-rich", "-v"]
                         + list(VALUED))
def test_every_mergekit_flag_is_accepted(flag):
    build_parser().parse_args(["config.yml", "out", flag, *([VALUED[flag]] if flag in VALUED else [])])


def test_the_flags_that_matter_set_their_options():
    parse = build_parser().parse_args
    assert parse(["c.yml", "o"]).device == "auto"
    assert parse(["c.yml", "o", "--cuda"]).device == "cuda" and parse(["c.yml", "o", "--no-cuda"]).device == "cpu"
    assert parse(["c.yml", "o", "--allow-crimes"]).allow_crimes and not parse(["c.yml", "o", "--no-allow-crimes"]).allow_crimes
    assert parse(["c.yml", "o", "-q", "--no-quiet"]).quiet is False
    assert parse(["c.yml", "o", "--unsafe-truncate-embeddings"]).unsafe_truncate_embeddings
    assert not parse(["c.yml", "o"]).unsafe_truncate_embeddings


def test_lora_merge_dtype_takes_mergekits_names_and_refuses_others(tmp_path, capsys):
    parse = build_parser().parse_args
    assert parse(["c.yml", "o"]).lora_merge_dtype is None
    assert parse(["c.yml", "o", "--lora-merge-dtype", "bfloat16"]).lora_merge_dtype == torch.bfloat16
    assert parse(["c.yml", "o", "--lora-merge-dtype", "torch.float64"]).lora_merge_dtype == torch.float64
    with pytest.raises(SystemExit) as stop:
        run([str(tmp_path / "c.yml"), str(tmp_path / "out"), "--lora-merge-dtype", "int64"])
    assert stop.value.code == 2
    assert "--lora-merge-dtype: 'int64' is not one of bfloat16, float16, float32, float64" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,note", [("--trust-remote-code", "runs no code a model folder ships"),
                                       ("--multi-gpu", "run it under torchrun for several GPUs"),
                                       ("--gpu-rich", "run it under torchrun for several GPUs")])
def test_flags_whose_effect_merge_engine_lacks_say_so(flag, note, model_sets, write_yaml, tmp_path, caplog):
    # mergekit runs a folder's code with --trust-remote-code and merges on several GPUs with --multi-gpu
    base, expert, _, _ = model_sets("llama")
    config = write_yaml({"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 0.5}}
                                                              for m in (base, expert)]})
    assert run([config, str(tmp_path / "out"), flag, "-q", "--device", "cpu"]) == 0
    assert f"{flag}: " in caplog.text and note in caplog.text
    caplog.clear()
    assert run([config, str(tmp_path / "again"), "-q", "--device", "cpu"]) == 0
    assert flag not in caplog.text


def test_no_safe_serialization_says_the_output_is_safetensors_all_the_same(model_sets, write_yaml, tmp_path, caplog):
    # mergekit writes pickled pytorch_model*.bin shards with it; a flag that changes nothing here must say so
    base, expert, _, _ = model_sets("llama")
    config = write_yaml({"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 0.5}}
                                                              for m in (base, expert)]})
    assert run([config, str(tmp_path / "out"), "--no-safe-serialization", "-q", "--device", "cpu"]) == 0
    assert "--no-safe-serialization: the output is written as safetensors all the same" in caplog.text
    assert [p.suffix for p in (tmp_path / "out").glob("*model*")] == [".safetensors"]
    caplog.clear()
    assert run([config, str(tmp_path / "again"), "--safe-serialization", "-q", "--device", "cpu"]) == 0
    assert "safe-serialization" not in caplog.text
