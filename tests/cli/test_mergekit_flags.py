"""mergekit-yaml's command-line flags (mergekit 0.1.5, `mergekit-yaml --help`), each as click spells it, with
its --no- form: accepted by `merge-engine`, so that a mergekit command line runs unchanged; the one that
changes what is merged and is not implemented (--lora-merge-dtype) is refused by name instead of ignored."""
import pytest

from merge_engine.cli.merge import build_parser, run

BOOLEAN = ["allow-crimes", "unsafe-truncate-embeddings", "trust-remote-code", "quiet", "cuda", "low-cpu-memory",
           "lazy-unpickle", "read-to-gpu", "multi-gpu", "async-write", "copy-tokenizer", "clone-tensors",
           "write-model-card", "safe-serialization"]
VALUED = {"--device": "cpu", "--transformers-cache": "/tmp", "--lora-merge-cache": "/tmp", "--lora-merge-dtype": "bfloat16",
          "--random-seed": "3", "--write-threads": "2", "--out-shard-size": "1B", "--num-threads": "1", "-j": "1"}
REFUSED = {"--lora-merge-dtype": ["float32"]}


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


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_flags_that_change_the_merge_and_are_not_implemented_are_refused_by_name(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run([str(tmp_path / "c.yml"), str(tmp_path / "out"), flag, *REFUSED[flag]])
    assert stop.value.code == 2
    assert f"{flag} is not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
