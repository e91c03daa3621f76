"""The modules of multi-module architectures (a vision tower beside a language model, an encoder and a decoder),
as mergekit's `modules:` configs name them: which tensors each module holds, and where config.json keeps its
layer count.

A tensor belongs to the module with the longest prefix of its name. Both the names checkpoints are stored with
(`language_model.model.layers...`, as transformers 4 wrote them and transformers 5 still saves them) and
transformers 5's in-memory names (`model.language_model.layers...`) are listed, so either kind of folder is split
the same way. An architecture missing here has one module, named `default` as in mergekit.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODULE = "default"


@dataclass(frozen=True)
class ModuleLayout:
    prefixes: tuple[str, ...]  # tensor-name prefixes of the module's tensors
    layer_keys: tuple[str, ...] = ()  # config.json keys ("text_config.num_hidden_layers") that count its layers


def _vision_language(text: ModuleLayout, vision: tuple[str, ModuleLayout], projector: ModuleLayout
                     ) -> dict[str, ModuleLayout]:
    return {"text_decoder": text, vision[0]: vision[1], "multi_modal_projector": projector}


_TEXT_COUNT = ("text_config.num_hidden_layers",)
# Llava-style models: the language model, a vision tower and a projector under their own prefixes
_LLAVA_STYLE = _vision_language(
    ModuleLayout(("language_model.", "model.language_model.", "lm_head."), _TEXT_COUNT),
    ("vision_tower", ModuleLayout(("vision_tower.", "model.vision_tower."), ("vision_config.num_hidden_layers",))),
    ModuleLayout(("multi_modal_projector.", "model.multi_modal_projector.")))
# Qwen2-VL and Qwen2.5-VL: the language model at the top (`model.layers`), the vision tower under `visual.`, its
# merger (the projector) inside it
_QWEN2_VL = _vision_language(
    ModuleLayout(("model.", "lm_head."), ("num_hidden_layers", *_TEXT_COUNT)),
    ("vision_tower", ModuleLayout(("visual.", "model.visual."), ("vision_config.depth",))),
    ModuleLayout(("visual.merger.", "model.visual.merger.")))
# Qwen3-VL: the same parts, all under `model.`; the projector also holds the deepstack mergers (a stack of its own)
_QWEN3_VL = _vision_language(
    ModuleLayout(("model.language_model.", "lm_head."), _TEXT_COUNT),
    ("vision_tower", ModuleLayout(("model.visual.",), ("vision_config.depth",))),
    ModuleLayout(("model.visual.merger.", "model.visual.deepstack_merger_list.")))

MODULES: dict[str, dict[str, ModuleLayout]] = {  # config.json's architectures[0] -> module name -> layout
    "Qwen2VLForConditionalGeneration": _QWEN2_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN2_VL,
    "Qwen3VLForConditionalGeneration": _QWEN3_VL,
    "Qwen3VLMoeForConditionalGeneration": _QWEN3_VL,
    "Mistral3ForConditionalGeneration": _LLAVA_STYLE,
    "Gemma3ForConditionalGeneration": _LLAVA_STYLE,
    "Llama4ForConditionalGeneration": {
        **{k: v for k, v in _LLAVA_STYLE.items() if k != "vision_tower"},
        "vision_model": ModuleLayout(("vision_model.", "model.vision_model."), ("vision_config.num_hidden_layers",))},
    "T5ForConditionalGeneration": {
        "encoder": ModuleLayout(("encoder.",), ("num_layers",)),
        "decoder": ModuleLayout(("decoder.",), ("num_decoder_layers",)),
        "shared": ModuleLayout(("shared.", "lm_head."))},
    "WhisperForConditionalGeneration": {
        "encoder": ModuleLayout(("model.encoder.",), ("encoder_layers",)),
        "decoder": ModuleLayout(("model.decoder.", "proj_out."), ("decoder_layers",))},
}


def module_layouts(config: dict) -> dict[str, ModuleLayout] | None:
    """The modules of a model with several (None: one, `default`), from its config.json."""
    architectures = config.get("architectures") or [None]
    return MODULES.get(architectures[0])


def module_of(layouts: dict[str, ModuleLayout], name: str) -> str | None:
    """The module holding tensor `name` (None: no module's prefix starts it)."""
    best, length = None, -1
    for module, layout in layouts.items():
        for prefix in layout.prefixes:
            if name.startswith(prefix) and len(prefix) > length:
                best, length = module, len(prefix)
    return best


def config_scope(config: dict, path: str) -> dict | None:
    """The sub-config at a dotted path ("" for config itself, "text_config"), or None where there is none."""
    for part in filter(None, path.split(".")):
        config = config.get(part)
        if not isinstance(config, dict):
            return None
    return config


def with_config_value(config: dict, key: str, value) -> dict:
    """config with a dotted key ("vision_config.depth") set to value where config has that key (copying the
    sub-configs on its path, so the given config is left as it is); config itself where it lacks the key."""
    head, _, rest = key.partition(".")
    if not rest:
        return {**config, head: value} if head in config else config
    inner = config.get(head)
    if not isinstance(inner, dict):
        return config
    updated = with_config_value(inner, rest, value)
    return config if updated is inner else {**config, head: updated}
