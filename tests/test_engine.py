"""End-to-end merges on generated checkpoints: loadable output, side files, sharding, slices,
and peak memory that does not grow with the number of layers."""
import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from merge_engine import MergeOptions, merge, parse_config
from merge_engine.errors import MergeEngineError
from merge_engine.io.buffers import BufferPool
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.ops import backends

pytestmark = pytest.mark.slow


def ties(base, experts, dtype="float32"):
    return {"merge_method": "ties", "base_model": base, "dtype": dtype, "parameters": {"normalize": True},
            "models": [{"model": e, "parameters": {"weight": [0.2, 0.8], "density": 0.4}} for e in experts]}


@pytest.mark.parametrize("key,dtype", [("llama", "float32"), ("llama_bf16_sharded", "bfloat16"),
                                       ("qwen2", "float32"), ("gpt2", "float32")])
def test_output_loads_with_transformers(folder_tensors, model_sets, tmp_path, key, dtype):
    base, *experts = model_sets(key)
    out = tmp_path / "merged"
    report = merge(parse_config(ties(base, experts, dtype)), str(out), MergeOptions(quiet=True, out_shard_size=150_000))
    tensors = folder_tensors(out)
    assert report.tensors == len(tensors) == len(Checkpoint(base).tensors)
    assert all(t.dtype == getattr(torch, dtype) for t in tensors.values() if t.is_floating_point())
    cfg = json.loads((out / "config.json").read_text())
    donor = json.loads((Path(base) / "config.json").read_text())
    assert cfg["dtype"] == dtype and ("torch_dtype" in cfg) == ("torch_dtype" in donor)  # mergekit writes "dtype"
    assert (out / "mergekit_config.yml").exists() and (out / "generation_config.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    logits = model(torch.arange(12)[None]).logits
    assert logits.shape == (1, 12, 256) and torch.isfinite(logits).all()


def test_merge_is_deterministic_and_not_trivial(folder_tensors, model_sets, tmp_path):
    base, *experts = model_sets("llama")
    a, b = tmp_path / "a", tmp_path / "b"
    cfg = {"merge_method": "dare_ties", "base_model": base,
           "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.5}} for e in experts]}
    merge(parse_config(cfg), str(a), MergeOptions(quiet=True, prefetch=1))
    merge(parse_config(cfg), str(b), MergeOptions(quiet=True, prefetch=4))
    ta, tb = folder_tensors(a), folder_tensors(b)
    assert all(torch.equal(ta[n], tb[n]) for n in ta)
    base_t = Checkpoint(base).read("model.layers.0.mlp.up_proj.weight")
    assert not torch.equal(ta["model.layers.0.mlp.up_proj.weight"], base_t)


def test_direct_io_and_reused_buffers_change_no_byte(model_sets, tmp_path, monkeypatch):
    """O_DIRECT reads into recycled buffers, and reads split between the page cache and O_DIRECT, give
    the same output files as plain reads, and the buffers really are recycled (a wrong hand-back would
    corrupt later tensors)."""
    from merge_engine import engine
    base, *experts = model_sets("llama_bf16_sharded")
    cfg = ties(base, experts, "bfloat16")
    pools = []
    monkeypatch.setattr(engine, "BufferPool", lambda *a, **k: pools.append(BufferPool(*a, **k)) or pools[-1])
    for mode, prefetch in (("on", 1), ("auto", 2), ("off", 3)):
        merge(parse_config(cfg), str(tmp_path / mode), MergeOptions(quiet=True, direct_io=mode, prefetch=prefetch))
    files = sorted(p.name for p in (tmp_path / "off").iterdir() if p.suffix == ".safetensors")
    for mode in ("on", "auto"):
        assert files and files == sorted(p.name for p in (tmp_path / mode).iterdir() if p.suffix == ".safetensors")
        for f in files:
            assert (tmp_path / mode / f).read_bytes() == (tmp_path / "off" / f).read_bytes(), (mode, f)
    assert all(pool.reused > pool.fresh for pool in pools)
    with pytest.raises(MergeEngineError, match="direct_io must be one of auto, on, off"):
        merge(parse_config(cfg), str(tmp_path / "bad"), MergeOptions(quiet=True, direct_io=True))


@pytest.mark.skipif(not backends.kernels_enabled(), reason="compiled kernels disabled by MERGE_ENGINE_KERNELS=0")
def test_kernel_outputs_go_to_recycled_buffers_and_change_no_byte(model_sets, tmp_path, monkeypatch):
    from merge_engine.methods.base import TensorGroup
    base, *experts = model_sets("llama_bf16_sharded")
    cfg = ties(base, experts, "bfloat16")
    given = []  # the buffers the engine passed the CPU kernel as out, per output (None: it allocates)
    real = TensorGroup.output_like
    monkeypatch.setattr(TensorGroup, "output_like", lambda self, x: given.append(real(self, x)) or given[-1])
    merge(parse_config(cfg), str(tmp_path / "pooled"), MergeOptions(quiet=True))
    assert given and all(b is not None for b in given)
    given.clear()
    monkeypatch.setattr(TensorGroup, "output_like", lambda self, x: given.append(None))
    merge(parse_config(cfg), str(tmp_path / "fresh"), MergeOptions(quiet=True))
    assert given and all(b is None for b in given)
    files = sorted(p.name for p in (tmp_path / "fresh").iterdir() if p.suffix == ".safetensors")
    for f in files:
        assert (tmp_path / "pooled" / f).read_bytes() == (tmp_path / "fresh" / f).read_bytes(), f


def test_slices_renumber_layers(folder_tensors, model_sets, tmp_path):
    base, e1, _, _ = model_sets("llama")
    cfg = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [{"model": base, "layer_range": [0, 3]}]},
                      {"sources": [{"model": e1, "layer_range": [2, 4]}]}]}
    out = tmp_path / "frankenmerge"
    merge(parse_config(cfg), str(out), MergeOptions(quiet=True))
    t = folder_tensors(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    e1c = Checkpoint(e1)
    assert torch.equal(t["model.layers.3.self_attn.q_proj.weight"], e1c.read("model.layers.2.self_attn.q_proj.weight"))
    assert torch.equal(t["model.layers.4.mlp.up_proj.weight"], e1c.read("model.layers.3.mlp.up_proj.weight"))
    assert transformers.AutoModelForCausalLM.from_pretrained(str(out)) is not None


PEAK_RSS = textwrap.dedent("""
    import resource, sys
    from merge_engine import MergeOptions, load_config, merge
    merge(load_config(sys.argv[1]), sys.argv[2], MergeOptions(quiet=True, device="cpu"))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


def peak_rss_of_merge(root, layers, tmp_path):
    from merge_engine.demo import make_synthetic_llama
    shape = dict(layers=layers, hidden=256, intermediate=1024, vocab=512, dtype=torch.float32)
    base = make_synthetic_llama(str(root / f"b{layers}"), seed=0, **shape)
    experts = [make_synthetic_llama(str(root / f"e{layers}_{i}"), seed=i, base=base, **shape) for i in (1, 2)]
    config = tmp_path / f"ties{layers}.yml"
    config.write_text(yaml.safe_dump(ties(base, experts)))
    res = subprocess.run([sys.executable, "-c", PEAK_RSS, str(config), str(tmp_path / f"out{layers}")],
                         capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_layers(tmp_path):
    # Per layer the three inputs hold 3 x 4 MB (fp32: 4 x 256^2 + 3 x 256 x 1024 values), so 24 more
    # layers are 288 MB more input (plus 96 MB more output). A bounded engine holds a few tensor groups
    # (< 10 MB each), whatever the layer count: allow 64 MB of difference for allocator noise.
    small = peak_rss_of_merge(tmp_path, 2, tmp_path)
    large = peak_rss_of_merge(tmp_path, 26, tmp_path)
    assert large - small < 64 * 2**20, (small, large)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the CUDA pipeline and kernels)")
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties"])
def test_cuda_merge_matches_cpu(folder_tensors, model_sets, tmp_path, method):
    """A merge on the GPU writes the tensors the CPU merge writes: the GPU kernels round where the C++
    ones do (no rescale: its whole-tensor sums are taken in another order), and the pipeline's
    side-stream copies into pinned buffers lose nothing."""
    base, *experts = model_sets("llama_bf16_sharded")
    cfg = ties(base, experts, "bfloat16")
    cfg["merge_method"] = method
    cfg["parameters"]["rescale"] = False
    merge(parse_config(cfg), str(tmp_path / "cpu"), MergeOptions(quiet=True, device="cpu"))
    merge(parse_config(cfg), str(tmp_path / "gpu"), MergeOptions(quiet=True, device="cuda"))
    on_cpu, on_gpu = folder_tensors(tmp_path / "cpu"), folder_tensors(tmp_path / "gpu")
    assert on_cpu.keys() == on_gpu.keys()
    differ = [n for n in on_cpu if not torch.equal(on_cpu[n], on_gpu[n])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture
def small_models(tmp_path):
    from merge_engine.demo import make_synthetic_llama, save_word_tokenizer
    shape = dict(layers=1, hidden=16, intermediate=32, vocab=64)
    base = make_synthetic_llama(str(tmp_path / "base"), seed=0, **shape)
    models = base, make_synthetic_llama(str(tmp_path / "expert"), seed=1, base=base, **shape)
    for folder in models:
        save_word_tokenizer(folder)
    return models


def poison(folder: str, name: str, value: bytes) -> None:
    """Overwrite the first two bf16 elements of a stored tensor."""
    info = Checkpoint(folder).tensors[name]
    with open(info.file, "r+b") as f:
        f.seek(info.data_start)
        f.write(value * 2)


UP = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("method", ["linear", "slerp", "passthrough", "model_stock", "karcher", "nuslerp"])
def test_nan_in_an_input_is_refused_by_every_method(small_models, tmp_path, method):
    base, expert = small_models
    poison(expert, UP, b"\xc0\x7f")  # bf16 NaN
    models = [{"model": expert}] if method == "passthrough" else [{"model": base}, {"model": expert}]
    weights = {"linear": [1.0, 1.0], "nuslerp": [0.5, 0.5]}.get(method)
    for m, w in zip(models, weights or []):
        m["parameters"] = {"weight": w}
    config = {"merge_method": method, "models": models, **({"base_model": base} if method in ("slerp", "model_stock") else {}),
              **({"parameters": {"t": 0.5}} if method == "slerp" else {})}
    if method == "model_stock":
        config["models"].append({"model": expert})
    with pytest.raises(MergeEngineError, match=f"{expert}: tensor '{UP}' has 2 NaN or Inf value"):
        merge(parse_config(config), str(tmp_path / "out"), MergeOptions(device="cpu", quiet=True))
    assert not (tmp_path / "out").exists()


def test_inf_in_an_input_is_written_as_mergekit_does_with_a_warning(small_models, tmp_path, caplog):
    base, expert = small_models
    poison(expert, UP, b"\x80\x7f")  # bf16 +Inf
    config = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (base, expert)]}
    merge(parse_config(config), str(tmp_path / "out"), MergeOptions(device="cpu", quiet=True))
    from safetensors.torch import load_file
    out = load_file(str(tmp_path / "out" / "model.safetensors"))[UP]
    assert int(torch.isinf(out).sum()) == 2 and int(torch.isnan(out).sum()) == 0
    assert f"tensor '{UP}': 2 merged value(s) are NaN or Inf ({expert}: tensor '{UP}'" in caplog.text


@pytest.mark.parametrize("kind", ["symlink out", "fifo", "folder"])
def test_donor_files_to_copy_are_checked_before_any_tensor_is_read(small_models, tmp_path, monkeypatch, kind):
    """A tokenizer or generation-config file that is a symlink out of the folder, a FIFO (the copy would block)
    or a folder is refused when planning: no tensor read, no output folder."""
    base, expert = small_models
    target = os.path.join(base, "generation_config.json" if kind == "fifo" else "tokenizer.json")
    if os.path.lexists(target):
        os.remove(target)
    if kind == "symlink out":
        (tmp_path / "elsewhere.json").write_text("{}")
        os.symlink(tmp_path / "elsewhere.json", target)
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        os.mkdir(target)
    reads = []
    monkeypatch.setattr(os, "preadv", lambda *a: reads.append(a) or pytest.fail("a tensor was read"))
    config = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (base, expert)]}
    match = {"symlink out": "a symlink out of the folder", "fifo": "is a FIFO, not a regular file",
             "folder": "is a folder, not a regular file"}[kind]
    with pytest.raises(MergeEngineError, match=match):
        merge(parse_config(config), str(tmp_path / "out"), MergeOptions(device="cpu", quiet=True))
    assert not reads and not (tmp_path / "out").exists()


def test_inputs_inside_the_output_folder_are_refused_even_with_overwrite(small_models, tmp_path):
    base, expert = small_models
    config = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (base, expert)]}
    before = sorted(os.listdir(expert))
    with pytest.raises(MergeEngineError, match=f"the input folder {base} is inside the output folder {tmp_path}"):
        merge(parse_config(config), str(tmp_path), MergeOptions(device="cpu", quiet=True, overwrite=True))
    import shutil
    shutil.copytree(base, tmp_path / "tok" / "source")
    config = {**config, "models": config["models"][:1], "tokenizer_source": str(tmp_path / "tok" / "source")}
    with pytest.raises(MergeEngineError, match="tok/source is inside the output folder"):
        merge(parse_config(config), str(tmp_path / "tok"), MergeOptions(device="cpu", quiet=True, overwrite=True))
    assert sorted(os.listdir(expert)) == before


def test_a_tokenizer_source_that_is_not_a_folder_nor_cached_is_refused_without_asking_the_hub(small_models, tmp_path,
                                                                                             monkeypatch):
    from merge_engine.errors import ConfigError
    base, expert = small_models
    asked, load = [], transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: asked.append(a) or load(*a, **k))
    config = {"merge_method": "linear", "tokenizer_source": "gpt2",
              "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (base, expert)]}
    with pytest.raises(ConfigError, match="gpt2: not a local folder, and gpt2 is not in the Hugging Face cache"):
        merge(parse_config(config), str(tmp_path / "out"), MergeOptions(device="cpu", quiet=True,
                                                                        hub_cache=str(tmp_path / "cache")))
    assert [a[0] for a in asked if "gpt2" in str(a[0])] == []


@pytest.mark.parametrize("arch,key,layers", [("distilbert", "n_layers", "distilbert.transformer.layer"),
                                              ("gpt_neo", "num_layers", "transformer.h")])
def test_slices_write_the_layer_count_under_the_configs_own_key(arch, key, layers, tmp_path):
    """DistilBERT counts its layers in n_layers, GPT-Neo in num_layers (whose layers' attention kinds, runs of
    attention_types, must add up to it): a frankenmerge writes the output's count there, or transformers loads only
    the donor's count of its layers."""
    from tests.arch_models import make_architecture
    base, e1 = make_architecture(str(tmp_path / "models"), arch, n=2)
    cfg = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [{"model": base, "layer_range": [0, 2]}]},
                      {"sources": [{"model": e1, "layer_range": [1, 3]}]}]}
    out = tmp_path / "frankenmerge"
    merge(parse_config(cfg), str(out), MergeOptions(quiet=True))
    written = json.loads((out / "config.json").read_text())
    assert written[key] == 4
    model_class = getattr(transformers, written["architectures"][0])
    model, info = model_class.from_pretrained(str(out), output_loading_info=True)
    assert len(model.get_submodule(layers)) == 4 and not info["missing_keys"] and not info["unexpected_keys"]
    if arch == "gpt_neo":  # each layer keeps its source layer's attention: global, local (base), local, global (e1)
        assert model.config.attention_layers == ["global", "local", "local", "global"]



