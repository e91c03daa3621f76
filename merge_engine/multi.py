"""Multi-stage merges: mergekit-multi's YAML files, several merge configs (`---` between them), each named by a
`name:` key but at most one (the final merge), whose models may be earlier merges by name.

A named merge is written to INTERMEDIATE_DIR/NAME, the unnamed one to OUT_PATH; a model reference whose path is
a merge's name (in any reference: a model, a base model, a tokenizer source, BASE+ADAPTER, mergekit's mapping
form) reads that merge's output. Every config is checked before the first merge; the merges run in dependency
order, and with `lazy` a merge whose output already holds config.json and weights is not run again.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from merge_engine.config import MergeConfig, parse_config, read_yaml_documents
from merge_engine.engine import MergeOptions, MergeReport, merge
from merge_engine.errors import ConfigError, MergeEngineError, OutputError
from merge_engine.io.hub_cache import local_reference
from merge_engine.io.lora import open_model
from merge_engine.io.writer import check_output_apart, check_output_dir

log = logging.getLogger("merge_engine")
# what says a merge's output is complete, as mergekit-multi checks it: config.json and one of these
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class Stage:
    name: str | None  # None: the final merge
    config: MergeConfig  # its references to other stages replaced by their output folders
    out_dir: str
    needs: list[str]  # the stages whose outputs it reads


def plan_stages(path: str, intermediate_dir: str, out_path: str | None = None, strict: bool = False,
                hub_cache: str | None = None) -> list[Stage]:
    """The merges of a multi-stage YAML file, each checked, in an order where every merge follows those it reads;
    ConfigError listing every problem of every document, and of the model folders they read that exist before the
    first merge (hub_cache: where Hub references are looked up, as MergeOptions.hub_cache)."""
    problems: list[str] = []
    named = _named_documents(read_yaml_documents(path, strict), problems)
    if not named and not problems:
        problems.append("no merge config in the file")
    if None in named and out_path is None:
        problems.append("the file has a merge without a name (the final merge): give its output folder (--out-path)")
    if problems:
        raise ConfigError(problems, path)
    if None not in named and out_path is not None:
        log.warning("%s: every merge has a name (each goes to the intermediate folder): --out-path %s is not written",
                    path, out_path)
    folders = {name: os.path.join(intermediate_dir, name) for name in named if name is not None}
    stages = {}
    for name, raw in named.items():
        resolved = _with_stage_folders(raw, folders)
        try:
            config = parse_config(resolved, source=f"{path} ({_stage(name)})", strict=strict)
        except ConfigError as e:
            problems += [f"{_stage(name)}: {p}" for p in e.problems]
            continue
        stages[name] = Stage(name, config, folders.get(name, out_path), _stages_read(config, folders))
        problems += [f"{_stage(name)}: {p}" for p in _folder_problems(config, set(folders.values()), hub_cache,
                                                                       stages[name].out_dir)]
    problems += _output_overlaps(stages)
    if problems:
        raise ConfigError(problems, path)
    return _in_dependency_order(stages, path)


def _named_documents(documents: list[Any], problems: list[str]) -> dict[str | None, dict]:
    """Each document's config (less its `name:`) by its name (None: the final merge); problems appended."""
    named: dict[str | None, dict] = {}
    for i, document in enumerate(documents):
        if not isinstance(document, dict):
            problems.append(f"document {i + 1}: expected a merge config (a mapping), got {type(document).__name__}")
            continue
        name = document.get("name")
        if name is not None and not _is_stage_name(name):
            problems.append(f"document {i + 1}: name {name!r} is not a folder name (one path component: no '/', "
                            "not '.' or '..')")
        elif name in named:
            problems.append(f"document {i + 1}: " + (f"the name {name!r} is given twice" if name is not None else
                                                     "a second merge without a name (only the final merge has none)"))
        else:
            named[name] = {k: v for k, v in document.items() if k != "name"}
    return named


def run_stages(stages: list[Stage], options: MergeOptions, lazy: bool = True) -> list[MergeReport | None]:
    """Merge each stage in order (None for one skipped: lazy, and its output complete); the output folders of
    those to merge are checked first, so that one refused (not empty, no --overwrite) does not stop the run after
    the merges before it have written theirs."""
    for stage in stages:
        if not (lazy and is_complete(stage.out_dir)):
            check_output_dir(stage.out_dir, options.overwrite)
    reports = []
    for stage in stages:
        if lazy and is_complete(stage.out_dir):
            log.info("%s: %s holds a merged model already; not merged again (lazy)", _stage(stage.name), stage.out_dir)
            reports.append(None)
            continue
        log.info("%s -> %s", _stage(stage.name), stage.out_dir)
        reports.append(merge(stage.config, stage.out_dir, options))
    return reports


def _stages_read(config: MergeConfig, folders: dict[str, str]) -> list[str]:
    """The merges whose output folders config reads (a model or the tokenizer source, named by the merge's name,
    now that folder, or by the folder's path): it runs after them."""
    tokenizer = [config.tokenizer.source] if config.tokenizer else []
    paths = {ref.partition("+")[0].partition("@")[0] for ref in config.referenced_models() + tokenizer}
    return sorted(name for name, folder in folders.items() if folder in paths)


