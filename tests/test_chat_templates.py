"""Chat templates: the built-ins render their published formats (and mergekit's text where mergekit's
templates are right), and the engine writes the configured template into the output tokenizer."""
import glob
import os
import shutil

import pytest
import transformers

from merge_engine import MergeOptions, merge, parse_config
from merge_engine.chat_templates import BUILT_IN, CHATML, resolve_chat_template
from merge_engine.errors import ConfigError
from tests.conftest import find_mergekit
from tests.stats.tiny_text import tiny_tokenizer

SYSTEM, USER, ASSISTANT = ({"role": r, "content": c} for r, c in
                           (("system", "Be brief. "), ("user", " Hi?"), ("assistant", "Hello. ")))
CONVERSATIONS = [[USER], [USER, ASSISTANT, USER], [SYSTEM, USER, ASSISTANT], [SYSTEM, USER, ASSISTANT, USER]]

# The published format of each, for [SYSTEM, USER, ASSISTANT, USER] and a generation prompt.
PUBLISHED = {
    "chatml": "<|im_start|>system\nBe brief. <|im_end|>\n<|im_start|>user\n Hi?<|im_end|>\n"
              "<|im_start|>assistant\nHello. <|im_end|>\n<|im_start|>user\n Hi?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s> [INST] Be brief. \n\n Hi? [/INST] Hello. </s> [INST]  Hi? [/INST]",
    "alpaca": "Be brief.\n\n### Instruction:\nHi?\n\n### Response:\nHello.\n\n### Instruction:\nHi?\n\n"
              "### Response:\n",
    "exaone": "[|system|]Be brief. [|endofturn|]\n[|user|] Hi?\n[|assistant|]Hello. [|endofturn|]\n"
              "[|user|] Hi?\n[|assistant|]",
}


def render(template, conversation, generation_prompt):
    tok = tiny_tokenizer()
    tok.bos_token, tok.eos_token, tok.chat_template = "<s>", "</s>", template
    return tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_built_ins_render_the_published_format(name):
    assert render(BUILT_IN[name], [SYSTEM, USER, ASSISTANT, USER], True) == PUBLISHED[name]


def test_mistral_refuses_roles_out_of_turn():
    with pytest.raises(Exception, match="must alternate"):
        render(BUILT_IN["mistral"], [USER, USER], False)


def mergekit_templates():
    mergekit = find_mergekit()
    found = glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(mergekit or "/"))),
                                   "lib", "python*", "site-packages", "mergekit", "_data", "chat_templates"))
    if not found:
        pytest.skip("mergekit is not installed (set MERGEKIT_YAML or run tools/test.sh with MERGEKIT=1)")
    return found[0]


@pytest.mark.mergekit
@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_built_ins_against_mergekits(name):
    """chatml and mistral render as mergekit's; mergekit's llama3 ends every turn with a stray newline,
    and its alpaca starts with a blank line without a system message and runs the generation prompt
    into the last message; its exaone renders the template's indentation (so it is only checked above)."""
    with open(os.path.join(mergekit_templates(), f"{name}.jinja")) as f:
        theirs = f.read()
    for conversation in CONVERSATIONS:
        for prompt in (False, True):
            ours, want = render(BUILT_IN[name], conversation, prompt), render(theirs, conversation, prompt)
            if name == "llama3":
                want = want.replace("<|eot_id|>\n", "<|eot_id|>")
            elif name == "alpaca" and not (conversation[0] is SYSTEM and not prompt):
                continue
            elif name == "exaone":
                assert ours != want  # mergekit's output still holds the indentation, so this is checked above
                continue
            assert ours == want, (conversation, prompt)


def test_auto_takes_the_most_common_template_first_in_config_order_on_ties():
    assert resolve_chat_template("auto", ["b", "a ", "a", "b"]) == "b"
    assert resolve_chat_template("auto", ["x", "y", "y"]) == "y"
    assert resolve_chat_template("auto", []) is None
    assert resolve_chat_template("chatml", ["x"]) == CHATML
    assert resolve_chat_template("{{ raw }} template text", []) == "{{ raw }} template text"


def with_template(src, folder, template):
    shutil.copytree(src, folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.chat_template = template
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("setting", ["chatml", "auto", "raw"])
@pytest.mark.parametrize("tokenizer_source", [None, "union"])
def test_the_output_tokenizer_carries_the_template(vocab_models, tmp_path, setting, tokenizer_source):
    raw = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    models = [with_template(vocab_models["base"], tmp_path / "a", "{{ 'A' }}"),
              with_template(vocab_models["base"], tmp_path / "b", "{{ 'B' }}"),
              with_template(vocab_models["base"], tmp_path / "c", "{{ 'B' }}")]
    cfg = {"merge_method": "linear", "chat_template": raw if setting == "raw" else setting,
           "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}
    if tokenizer_source:
        cfg["tokenizer_source"] = tokenizer_source
    merge(parse_config(cfg), str(tmp_path / "out"), MergeOptions(quiet=True, device="cpu"))
    want = {"chatml": CHATML, "auto": "{{ 'B' }}", "raw": raw}[setting]
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == want


@pytest.mark.parametrize("bad", ["vicuna", "{x}", 3])
def test_an_unknown_template_is_refused(bad):
    with pytest.raises(ConfigError, match="chat_template"):
        parse_config({"merge_method": "linear", "chat_template": bad, "models": [{"model": "/a"}]})


def test_a_donor_without_a_loadable_tokenizer_still_merges(model_sets, tmp_path, caplog):
    base = model_sets("llama")[0]  # no tokenizer files
    cfg = {"merge_method": "linear", "chat_template": "chatml", "models": [{"model": base, "parameters": {"weight": 1}}]}
    merge(parse_config(cfg), str(tmp_path / "out"), MergeOptions(quiet=True, device="cpu"))
    assert (tmp_path / "out" / "model.safetensors").exists() and "chat template" in caplog.text