def test_a_merge_that_keeps_the_layers_keeps_the_per_layer_config_lists(tmp_path):
    """GPT-Neo's attention_types (runs of each layer's attention kind) stay as the donor wrote them when the layers
    are the donor's, though another way of writing the runs means the same layers."""
    from tests.arch_models import make_architecture
    base, e1 = make_architecture(str(tmp_path / "models"), "gpt_neo", n=2)
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (base, e1)]}
    merge(parse_config(cfg), str(tmp_path / "out"), MergeOptions(quiet=True))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    donor = json.loads((Path(base) / "config.json").read_text())
    assert written["attention_types"] == donor["attention_types"]
    assert written["attention_layers"] == donor["attention_layers"]


def test_slices_rebuild_per_layer_config_lists_from_each_layers_source(model_sets, tmp_path):
    """layer_types (each layer's attention) follows the layers it came from: transformers refuses a config whose
    list and layer count disagree (mergekit 0.1.5 keeps the donor's list)."""
    import shutil
    kinds = {"base": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"],
             "e1": ["full_attention", "sliding_attention", "full_attention", "full_attention"]}
    folders = {}
    for name, source in zip(kinds, model_sets("qwen2")):
        folders[name] = tmp_path / name
        shutil.copytree(source, folders[name])
        config = json.loads((folders[name] / "config.json").read_text())
        assert config["num_hidden_layers"] == len(kinds[name])
        config.update(layer_types=kinds[name], sliding_window=16, use_sliding_window=True,
                      eos_token_id=[1, 2, 3, 4])  # a list as long as the layers, not of them
        (folders[name] / "config.json").write_text(json.dumps(config))
    cfg = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [{"model": str(folders["base"]), "layer_range": [0, 2]}]},
                      {"sources": [{"model": str(folders["e1"]), "layer_range": [1, 4]}]}]}
    out = tmp_path / "frankenmerge"
    merge(parse_config(cfg), str(out), MergeOptions(quiet=True))
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 5
    assert written["layer_types"] == kinds["base"][0:2] + kinds["e1"][1:4]
    assert written["eos_token_id"] == [1, 2, 3, 4]
    assert written["architectures"] == json.loads((folders["base"] / "config.json").read_text())["architectures"]
    assert transformers.AutoConfig.from_pretrained(str(out)).layer_types == written["layer_types"]
    assert transformers.AutoModelForCausalLM.from_pretrained(str(out)) is not None


