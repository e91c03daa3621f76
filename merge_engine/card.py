"""The output's model card (README.md, as mergekit writes one): what was merged and how, the config that makes it,
and the metadata Hugging Face model pages read (the models named by Hub id as base_model)."""
from __future__ import annotations

import re

import yaml

from merge_engine.config import MergeConfig

CARD = """---
{metadata}---
# {name}

This is a merge of pre-trained language models made with merge_engine.

## Merge method

This model was merged with the {method} merge method{base}.

## Models merged

{models}

## Configuration

This configuration makes this model (`merge-engine CONFIG.yml OUT`):

{fence}yaml
{config}
{fence}
"""


def model_card(config: MergeConfig, config_text: str) -> str:
    """The card of a merge of config (config_text: the config as the output's mergekit_config.yml holds it). Its
    title says what was merged, not where (mergekit's is the output folder's name): the same merge written to two
    folders is the same bytes, which is how a distributed merge is checked against one process (docs/distributed.md)."""
    shown = {ref: _shown(ref, config.hub_ids) for ref in config.referenced_models()}
    base = None if config.method.name == "slerp" else config.base_model  # (slerp's base is one of its two models)
    hub = list(dict.fromkeys(hub_id for ref in shown for hub_id in _hub_ids(ref, config.hub_ids)))
    metadata = yaml.safe_dump({"base_model": hub, "library_name": "transformers", "tags": ["merge", "merge_engine"]},
                              sort_keys=False)
    method = f"[{config.method.name}]({config.method.reference})" if config.method.reference else config.method.name
    name = f"A {config.method.name} merge of {len(shown)} model{'s' if len(shown) > 1 else ''}"
    card = CARD.format(metadata=metadata, name=name, method=method,
                       base=f" using {shown[base]} as a base" if base else "",
                       models="\n".join(f"* {text}" for ref, text in shown.items() if ref != base),
                       config=config_text.rstrip("\n"), fence=_fence(config_text))
    return card.encode("utf-8", "backslashreplace").decode("utf-8")  # a path's undecodable bytes, as \xNN escapes


def _fence(text: str) -> str:
    """A code fence longer than every run of backticks in text: a line of ``` in the config (a chat template's code
    block) would otherwise end the block there, and the rest of the config show as the card's Markdown."""
    return "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))


def _shown(ref: str, hub_ids: dict[str, str]) -> str:
    """A model reference as the card names it: each part (BASE, ADAPTER) by the Hub id it was found by, linked."""
    return " + ".join(f"[{hub_ids[part]}](https://huggingface.co/{hub_ids[part].partition('@')[0]})"
                      if part in hub_ids else part for part in ref.split("+"))


def _hub_ids(ref: str, hub_ids: dict[str, str]) -> list[str]:
    return [hub_ids[part].partition("@")[0] for part in ref.split("+") if part in hub_ids]


MOE_CARD = """---
{metadata}---
# A {architecture} mixture of {count} experts

This is a mixture-of-experts model made from pre-trained dense models with merge_engine (`merge-engine moe`).

## Models

Attention, norms and embeddings: {base}. Each layer's experts, and what routes tokens to them
(gate mode `{gate_mode}`, {per_token} expert{s} per token):

{experts}

## Configuration

This configuration makes this model (`merge-engine moe CONFIG.yml OUT`):

{fence}yaml
{config}
{fence}
"""


def moe_card(config, architecture: str) -> str:
    """The card of a mixture of experts built from config (a moe.MoEConfig, its text set), as `architecture`."""
    def expert(e, shared: bool) -> str:
        prompts = "; ".join(repr(p) for p in e.positive_prompts) or "no prompts"
        negative = f" (not {'; '.join(repr(p) for p in e.negative_prompts)})" if e.negative_prompts else ""
        return f"* {e.model}{' (shared expert)' if shared else ''}: {prompts}{negative}"
    lines = [expert(e, False) for e in config.experts] + [expert(e, True) for e in config.shared_experts]
    text = config.text or ""
    card = MOE_CARD.format(metadata=yaml.safe_dump({"library_name": "transformers",
                                                    "tags": ["merge", "merge_engine", "moe"]}, sort_keys=False),
                           architecture=architecture, count=len(config.experts), base=config.base_model,
                           gate_mode=config.gate_mode, per_token=config.experts_per_token,
                           s="s" if config.experts_per_token > 1 else "", experts="\n".join(lines),
                           config=text.rstrip("\n"), fence=_fence(text))
    return card.encode("utf-8", "backslashreplace").decode("utf-8")
