"""Model references that name Hugging Face Hub repositories (`org/name`, `org/name@revision`, either part of
BASE+ADAPTER), as mergekit's configs write them, found in the local Hugging Face cache.

A reference that is a local path is that folder, as in mergekit (a revision after it is ignored, as mergekit ignores
it); any other that is a repository id is looked up in the cache with huggingface_hub (the [hf] extra), the way
`from_pretrained(..., local_files_only=True)` finds it: the revision's snapshot folder, whose files link into the
repository's blobs (io/untrusted.py allows that). Nothing is downloaded (mergekit downloads what the cache lacks):
a merge reads only what is on the machine, and a reference the cache lacks is refused before anything is read,
with the command that fetches it.
"""
from __future__ import annotations

import dataclasses
import os
import re

from merge_engine.config import MergeConfig
from merge_engine.errors import CheckpointError, ConfigError, MergeEngineError
from merge_engine.extras import require

# huggingface_hub's repository id rule (validate_repo_id): an optional namespace, a name of at most 96 characters
_REPO_ID = re.compile(r"(?:\b[\w.-]+\b/)?\b[\w.-]{1,96}\b")


def cache_folder(hub_cache) -> str | None:
    """MergeOptions.hub_cache (or a session's) as a path, or MergeEngineError before anything is read."""
    if hub_cache is not None and not isinstance(hub_cache, (str, os.PathLike)):
        raise MergeEngineError(f"hub_cache must be a folder path (a string or os.PathLike) or None, got {hub_cache!r}")
    return None if hub_cache is None else os.fspath(hub_cache)


def local_reference(ref: str, cache_dir: str | None = None) -> str:
    """ref with each part (BASE, ADAPTER) that names a cached Hub repository replaced by its snapshot folder; parts
    that are local paths, or not repository ids, as they are (opening them says what is wrong)."""
    base, plus, adapter = ref.partition("+")
    return _local_part(base, cache_dir) + (plus + _local_part(adapter, cache_dir) if plus else "")


def resolve_references(cfg: MergeConfig, cache_dir: str | None = None) -> MergeConfig:
    """cfg with every model reference local (local_reference); all references the cache lacks are named in one
    ConfigError."""
    local, problems = {}, []
    for ref in cfg.referenced_models() + _tokenizer_models(cfg):
        try:
            local[ref] = local_reference(ref, cache_dir)
        except CheckpointError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(problems, "inputs")
    if all(ref == path for ref, path in local.items()):
        return cfg
    hub_ids = dict(cfg.hub_ids)  # each part (BASE, ADAPTER) found in the cache, by its snapshot folder
    for ref, path in local.items():
        hub_ids.update((local_part, part) for part, local_part in zip(ref.split("+"), path.split("+")) if part != local_part)
    return dataclasses.replace(_with_references(cfg, lambda ref: local.get(ref, ref)), hub_ids=hub_ids)


def _local_part(part: str, cache_dir: str | None) -> str:
    if os.path.exists(part):
        return part
    name, at, revision = part.partition("@")
    if at and os.path.exists(name):
        return name
    if "@" in revision or not _REPO_ID.fullmatch(name) or "--" in name or ".." in name:
        return part  # not a repository id: a path that does not exist
    hub = require("huggingface_hub", "hf", "a model named by its Hugging Face Hub id")
    try:
        return hub.snapshot_download(name, revision=revision or None, cache_dir=cache_dir, local_files_only=True)
    except Exception as e:  # huggingface_hub: LocalEntryNotFoundError (not cached), HFValidationError, OSError
        where = cache_dir or hub.constants.HF_HUB_CACHE
        raise CheckpointError(
            f"{part}: not a local folder, and {name}{' at ' + revision if revision else ''} is not in the Hugging "
            f"Face cache ({where}; {type(e).__name__}). merge_engine downloads nothing: fetch it first, for example "
            f"`hf download {name}{' --revision ' + revision if revision else ''}`, or name a local folder") from None


def _tokenizer_models(cfg: MergeConfig) -> list[str]:
    """Models a tokenizer setting names that are not merged (mergekit loads their tokenizers too)."""
    if cfg.tokenizer is None or cfg.tokenizer.source in ("union", "base"):
        return []
    return [cfg.tokenizer.source]


def _with_references(cfg: MergeConfig, local) -> MergeConfig:
    """A copy of cfg whose model references (sources, bases, tokenizer sources) are local(ref)."""
    slices = [dataclasses.replace(s, base_model=s.base_model and local(s.base_model),
                                  sources=[dataclasses.replace(src, model=local(src.model)) for src in s.sources])
              for s in cfg.slices]
    tokenizer = cfg.tokenizer
    if tokenizer is not None:
        tokens = {name: dataclasses.replace(setting, source=setting.source and dataclasses.replace(
            setting.source, model=setting.source.model and local(setting.source.model)))
            for name, setting in tokenizer.tokens.items()}
        source = tokenizer.source if tokenizer.source in ("union", "base") else local(tokenizer.source)
        tokenizer = dataclasses.replace(tokenizer, source=source, tokens=tokens)
    return dataclasses.replace(cfg, slices=slices, base_model=cfg.base_model and local(cfg.base_model),
                               tokenizer=tokenizer)