def test_merge_takes_mappings_and_paths_and_refuses_what_it_cannot_use(model_sets, tmp_path, monkeypatch):
    import pathlib
    base, e1, _, _ = model_sets("llama")
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": base, "parameters": {"weight": 0.5}}, {"model": e1, "parameters": {"weight": 0.5}}]}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config))
    merge(config, tmp_path / "from_mapping", MergeOptions(quiet=True))
    merge(path, str(tmp_path / "from_path"), MergeOptions(quiet=True))
    assert ((tmp_path / "from_mapping" / "model.safetensors").read_bytes()
            == (tmp_path / "from_path" / "model.safetensors").read_bytes())
    with pytest.raises(TypeError, match="options must be a MergeOptions, got a dict"):
        merge(config, tmp_path / "o", {"quiet": True})
    with pytest.raises(TypeError, match="config must be a MergeConfig, a mapping or a YAML path, got a list"):
        merge([config], tmp_path / "o")
    monkeypatch.chdir(tmp_path)  # an empty path is the working folder, which overwrite would replace
    with pytest.raises(MergeEngineError, match="the output path is empty"):
        merge(config, "", MergeOptions(quiet=True, overwrite=True))
    assert (tmp_path / "c.yml").exists()
    for field, value, message in [("prefetch", 0, "prefetch must be an integer of at least 1, got 0"),
                                  ("prefetch", "2", "prefetch must be an integer of at least 1, got '2'"),
                                  ("out_shard_size", -1, r"out_shard_size must be a number of bytes \(0: no limit"),
                                  ("overwrite", "no", "overwrite must be True or False, got 'no'"),
                                  ("device", None, "device must be a string"),
                                  ("random_seed", 1.5, "random_seed must be an integer in"),
                                  ("random_seed", 2**70, "random_seed must be an integer in")]:
        with pytest.raises(MergeEngineError, match=message):
            merge(config, str(pathlib.Path(tmp_path, "o")), MergeOptions(quiet=True, **{field: value}))
    assert not (tmp_path / "o").exists()
    # values of the kinds callers hold: a torch.device, an integer that is not a Python int, an integral float
    merge(config, tmp_path / "kinds", MergeOptions(quiet=True, device=torch.device("cpu"), random_seed=torch.tensor(3),
                                                   out_shard_size=2e9, prefetch=torch.tensor(1)))
    assert ((tmp_path / "kinds" / "model.safetensors").read_bytes()
            == (tmp_path / "from_mapping" / "model.safetensors").read_bytes())


