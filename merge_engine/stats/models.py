"""Local Hugging Face model folders as the statistics collectors (and `key compare`) load them: checked
before any compute, built by transformers, refused when the checkpoint lacks some of the model's weights."""
from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager

import torch

from merge_engine.errors import CheckpointError, MergeEngineError
from merge_engine.extras import BUILDING_TRANSFORMERS_MODEL, require
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.experts import with_expert_layout
from merge_engine.io.writer import check_output_apart
from merge_engine.session import loaded_names

DEFAULT_MAX_LENGTH = 512
_POSITION_FIELDS = ("max_position_embeddings", "n_positions")  # Llama-like; GPT-2


def check_inputs_apart(out_dir: str, model_dir: str, data_path: str, tokenizer=None) -> None:
    """The output folder apart from the model folder, the data file and a tokenizer folder (io/writer.py:
    check_output_apart): --overwrite replaces OUT with all it holds, and a folder inside the model's would mix
    with it. Checked before anything is read."""
    inputs = [model_dir, data_path]
    if isinstance(tokenizer, (str, os.PathLike)):
        inputs.append(str(tokenizer))
    check_output_apart(out_dir, inputs)


def resolve_max_length(model_dir: str, config: dict, max_length: int | None) -> int:
    """Tokens per example: max_length, else DEFAULT_MAX_LENGTH or the model's position limit (from its config.json)
    when smaller. A max_length past the model's positions (max_position_embeddings) is refused, as the search's
    evaluators refuse longer inputs: the model would extrapolate its positions or index past them rather than run
    them."""
    field, limit = next(((f, config[f]) for f in _POSITION_FIELDS
                         if type(config.get(f)) is int and config[f] > 0), (None, None))
    if max_length is None:
        return DEFAULT_MAX_LENGTH if limit is None else min(DEFAULT_MAX_LENGTH, limit)
    if limit is not None and max_length > limit:
        raise MergeEngineError(f"--max-length {max_length} is more than the {limit} positions of {model_dir} "
                               f"({field} in its config.json); pass --max-length {limit} or less")
    return max_length


def vocab_size_of(config: dict) -> int | None:
    """The vocabulary size a config.json gives (its text model's for a multimodal one), or None."""
    for c in (config, config.get("text_config")):
        if isinstance(c, dict) and type(c.get("vocab_size")) is int and c["vocab_size"] > 0:
            return c["vocab_size"]
    return None


def check_model_folder(model_dir: str) -> dict:
    """The folder's config.json; fail early, naming the file, when the folder has no readable weights or
    config.json."""
    base, plus, adapter = model_dir.partition("+")
    if plus and base and adapter and not os.path.exists(model_dir):  # (a folder may have "+" in its name)
        raise CheckpointError(f"{model_dir}: a BASE+ADAPTER reference; statistics are computed from one model "
                              "folder (transformers loads it whole): merge the adapter into a model folder first")
    ckpt = Checkpoint(model_dir)
    ckpt.close()
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CheckpointError(f"{model_dir}: config.json is missing (needed to build the model)")
    return ckpt.config


def load_model(model_dir: str, dtype: torch.dtype | None, device: torch.device,
               auto_class: str = "AutoModelForCausalLM") -> torch.nn.Module:
    """The model of a local folder (a causal LM by default), refusing one whose checkpoint misses weights
    (they would be random)."""
    transformers = require("transformers", "hf", "loading a model folder")
    try:
        with BUILDING_TRANSFORMERS_MODEL, _no_loading_bar(transformers):
            model, info = getattr(transformers, auto_class).from_pretrained(
                model_dir, dtype=dtype or "auto", local_files_only=True, output_loading_info=True,
                trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{model_dir}: cannot load the model ({e})") from e
    missing = sorted(info["missing_keys"])
    if missing:
        raise CheckpointError(f"{model_dir}: the checkpoint lacks {len(missing)} weight(s) of the model, "
                              f"e.g. {missing[:3]}")
    return model.to(device)


@contextmanager
def _no_loading_bar(transformers):
    """Without transformers' "Loading weights" bar: noise beside the command's own progress (and shown under -q),
    and its tqdm starts a monitor thread that stays in the caller's process. The caller's setting is restored."""
    logging = transformers.utils.logging
    if not logging.is_progress_bar_enabled():
        yield
        return
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.enable_progress_bar()


def auto_class_of(model_dir: str) -> str:
    """The class config.json names (BertForSequenceClassification...), so modules are named as the
    checkpoint's weights are (bert.encoder..., with the head); AutoModel when it names none transformers has."""
    transformers = require("transformers", "hf", "loading a model folder")
    architectures = Checkpoint(model_dir).config.get("architectures") or []
    return next((a for a in architectures if hasattr(transformers, a)), "AutoModel")


def checkpoint_naming(model: torch.nn.Module, model_dir: str) -> Callable[[str], str]:
    """A function giving a model's parameter name as a merge of the folder reads it (the checkpoint's name, its
    MoE experts fused as io/experts.py does), so that the merge finds the statistics: transformers 5 renames some
    checkpoints' tensors as it loads them (session.loaded_names: GPT-NeoX's embed_out is lm_head), loads a
    checkpoint saved without the model's base_model_prefix (the published GPT-2's `h.0.attn...` into
    `transformer.h.0.attn...`), and one saved with it into a bare model."""
    ckpt = Checkpoint(model_dir)
    try:
        stored = set(with_expert_layout(ckpt, "fused").tensors)
    finally:
        ckpt.close()
    unrenamed = {loaded: name for name, loaded in loaded_names(model, sorted(stored), model.state_dict()).items()}
    prefix = f"{getattr(model, 'base_model_prefix', '')}."

    def stored_name(name: str) -> str:
        if name in unrenamed:
            return unrenamed[name]
        if name in stored or prefix == ".":
            return name
        if name.startswith(prefix) and name[len(prefix):] in stored:
            return name[len(prefix):]
        return prefix + name if prefix + name in stored else name
    return stored_name