def _folder_problems(config: MergeConfig, stage_folders: set[str], hub_cache: str | None, out_dir: str) -> list[str]:
    """What is wrong with the model folders a stage reads that are no stage's output (missing, unreadable
    headers, its output folder inside one or holding one), found before any merge runs."""
    problems, read = [], []
    for ref in config.referenced_models():
        if ref.partition("+")[0].partition("@")[0] in stage_folders:
            continue
        try:
            local = local_reference(ref, hub_cache)
            read += local.split("+")
            open_model(local).close()
        except MergeEngineError as e:
            problems.append(str(e))
    try:  # (the merge checks it too, but only once the stages before it have run)
        check_output_apart(out_dir, read)
    except OutputError as e:
        problems.append(str(e))
    return problems


def _output_overlaps(stages: dict[str | None, Stage]) -> list[str]:
    """Two merges whose output folders are one or one inside the other: the later would replace the earlier's output
    (or, lazy, take it for its own and not run), or an --overwrite delete it with the folder it replaces."""
    problems = []
    outputs = [(name, os.path.realpath(stage.out_dir)) for name, stage in stages.items()]
    for i, (name, out) in enumerate(outputs):
        for other, other_out in outputs[i + 1:]:
            if os.path.commonpath([out, other_out]) in (out, other_out):
                problems.append(f"{_stage(name)} and {_stage(other)} write to {stages[name].out_dir} and "
                                f"{stages[other].out_dir}, one the other or inside it: give them folders apart")
    return problems


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json")) and any(
        os.path.isfile(os.path.join(folder, f)) for f in WEIGHT_FILES)


def _stage(name: str | None) -> str:
    return f"merge {name!r}" if name is not None else "the final merge"


def _is_stage_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _with_stage_folders(raw: Any, folders: dict[str, str]) -> Any:
    """raw with every model reference whose path is a stage's name made that stage's output folder. References are where mergekit's schema has them: base models, models and slice sources (in
    modules too), tokenizer sources."""
    def reference(value: Any) -> Any:
        if isinstance(value, str):  # PATH[@REVISION][+ADAPTER]: the model's path, as mergekit-multi renames it
            model, plus, adapter = value.partition("+")
            path, at, revision = model.partition("@")
            return folders[path] + at + revision + plus + adapter if path in folders else value
        if isinstance(value, dict) and "model" in value:  # mergekit's mapping form: {model: PATH | {path, revision}}
            model = value["model"]
            if isinstance(model, dict) and model.get("path") in folders:
                return {**value, "model": {**model, "path": reference(model["path"])}}
            return {**value, "model": reference(model)} if isinstance(model, str) else value
        return value

    def entries(container: dict) -> dict:
        out = dict(container)
        if isinstance(out.get("models"), list):
            out["models"] = [{**m, "model": reference(m.get("model"))} if isinstance(m, dict) else m
                             for m in out["models"]]
        if isinstance(out.get("slices"), list):
            out["slices"] = [_slice(s, reference) for s in out["slices"]]
        return out

    if not isinstance(raw, dict):
        return raw
    out = entries(raw)
    for key in ("base_model", "tokenizer_source"):
        if key in out:
            out[key] = reference(out[key])
    if isinstance(out.get("modules"), dict):
        out["modules"] = {k: entries(m) if isinstance(m, dict) else m for k, m in out["modules"].items()}
    if isinstance(out.get("tokenizer"), dict):
        out["tokenizer"] = _tokenizer(out["tokenizer"], reference)
    return out


def _slice(s: Any, reference) -> Any:
    if not isinstance(s, dict):
        return s
    out = dict(s)
    if "base_model" in out:
        out["base_model"] = reference(out["base_model"])
    if isinstance(out.get("sources"), list):
        out["sources"] = [{**src, "model": reference(src.get("model"))} if isinstance(src, dict) else src
                          for src in out["sources"]]
    return out


def _tokenizer(tokenizer: dict, reference) -> dict:
    out = dict(tokenizer)
    if "source" in out:
        out["source"] = reference(out["source"])
    if isinstance(out.get("tokens"), dict):
        tokens = {}
        for token, setting in out["tokens"].items():
            if isinstance(setting, dict) and "source" in setting:
                source = setting["source"]
                source = ({**source, "model": reference(source["model"])}
                          if isinstance(source, dict) and source.get("kind") == "model_token" else reference(source))
                setting = {**setting, "source": source}
            tokens[token] = setting
        out["tokens"] = tokens
    return out


def _in_dependency_order(stages: dict[str | None, Stage], path: str) -> list[Stage]:
    """Stages ordered so that each follows the ones it reads (the file's order where free); ConfigError naming a
    cycle."""
    ordered: list[Stage] = []
    state: dict[str | None, str] = {}

    def visit(name: str | None, trail: list[str | None]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = trail[trail.index(name):] + [name]
            raise ConfigError([f"the merges read each other in a cycle: {' -> '.join(map(str, cycle))}"], path)
        state[name] = "visiting"
        for need in stages[name].needs:
            visit(need, trail + [name])
        state[name] = "done"
        ordered.append(stages[name])

    for name in stages:
        visit(name, [])
    return ordered
