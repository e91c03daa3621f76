"""Chat templates a config can name (`chat_template: chatml`), as Jinja for transformers' renderer.

Each renders its model family's published prompt format. chatml and mistral render exactly as mergekit
0.1.5's templates of the same names; its llama3, alpaca and exaone templates render stray whitespace
(see the README), which these leave out. tests/test_chat_templates.py checks both.
"""
from __future__ import annotations

from collections import Counter

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

LLAMA3 = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

# [INST] turns; an optional first system message joins the first user turn.
MISTRAL = (
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% set turns = messages[1:] if system is not none else messages %}"
    "{{ bos_token }}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != loop.index0 is even %}"
    "{{ raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{% elif message['role'] == 'user' and loop.first and system is not none %}"
    "{{ ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'user' %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}"
    "{% endif %}"
    "{% endfor %}")

# The last system message, then "### Instruction/Input/Response" sections a blank line apart.
ALPACA = (
    "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{% if systems %}{{ (systems | last).content | trim + '\\n\\n' }}{% endif %}"
    "{% set headers = {'user': 'Instruction', 'assistant': 'Response', 'user_context': 'Input'} %}"
    "{% for message in messages if message['role'] in headers %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### ' + headers[message['role']] + ':\\n' + message['content'] | trim }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '\\n\\n### Response:\\n' }}"
    "{% endif %}")

# [|role|] turns; a conversation without a system message starts with an empty one.
EXAONE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{{ '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}")

BUILT_IN = {"alpaca": ALPACA, "chatml": CHATML, "exaone": EXAONE, "llama3": LLAMA3, "mistral": MISTRAL}


def resolve_chat_template(setting: str, model_templates: list[str]) -> str | None:
    """The template text for a config's `chat_template`. "auto" takes the template most of the inputs'
    tokenizers carry (ties: the first in config order), or None when none carries one."""
    if setting == "auto":
        counts = Counter(t.strip() for t in model_templates if t)
        return counts.most_common(1)[0][0] if counts else None
    return BUILT_IN.get(setting, setting)
