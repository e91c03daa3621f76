"""A command that needs an optional package which is not installed: exit 2 and one line naming the extra
that installs it, no traceback. Each runs in a fresh interpreter whose `import transformers` fails."""
import subprocess
import sys

import pytest

WITHOUT = "import sys; sys.modules[{package!r}] = None; from merge_engine.cli import main; sys.exit(main(sys.argv[1:]))"


def run_without(package: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT.format(package=package), *argv], capture_output=True,
                          text=True, timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f'merge-engine: error: {what} needs transformers: pip install "merge_engine[hf]"']


@pytest.mark.parametrize("command", ["stats", "fisher"])
def test_statistics_commands(command, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("some text\n")
    assert_one_line(run_without("transformers", command, str(tmp_path / "model"), str(data), str(tmp_path / "out")),
                    f"merge-engine {command}")


def test_key_compare(tmp_path):
    proc = run_without("transformers", "key", "compare", str(tmp_path / "model"), str(tmp_path / "key.json"),
                       str(tmp_path / "prompts.txt"))
    assert_one_line(proc, "merge-engine key compare")


@pytest.mark.parametrize("setting", [{"tokenizer_source": "union"}, {"chat_template": "chatml"}])
def test_a_merge_with_tokenizer_settings(model_sets, write_yaml, tmp_path, setting):
    """Refused before the merge: a chat template alone was dropped after it, with a warning and status 0."""
    models = [{"model": path, "parameters": {"weight": 1.0}} for path in model_sets("llama")[:2]]
    config = write_yaml({"merge_method": "linear", **setting, "models": models})
    proc = run_without("transformers", config, str(tmp_path / "out"), "-q", "--device", "cpu")
    assert_one_line(proc, "a merge that sets tokenizer_source, tokenizer or chat_template")
    assert not (tmp_path / "out").exists()


def test_moe(model_sets, tmp_path):
    base, *experts = model_sets("llama")
    config = tmp_path / "moe.yml"
    config.write_text(f"base_model: {base}\ngate_mode: random\nexperts:\n"
                      + "".join(f"  - source_model: {e}\n" for e in experts))
    assert_one_line(run_without("transformers", "moe", str(config), str(tmp_path / "out")), "merge-engine moe")
    assert not (tmp_path / "out").exists()


def test_extract_lora(model_sets, tmp_path):
    base, expert, *_ = model_sets("llama")
    proc = run_without("transformers", "extract-lora", "--model", expert, "--base-model", base, "--out-path",
                       str(tmp_path / "out"))
    assert_one_line(proc, "merge-engine extract-lora")
    assert not (tmp_path / "out").exists()


def test_tokensurgeon(model_sets, tmp_path):
    base, expert, *_ = model_sets("llama")
    assert_one_line(run_without("transformers", "tokensurgeon", base, expert, str(tmp_path / "out")),
                    "merge-engine tokensurgeon")
    assert not (tmp_path / "out").exists()
