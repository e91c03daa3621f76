"""Hub references (org/name[@revision]) found in a Hugging Face cache laid out as huggingface_hub lays it out: the
same merge as of the local folders; what the cache lacks refused before anything is read; nothing downloaded."""
import hashlib
import os

import pytest
import yaml

from merge_engine import MergeOptions, MergeSession, cli, merge, parse_config
from merge_engine.errors import ConfigError
from merge_engine.io.hub_cache import resolve_references
from tests.conftest import folder_digest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache, repo_id: str, folder: str, commit: str = COMMIT, refs=("main",)) -> str:
    """folder's files as a cached snapshot of repo_id: blobs by content, the snapshot's files linking to them, refs
    naming the commit (huggingface_hub's cache layout)."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    for sub in (snapshot, os.path.join(repo, "blobs"), os.path.join(repo, "refs")):
        os.makedirs(sub, exist_ok=True)
    for name in os.listdir(folder):
        data = open(os.path.join(folder, name), "rb").read()
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
    for ref in refs:
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot


@pytest.fixture
def hub(model_sets, tmp_path):
    """(cache folder, local folders): the llama set cached as org/base, org/e1 (also at tag v1), org/e2 (at a
    commit only), and a LoRA adapter of e2 as org/adapter."""
    from tests.lora_adapters import write_adapter
    base, e1, e2, _ = model_sets("llama")
    write_adapter(str(tmp_path / "adapter"), e2, seed=4)
    cache = str(tmp_path / "cache")
    cache_repo(cache, "org/base", base)
    cache_repo(cache, "org/e1", e1, refs=("main", "v1"))
    cache_repo(cache, "org/e2", e2, commit="f" * 40, refs=())
    cache_repo(cache, "org/adapter", str(tmp_path / "adapter"))
    return cache, {"base": base, "e1": e1, "e2": e2, "adapter": str(tmp_path / "adapter")}


def ties(base: str, e1: str, e2: str, tokenizer_source: str | None = None) -> dict:
    return {"merge_method": "ties", "base_model": base, "dtype": "float32",
            **({"tokenizer_source": tokenizer_source} if tokenizer_source else {}),
            "models": [{"model": e1, "parameters": {"weight": 0.6, "density": 0.5}},
                       {"model": e2, "parameters": {"weight": 0.4, "density": 0.7}}]}


def test_hub_references_merge_as_their_cached_folders(hub, folder_tensors, tmp_path):
    cache, local = hub
    by_id = ties("org/base", "org/e1@v1", f"org/e2@{'f' * 40}+org/adapter")
    by_path = ties(local["base"], local["e1"], f"{local['e2']}+{local['adapter']}")
    merge(parse_config(by_id), str(tmp_path / "by_id"), MergeOptions(quiet=True, hub_cache=cache))
    merge(parse_config(by_path), str(tmp_path / "by_path"), MergeOptions(quiet=True))
    a, b = folder_tensors(tmp_path / "by_id"), folder_tensors(tmp_path / "by_path")
    assert a.keys() == b.keys() and all(a[n].equal(b[n]) for n in a)
    written = yaml.safe_load((tmp_path / "by_id" / "mergekit_config.yml").read_text())
    assert written["base_model"] == "org/base"  # the config as written, which reproduces the merge where cached


def test_tokenizer_sources_are_found_too(hub):
    cache, _ = hub
    config = parse_config(ties("org/base", "org/e1", "org/e2@" + "f" * 40)
                          | {"tokenizer": {"source": "org/e1", "tokens": {"<x>": {"source": "org/e1"}}}})
    resolved = resolve_references(config, cache)
    e1 = os.path.join(cache, "models--org--e1", "snapshots", COMMIT)
    assert resolved.tokenizer.source == e1 == resolved.tokenizer.tokens["<x>"].source.model
    assert resolved.referenced_models()[0] == os.path.join(cache, "models--org--base", "snapshots", COMMIT)
    assert config.tokenizer.source == "org/e1"  # the config given is left as it is


def test_a_hub_cache_that_is_not_a_path_is_refused_before_anything_is_read(model_sets, tmp_path):
    from merge_engine.errors import MergeEngineError
    base, e1, e2, _ = model_sets("llama")
    for bad in (3, b"/cache", ["/cache"]):
        with pytest.raises(MergeEngineError, match=r"hub_cache must be a folder path .* got "):
            merge(parse_config(ties(base, e1, e2)), str(tmp_path / "out"), MergeOptions(quiet=True, hub_cache=bad))
        with pytest.raises(MergeEngineError, match=r"hub_cache must be a folder path"):
            MergeSession(ties(base, e1, e2), "cpu", progress=False, hub_cache=bad)
    assert not os.path.exists(tmp_path / "out")


def test_a_tokenizer_source_named_by_hub_id_merges_as_its_cached_folder(vocab_models, tmp_path):
    # docs/methods.md: a tokenizer_source is refused only where it is neither a local folder nor cached
    cache = str(tmp_path / "cache")
    cache_repo(cache, "org/extra", vocab_models["extra"])
    outputs = {}
    for source in ("org/extra", vocab_models["extra"]):
        config = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": source,
                  "models": [{"model": vocab_models[m], "parameters": {"weight": 0.5}} for m in ("base", "extra")]}
        outputs[source] = tmp_path / source.replace("/", "_")
        merge(parse_config(config), str(outputs[source]), MergeOptions(quiet=True, hub_cache=cache))
    by_id, by_path = outputs.values()
    files = sorted(os.listdir(by_path))
    assert "tokenizer.json" in files and sorted(os.listdir(by_id)) == files
    for name in set(files) - {"mergekit_config.yml", "README.md"}:  # which hold the reference as given
        assert (by_id / name).read_bytes() == (by_path / name).read_bytes(), name


def test_what_the_cache_lacks_is_refused_by_reference_before_anything_is_read(hub, tmp_path):
    cache, _ = hub
    config = ties("org/base", "org/missing", "org/e1@v2")
    with pytest.raises(ConfigError) as e:
        merge(parse_config(config), str(tmp_path / "out"), MergeOptions(quiet=True, hub_cache=cache))
    text = str(e.value)
    assert "org/missing: not a local folder, and org/missing is not in the Hugging Face cache" in text
    assert "`hf download org/e1 --revision v2`" in text and cache in text
    assert not os.path.exists(tmp_path / "out")


def test_a_local_folder_is_read_whatever_revision_follows_it_as_in_mergekit(hub, folder_tensors, tmp_path):
    _, local = hub
    with_revision = ties(local["base"] + "@main", local["e1"] + "@v9", local["e2"])
    merge(parse_config(with_revision), str(tmp_path / "a"), MergeOptions(quiet=True))
    merge(parse_config(ties(local["base"], local["e1"], local["e2"])), str(tmp_path / "b"), MergeOptions(quiet=True))
    assert folder_digest(tmp_path / "a" / "model.safetensors") == folder_digest(tmp_path / "b" / "model.safetensors")


def test_more_than_one_revision_is_refused_as_mergekit_refuses_it():
    with pytest.raises(ConfigError, match=r"'org/e1@v1@v2': expected at most one @"):
        parse_config(ties("org/base", "org/e1@v1@v2", "org/e2"))


def test_paths_that_are_not_repository_ids_are_missing_folders(tmp_path):
    with pytest.raises(ConfigError, match="model path does not exist"):
        merge(parse_config(ties(str(tmp_path / "nowhere"), "org/a--b", "./x")), str(tmp_path / "out"),
              MergeOptions(quiet=True))


def test_the_command_line_and_a_session_find_them_too(hub, folder_tensors, tmp_path, monkeypatch):
    import huggingface_hub
    cache, local = hub
    config = ties("org/base", "org/e1", "org/e2@" + "f" * 40)
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main([str(path), str(tmp_path / "cli"), "--transformers-cache", cache, "-q"]) == 0
    want = folder_tensors(tmp_path / "cli")
    session = MergeSession(config, "cpu", progress=False, hub_cache=tmp_path / "cache")
    assert all(t.equal(want[n]) for n, t in session.state_dict().items())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)  # the default cache (HF_HUB_CACHE)
    session = MergeSession(config, "cpu", progress=False)
    assert all(t.equal(want[n]) for n, t in session.state_dict().items())
    step = session.merge(ties("org/base", "org/e1", "org/e2@" + "f" * 40) | {"parameters": {"normalize": False}})
    assert step.tensors > 0  # a config of other parameters names the same cached models


def test_a_bad_config_lists_only_its_own_problems_beside_models_cached_in_the_cache_given(hub, tmp_path, capsys):
    # the model folders of a config with problems are checked in the --transformers-cache too, not the default one
    cache, _ = hub
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(ties("org/base", "org/e1", "org/missing") | {"merge_method": "no_such_method"}))
    for call in (lambda: cli.main([str(path), str(tmp_path / "cli"), "--transformers-cache", cache]),
                 lambda: merge(str(path), str(tmp_path / "api"), MergeOptions(quiet=True, hub_cache=cache))):
        try:
            assert call() == 2
            said = capsys.readouterr().err
        except ConfigError as e:
            said = str(e)
        assert "no_such_method" in said and "`hf download org/missing`" in said
        assert "org/base:" not in said and "org/e1:" not in said and said.count(cache) == 1, said


def test_without_huggingface_hub_a_hub_reference_names_the_extra(monkeypatch, model_sets, tmp_path):
    import sys

    from merge_engine.extras import MissingExtraError
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    base, e1, e2, _ = model_sets("llama")
    merge(parse_config(ties(base, e1, e2)), str(tmp_path / "local"), MergeOptions(quiet=True))  # local: not needed
    with pytest.raises(MissingExtraError, match=r'^a model named by its Hugging Face Hub id needs huggingface_hub: '
                                                r'pip install "merge_engine\[hf\]"$'):
        merge(parse_config(ties(base, "org/e1", e2)), str(tmp_path / "out"), MergeOptions(quiet=True))


def test_a_moe_of_hub_references_is_the_moe_of_their_cached_folders(hub, folder_tensors, tmp_path):
    from merge_engine.moe import build_moe
    cache, local = hub

    def moe(base, e1, e2):
        return {"base_model": base, "gate_mode": "random", "experts": [{"source_model": e1}, {"source_model": e2}]}
    options = MergeOptions(quiet=True, device="cpu", hub_cache=cache)
    build_moe(moe("org/base", "org/e1@v1", f"org/e2@{'f' * 40}"), tmp_path / "hub", options)
    build_moe(moe(local["base"], local["e1"], local["e2"]), tmp_path / "local", options)
    hubbed, plain = folder_tensors(tmp_path / "hub"), folder_tensors(tmp_path / "local")
    assert hubbed.keys() == plain.keys() and all(t.equal(plain[n]) for n, t in hubbed.items())