def test_a_config_mapping_holding_torch_dtypes_and_numpy_numbers_is_copied_as_yaml(small_models, tmp_path):
    import numpy as np
    base, expert = small_models
    config = {"merge_method": "linear", "dtype": torch.bfloat16,
              "models": [{"model": base, "parameters": {"weight": np.float64(0.25)}},
                         {"model": expert, "parameters": {"weight": 0.75}}]}
    merge(config, tmp_path / "out", MergeOptions(quiet=True))
    copy = yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())
    assert copy["dtype"] == "bfloat16" and copy["models"][0]["parameters"]["weight"] == 0.25
    assert parse_config(copy).dtype == torch.bfloat16
    # a value YAML cannot hold is refused before the merge, not after it
    with pytest.raises(MergeEngineError, match="cannot be written as YAML"), pytest.warns(UserWarning, match="note"):
        merge({**config, "note": object()}, tmp_path / "refused", MergeOptions(quiet=True))
    assert not (tmp_path / "refused").exists()


def test_torch_prefixed_dtype_names_give_a_config_json_transformers_loads(small_models, tmp_path):
    # README, Differences: mergekit writes "torch.float16" into config.json as given, which transformers 5 refuses
    base, expert = small_models
    config = {"merge_method": "linear", "dtype": "torch.float32", "out_dtype": "torch.float16",
              "models": [{"model": base, "parameters": {"weight": 0.5}}, {"model": expert, "parameters": {"weight": 0.5}}]}
    merge(config, tmp_path / "out", MergeOptions(quiet=True))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "out")).dtype == torch.float16
    # int64, which mergekit takes (every weight cast to an integer), is refused by name
    with pytest.raises(MergeEngineError, match="out_dtype: unknown dtype 'int64'"):
        merge({**config, "out_dtype": "int64"}, tmp_path / "int", MergeOptions(quiet=True))
    assert not (tmp_path / "int").exists()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


