"""The output's model card (merge_engine/card.py): README.md with the method, the models, the config as
mergekit_config.yml holds it, and Hugging Face metadata naming the models found by Hub id; off with
--no-write-model-card."""
from __future__ import annotations

import pytest
import yaml

from merge_engine import MergeEngineError, MergeOptions, merge, parse_config
from merge_engine.cli import main
from merge_engine.methods import REGISTRY
from tests.io.test_hub_cache import hub, ties  # noqa: F401 (a fixture)

OPTIONS = MergeOptions(quiet=True, copy_tokenizer=False)


def card(folder) -> tuple[dict, str]:
    """The card's metadata and its body."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    metadata, body = text[4:].split("---\n", 1)
    return yaml.safe_load(metadata), body


def test_a_merge_writes_a_card_of_its_method_models_and_config(model_sets, tmp_path):
    base, e1, e2, _ = model_sets("llama")
    merge(parse_config(ties(base, e1, e2)), str(tmp_path / "my-merge"), OPTIONS)
    merge(parse_config(ties(base, e1, e2)), str(tmp_path / "elsewhere"), OPTIONS)
    metadata, body = card(tmp_path / "my-merge")
    assert (tmp_path / "elsewhere" / "README.md").read_bytes() == (tmp_path / "my-merge" / "README.md").read_bytes()
    assert metadata == {"base_model": [], "library_name": "transformers", "tags": ["merge", "merge_engine"]}
    assert body.startswith("# A ties merge of 3 models\n")
    assert f"merged with the [ties]({REGISTRY['ties'].reference}) merge method using {base} as a base." in body
    assert f"* {e1}\n* {e2}\n" in body and f"* {base}" not in body
    config = (tmp_path / "my-merge" / "mergekit_config.yml").read_text()  # (a mapping given: as YAML)
    assert f"```yaml\n{config.rstrip()}\n```\n" in body


def test_slerps_base_is_one_of_its_two_models(model_sets, tmp_path):
    base, e1, _, _ = model_sets("llama")
    config = {"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5},
              "models": [{"model": base}, {"model": e1}]}
    merge(parse_config(config), str(tmp_path / "out"), OPTIONS)
    _, body = card(tmp_path / "out")
    assert "as a base" not in body and f"* {base}\n* {e1}\n" in body


def test_models_found_by_hub_id_are_the_cards_base_models_linked(hub, tmp_path):  # noqa: F811
    cache, _ = hub
    config = ties("org/base", "org/e1@v1", f"org/e2@{'f' * 40}+org/adapter")
    merge(parse_config(config), str(tmp_path / "out"), MergeOptions(quiet=True, copy_tokenizer=False, hub_cache=cache))
    metadata, body = card(tmp_path / "out")
    assert metadata["base_model"] == ["org/base", "org/e1", "org/e2", "org/adapter"]
    assert "using [org/base](https://huggingface.co/org/base) as a base" in body
    assert "* [org/e1@v1](https://huggingface.co/org/e1)\n" in body
    assert f"* [org/e2@{'f' * 40}](https://huggingface.co/org/e2) + [org/adapter](https://huggingface.co/org/adapter)" in body


def test_no_card_when_asked(model_sets, write_yaml, tmp_path):
    base, e1, e2, _ = model_sets("llama")
    merge(parse_config(ties(base, e1, e2)), str(tmp_path / "a"), MergeOptions(quiet=True, write_model_card=False))
    assert not (tmp_path / "a" / "README.md").exists()
    assert main([write_yaml(ties(base, e1, e2)), str(tmp_path / "b"), "--no-write-model-card", "-q"]) == 0
    assert not (tmp_path / "b" / "README.md").exists() and (tmp_path / "b" / "mergekit_config.yml").exists()
    with pytest.raises(MergeEngineError, match="write_model_card"):
        merge(parse_config(ties(base, e1, e2)), str(tmp_path / "c"), MergeOptions(write_model_card="no"))


def test_backticks_in_the_config_do_not_end_its_code_block(model_sets, tmp_path):
    base, e1, _, _ = model_sets("llama")
    text = (f"merge_method: linear\ndtype: float32\nchat_template: |\n  ```\n  {{{{ messages }}}}\n  ````\n"
            f"models:\n- model: {base}\n  parameters: {{weight: 1.0}}\n- model: {e1}\n  parameters: {{weight: 1.0}}\n")
    (tmp_path / "merge.yml").write_text(text)
    assert main([str(tmp_path / "merge.yml"), str(tmp_path / "out"), "--no-copy-tokenizer", "-q"]) == 0
    _, body = card(tmp_path / "out")
    assert body.endswith(f"`````yaml\n{text}`````\n")  # (a fence of 3 closed the block at the template's first line)
