"""Local Hugging Face model folders as the statistics collectors (and `key compare`) load them: checked
before any compute, built by transformers, refused when the checkpoint lacks some of the model's weights."""
from __future__ import annotations

import os

import torch

from merge_engine.errors import CheckpointError
from merge_engine.extras import require
from merge_engine.io.checkpoint import Checkpoint


def check_model_folder(model_dir: str) -> None:
    """Fail early, naming the file, when the folder has no readable weights or config.json."""
    Checkpoint(model_dir).close()
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CheckpointError(f"{model_dir}: config.json is missing (needed to build the model)")


def load_model(model_dir: str, dtype: torch.dtype | None, device: torch.device,
               auto_class: str = "AutoModelForCausalLM") -> torch.nn.Module:
    """The model of a local folder (a causal LM by default), refusing one whose checkpoint misses weights
    (they would be random)."""
    transformers = require("transformers", "hf", "loading a model folder")
    try:
        model, info = getattr(transformers, auto_class).from_pretrained(
            model_dir, dtype=dtype or "auto", local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{model_dir}: cannot load the model ({e})") from e
    missing = sorted(info["missing_keys"])
    if missing:
        raise CheckpointError(f"{model_dir}: the checkpoint lacks {len(missing)} weight(s) of the model, "
                              f"e.g. {missing[:3]}")
    return model.to(device)


def auto_class_of(model_dir: str) -> str:
    """The class config.json names (BertForSequenceClassification...), so modules are named as the
    checkpoint's weights are (bert.encoder..., with the head); AutoModel when it names none transformers has."""
    transformers = require("transformers", "hf", "loading a model folder")
    architectures = Checkpoint(model_dir).config.get("architectures") or []
    return next((a for a in architectures if hasattr(transformers, a)), "AutoModel")