# TIES refuses the NaN in its op (compute); a linear merge's result holds it, found in the write thread, here in
# one of the last writes, those the pipeline waits for once every tensor is merged
@pytest.mark.parametrize("method, poisoned", [("ties", UP), ("linear", "lm_head.weight")])
def test_a_failed_merge_frees_what_it_held_without_the_garbage_collector(small_models, tmp_path, method, poisoned):
    """In a process that merges many times, a failed merge closes its input files and frees its buffers when its
    exception is dropped: nothing it held is left in a reference cycle for the garbage collector to find later."""
    base, expert = small_models
    poison(expert, poisoned, b"\xc0\x7f")  # bf16 NaN
    parameters = {"weight": 0.5, **({"density": 0.5} if method == "ties" else {})}
    config = {"merge_method": method, "models": [{"model": m, "parameters": parameters} for m in (base, expert)],
              **({"base_model": base} if method == "ties" else {})}
    gc.collect()
    gc.disable()
    try:
        before = open_descriptors()
        with pytest.raises(MergeEngineError, match=f"{expert}: tensor '{poisoned}' has 2 NaN"):
            merge(config, tmp_path / "out", MergeOptions(quiet=True))
        assert open_descriptors() == before
    finally:
        gc.enable()


def test_tensors_written_with_inf_are_warned_of_a_few_one_by_one_then_counted(small_models, tmp_path, caplog):
    """An expert whose every floating-point tensor holds an Inf (as a merge that overflows them all): a line per
    tensor, hundreds in a real model's log, is now the first NON_FINITE_WARNINGS and one line counting the rest."""
    from merge_engine.engine import NON_FINITE_WARNINGS
    base, expert = small_models
    names = list(Checkpoint(expert).tensors)
    for name in names:
        poison(expert, name, b"\x80\x7f")  # bf16 +Inf
    config = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (base, expert)]}
    merge(parse_config(config), str(tmp_path / "out"), MergeOptions(device="cpu", quiet=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == NON_FINITE_WARNINGS + 1, warnings
    assert warnings[-1].startswith(f"{len(names) - NON_FINITE_WARNINGS} more tensor(s) hold NaN or Inf merged values (")
