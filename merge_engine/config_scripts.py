"""The configs that mergekit 0.1.5's config-writing commands write, run as any config is run
(`merge-engine legacy`, `merge-engine layershuffle`, `merge-engine bakllama`):

    legacy_config(...)        mergekit-legacy: models, a method and per-model density/weight from the command line
    layershuffle_config(...)  mergekit-layershuffle: a passthrough stack whose every layer comes from a model drawn at
                              random (by --weight), or (full_random) random layers of each model in a random order
    bakllama_config(...)      bakllama: a passthrough stack of layer slices from a bakllama YAML file

Each returns the mergekit config as a mapping (what the command's --print-yaml prints); the commands then merge it
like `merge-engine CONFIG OUT`.
"""
from __future__ import annotations

import logging
import random
from typing import Any

import yaml

from merge_engine.errors import ConfigError

log = logging.getLogger("merge_engine")


def legacy_config(models: list[str], method: str = "ties", base_model: str | None = None,
                  density: list[float] = (), weight: list[float] = (), normalize: bool = True,
                  int8_mask: bool = False, bf16: bool = False, naive_count: bool = False) -> dict[str, Any]:
    """mergekit-legacy's config: the models (and the base, last, where it is not among them), one density or one
    weight for all or one per model in that order, slerp's t as its one weight; normalize, int8_mask and
    naive_count (consensus_method: count) as config parameters."""
    entries = [{"model": m, "parameters": {}} for m in models]
    if base_model and base_model not in models:
        entries.append({"model": base_model, "parameters": {}})
    parameters: dict[str, Any] = {}
    _per_model(entries, "density", list(density))
    if method == "slerp":
        if len(weight) != 1:
            raise ConfigError([f"slerp takes exactly one --weight (its t), got {len(weight)}"])
        parameters["t"] = weight[0]
    else:
        _per_model(entries, "weight", list(weight))
    if int8_mask:
        parameters["int8_mask"] = True
    if naive_count:
        parameters["consensus_method"] = "count"
    parameters["normalize"] = normalize
    config = {"merge_method": method, "models": entries, "parameters": parameters}
    if base_model:
        config["base_model"] = base_model
    if bf16:
        config["dtype"] = "bfloat16"
    return config


def _per_model(entries: list[dict], key: str, values: list[float]) -> None:
    if len(values) == 1:
        values = values * len(entries)
    if len(values) > len(entries):
        raise ConfigError([f"{len(values)} --{key} values for {len(entries)} models (give one, or one per model in "
                           "the order of --merge, the base last where it is not among them)"])
    for entry, value in zip(entries, values):
        entry["parameters"][key] = value


def layershuffle_config(models: list[str], layers: dict[str, int], weight: list[float] = (),
                        full_random: bool = False, fp16: bool = False,
                        rng: random.Random | None = None) -> dict[str, Any]:
    """mergekit-layershuffle's config. layers: each model's layer count. Without full_random, each of the first
    model's layer positions comes from a model drawn with probabilities proportional to weight (equal without),
    runs of one model joined into one slice. With full_random, each model gives int(its layers * its weight)
    layers, each a random one of its first that many, and all are shuffled."""
    rng = rng or random.Random()
    weights = list(weight) or None
    if weights is not None and len(weights) != len(models):
        raise ConfigError([f"{len(weights)} --weight values for {len(models)} models: give one per model"])
    if full_random and (weights is None or not all(0 <= w <= 1 for w in weights)):
        raise ConfigError(["--full-random takes one --weight per model between 0 and 1: the fraction of its layers "
                           "it gives"])
    if weights is not None and (any(w < 0 for w in weights) or not sum(weights) > 0):
        raise ConfigError([f"--weight values {weights}: none may be negative, and their sum must be positive"])
    slices: list[list] = []  # [model, start, end]
    if full_random:
        for model, fraction in zip(models, weights):
            count = int(layers[model] * fraction)
            slices += [[model, i, i + 1] for i in (rng.randrange(0, count) for _ in range(count))]
        rng.shuffle(slices)
    else:
        for position in range(layers[models[0]]):
            model = rng.choices(models, weights=weights, k=1)[0]
            if slices and slices[-1][0] == model:
                slices[-1][2] = position + 1
            else:
                slices.append([model, position, position + 1])
    config = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": m, "layer_range": [start, end]}]} for m, start, end in slices]}
    if fp16:
        config["dtype"] = "float16"
    return config


def bakllama_config(text: str, fp16: bool = False, source: str = "<bakllama config>") -> dict[str, Any]:
    """bakllama's config: each `layer_slices` entry (model, start, end, optional scale applied to down_proj) one
    passthrough slice. (mergekit 0.1.5's bakllama builds a config its own schema refuses; embedding_source and
    lm_head_source are read by neither: the first slice gives the embeddings, the last the head.)"""
    raw = yaml.safe_load(text)
    problems = []
    entries = raw.get("layer_slices") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(["'layer_slices' must be a non-empty list of {model, start, end, scale}"], source)
    for key in ("embedding_source", "lm_head_source"):
        if raw.get(key) is not None:
            log.warning("%s: %s is ignored (as bakllama ignores it): the first slice gives the embeddings and the "
                        "last the head", source, key)
    slices = []
    for i, entry in enumerate(entries):
        where = f"layer_slices[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) \
                or any(type(entry.get(k)) is not int for k in ("start", "end")):
            problems.append(f"{where}: needs model (a string), start and end (whole numbers)")
            continue
        unknown = set(entry) - {"model", "start", "end", "scale"}
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        source_entry = {"model": entry["model"], "layer_range": [entry["start"], entry["end"]]}
        if entry.get("scale") is not None:
            if isinstance(entry["scale"], bool) or not isinstance(entry["scale"], (int, float)):
                problems.append(f"{where}: scale must be a number")
            source_entry["parameters"] = {"scale": [{"filter": "down_proj", "value": entry["scale"]}]}
        slices.append({"sources": [source_entry]})
    if problems:
        raise ConfigError(problems, source)
    config = {"merge_method": "passthrough", "slices": slices}
    if fp16:
        config["dtype"] = "float16"
    return config
