"""MoE experts read fused as transformers 5 holds them (io/experts.py)."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.io.experts import CONVERSIONS, conversion, layout_hint, with_expert_layout
from tests.conftest import rewrite_in_place

EXPERTS, HIDDEN, INNER = 4, 8, 6


def mixtral_tensors(seed: int = 0, layers: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(16, HIDDEN, generator=gen)}
    for i in range(layers):
        moe = f"model.layers.{i}.block_sparse_moe"
        out[f"{moe}.gate.weight"] = torch.randn(EXPERTS, HIDDEN, generator=gen)
        for e in range(EXPERTS):
            for w, shape in (("w1", (INNER, HIDDEN)), ("w2", (HIDDEN, INNER)), ("w3", (INNER, HIDDEN))):
                out[f"{moe}.experts.{e}.{w}.weight"] = torch.randn(shape, generator=gen)
    return out


def write_model(folder, tensors: dict[str, torch.Tensor], model_type: str = "mixtral") -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": model_type, "architectures": ["MixtralForCausalLM"], "num_hidden_layers": 2}, f)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    return str(folder)


def fused(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's layout, built independently: gate (w1) then up (w3) rows per expert, experts stacked."""
    out = {}
    for name, t in tensors.items():
        if ".experts." not in name:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = t
    for i in range(2):
        e = f"model.layers.{i}.block_sparse_moe.experts"
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{e}.{k}.w1.weight"], tensors[f"{e}.{k}.w3.weight"]]) for k in range(EXPERTS)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [tensors[f"{e}.{k}.w2.weight"] for k in range(EXPERTS)])
    return out


def test_reads_mixtral_experts_fused(tmp_path):
    tensors = mixtral_tensors()
    ckpt = with_expert_layout(Checkpoint(write_model(tmp_path / "m", tensors)), "fused")
    want = fused(tensors)
    assert set(ckpt.tensors) == set(want)
    for name, t in want.items():
        assert ckpt.tensors[name].shape == tuple(t.shape) and ckpt.tensors[name].nbytes == t.nbytes
        assert torch.equal(ckpt.read(name), t), name
        pooled = ckpt.read_pooled(name, lambda n: torch.empty(n, dtype=torch.uint8))
        assert torch.equal(pooled, t), name
    assert ckpt.num_layers == 2


def test_checkpoint_layout_and_other_models_read_as_stored(tmp_path):
    tensors = mixtral_tensors()
    plain = Checkpoint(write_model(tmp_path / "m", tensors))
    assert with_expert_layout(plain, "checkpoint") is plain
    other = Checkpoint(write_model(tmp_path / "l", {"model.layers.0.mlp.experts.0.w1.weight": torch.ones(2)}, "llama"))
    assert with_expert_layout(other, "fused") is other


def test_fused_folder_read_as_it_is(tmp_path):
    # a mergekit output already holds transformers 5's names: nothing to fuse, nothing renamed
    want = fused(mixtral_tensors())
    ckpt = with_expert_layout(Checkpoint(write_model(tmp_path / "f", want)), "fused")
    assert set(ckpt.tensors) == set(want)
    assert all(torch.equal(ckpt.read(n), t) for n, t in want.items())


def test_missing_expert_refused_by_name(tmp_path):
    tensors = mixtral_tensors()
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    folder = write_model(tmp_path / "m", tensors)
    with pytest.raises(CheckpointError, match=r"experts\.2\.w3\.weight.*expert 2.*missing") as e:
        with_expert_layout(Checkpoint(folder), "fused")
    assert folder in str(e.value) and "model.layers.1.mlp.experts.gate_up_proj" in str(e.value)


def test_experts_that_do_not_stack_refused(tmp_path):
    tensors = mixtral_tensors()
    tensors["model.layers.0.block_sparse_moe.experts.3.w2.weight"] = torch.zeros(HIDDEN, INNER + 1)
    tensors["model.layers.1.block_sparse_moe.experts.1.w1.weight"] = torch.zeros(INNER, HIDDEN, dtype=torch.float16)
    for broken in ("model.layers.0.block_sparse_moe.experts.3.w2.weight",
                   "model.layers.1.block_sparse_moe.experts.1.w1.weight"):
        only = {**mixtral_tensors(), broken: tensors[broken]}
        with pytest.raises(CheckpointError, match=f"'{broken}'.*do not stack"):
            with_expert_layout(Checkpoint(write_model(tmp_path / broken, only)), "fused")


def test_fused_and_per_expert_names_together_refused(tmp_path):
    tensors = mixtral_tensors()
    tensors["model.layers.0.mlp.experts.down_proj"] = torch.zeros(EXPERTS, HIDDEN, INNER)
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.experts.down_proj"):
        with_expert_layout(Checkpoint(write_model(tmp_path / "m", tensors)), "fused")


def test_table_is_transformers_mapping():
    # every model type whose transformers 5 conversion is renamings and expert stacking only, step for step: a
    # transformers upgrade that changes one fails here
    transformers = pytest.importorskip("transformers")
    from transformers import conversion_mapping as cm
    from transformers.core_model_loading import WeightConverter, WeightRenaming
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    assert transformers.__version__.split(".")[0] == "5"

    def steps(mapping):
        out = []
        for t in mapping or ():
            sources, targets = tuple(t._original_source_patterns), tuple(t._original_target_patterns)
            ops = [(type(o).__name__, getattr(o, "dim", None)) for o in getattr(t, "operations", ())]
            if type(t) is WeightRenaming and len(sources) == len(targets) == 1:
                out.append(("rename", sources[0], targets[0]))
            elif (type(t) is WeightConverter and len(targets) == 1
                  and ops == ([("MergeModulelist", 0)] if len(sources) == 1
                              else [("MergeModulelist", 0), ("Concatenate", 1)])):
                out.append(("fuse", sources, targets[0]))
            else:
                return None
        return tuple(out) if any(kind == "fuse" for kind, *_ in out) else None

    cm.get_checkpoint_conversion_mapping("mixtral")  # builds the registry
    model_types = {k for k in set(CONFIG_MAPPING_NAMES) | set(cm._checkpoint_conversion_mapping_cache)
                   if not k[0].isupper()}  # (class names are not model types)
    theirs = {k: s for k in model_types if (s := steps(cm.get_checkpoint_conversion_mapping(k)))}
    assert {k: tuple(CONVERSIONS[k]) for k in CONVERSIONS} == theirs
    for model_type, table in CONVERSIONS.items():  # and each step renames as transformers renames
        for ours, t in zip(conversion(model_type), cm.get_checkpoint_conversion_mapping(model_type)):
            for source in ours.sources:
                key = "model.layers.1." + source.replace("\\", "").replace("*", "3").lstrip("^.")
                renamed, pattern = t.rename_source_key(key)
                got = ours.apply(key)
                assert (got[0] if got else key) == renamed, (model_type, key)


def test_lora_adapter_on_experts_applied_into_the_fused_tensor(tmp_path):
    from merge_engine.io.lora import open_model
    from tests.lora_adapters import write_adapter
    base = write_model(tmp_path / "m", mixtral_tensors())
    write_adapter(str(tmp_path / "a"), base, targets=("w1", "w2", "q_proj"))
    adapted = open_model(f"{base}+{tmp_path / 'a'}")
    want = fused({name: adapted.read(name) for name in adapted.tensors})
    ckpt = with_expert_layout(open_model(f"{base}+{tmp_path / 'a'}"), "fused")
    assert not torch.equal(want["model.layers.0.mlp.experts.gate_up_proj"], fused(mixtral_tensors())[
        "model.layers.0.mlp.experts.gate_up_proj"])
    for name, t in want.items():
        assert torch.equal(ckpt.read(name), t), name
        assert torch.equal(ckpt.read_pooled(name, lambda n: torch.empty(n, dtype=torch.uint8)), t), name


def test_fused_and_per_expert_inputs_merge_together(tmp_path, folder_tensors):
    # a mergekit output (fused) merged with a per-expert checkpoint: the same as both per-expert
    from merge_engine.config import parse_config
    from merge_engine.engine import MergeOptions, merge
    a, b = mixtral_tensors(0), mixtral_tensors(1)
    per_expert = write_model(tmp_path / "a", a)
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": per_expert, "parameters": {"weight": 0.3}},
                         {"model": write_model(tmp_path / "b", b), "parameters": {"weight": 0.7}}]}
    merge(parse_config(config), str(tmp_path / "both"), MergeOptions(quiet=True))
    config["models"][1]["model"] = write_model(tmp_path / "b-fused", fused(b))
    merge(parse_config(config), str(tmp_path / "mixed"), MergeOptions(quiet=True))
    both, mixed = folder_tensors(tmp_path / "both"), folder_tensors(tmp_path / "mixed")
    assert set(both) == set(mixed) == set(fused(a))
    assert all(torch.equal(both[n], mixed[n]) for n in both)


def test_nan_in_an_expert_is_blamed_on_the_fused_tensor_and_its_folder(tmp_path):
    from merge_engine.config import parse_config
    from merge_engine.engine import MergeOptions, merge
    from merge_engine.errors import MergeEngineError
    bad = mixtral_tensors(1)
    bad["model.layers.1.block_sparse_moe.experts.2.w2.weight"][0, 0] = float("nan")
    folder = write_model(tmp_path / "bad", bad)
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": write_model(tmp_path / "a", mixtral_tensors(0)), "parameters": {"weight": 0.5}},
                         {"model": folder, "parameters": {"weight": 0.5}}]}
    with pytest.raises(MergeEngineError, match=rf"{folder}: tensor 'model.layers.1.mlp.experts.down_proj'.*NaN"):
        merge(parse_config(config), str(tmp_path / "out"), MergeOptions(quiet=True))


def test_patch_on_experts_applied_into_the_fused_tensor(tmp_path):
    from merge_engine.io.lora import open_model
    from merge_engine.patches import extract_patch
    base = write_model(tmp_path / "m", mixtral_tensors(0))
    tuned = {n: t + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(5))
             for n, t in mixtral_tensors(0).items()}
    extract_patch(base, write_model(tmp_path / "t", tuned), str(tmp_path / "p"))
    patched = open_model(f"{base}+{tmp_path / 'p'}")
    want = fused({name: patched.read(name) for name in patched.tensors})
    ckpt = with_expert_layout(open_model(f"{base}+{tmp_path / 'p'}"), "fused")
    assert torch.equal(want["model.layers.1.mlp.experts.down_proj"], fused(tuned)["model.layers.1.mlp.experts.down_proj"])
    for name, t in want.items():
        assert torch.equal(ckpt.read_pooled(name, lambda n: torch.empty(n, dtype=torch.uint8)), t), name


def test_a_file_rewritten_while_its_experts_are_read_is_caught(tmp_path):
    # the fused tensors are read through the inner checkpoint, whose descriptors check_unchanged must see
    folder = write_model(tmp_path / "m", mixtral_tensors())
    ckpt = with_expert_layout(Checkpoint(folder), "fused")
    ckpt.read("model.layers.0.mlp.experts.down_proj")
    ckpt.check_unchanged()  # read, not written: nothing to say
    path = os.path.join(folder, "model.safetensors")
    rewrite_in_place(path)
    with pytest.raises(CheckpointError, match="model.safetensors: the file changed while it was being read"):
        ckpt.check_unchanged()


@pytest.mark.parametrize("direct_io", ["on", "off"])
def test_fused_experts_read_as_direct_io_says(tmp_path, monkeypatch, direct_io):
    # the experts are most of a MoE model's bytes: --direct-io on reads them with O_DIRECT too, off plainly
    import fcntl
    tensors = mixtral_tensors()
    ckpt = with_expert_layout(Checkpoint(write_model(tmp_path / "m", tensors)), "fused")
    if ckpt.inner._direct_fd(ckpt.inner.tensors["model.embed_tokens.weight"].file) is None:
        pytest.skip("this test needs a filesystem that opens files with O_DIRECT")
    direct_reads, real_preadv = [], os.preadv

    def preadv(fd, buffers, offset):
        direct_reads.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
        return real_preadv(fd, buffers, offset)
    monkeypatch.setattr(os, "preadv", preadv)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    got = ckpt.read_pooled(name, lambda n: torch.empty(n, dtype=torch.uint8), direct_io)
    assert torch.equal(got, fused(tensors)[name])
    assert direct_reads and all(direct_reads) == (direct_io == "on") and any(direct_reads) == (direct_io == "on")


@pytest.mark.parametrize("o_direct", [True, False])
def test_lora_adapter_read_in_a_merge_dtype_into_the_fused_tensor(tmp_path, monkeypatch, o_direct):
    # a LoRA input read cast (--lora-merge-dtype) takes two buffers per expert, the stored bytes and the cast copy,
    # which must not overlap (where the filesystem refuses O_DIRECT, as tmpfs does, both start at the buffer's start)
    from merge_engine.io.lora import open_model
    from tests.lora_adapters import write_adapter
    real_open = os.open

    def no_direct_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)
    if not o_direct:
        monkeypatch.setattr(os, "open", no_direct_open)
    base = write_model(tmp_path / "m", {n: t.bfloat16() for n, t in mixtral_tensors().items()})
    write_adapter(str(tmp_path / "a"), base, targets=("w1", "w2"))
    ref = f"{base}+{tmp_path / 'a'}"
    adapted = open_model(ref, torch.float32)
    want = fused({name: adapted.read(name) for name in adapted.tensors})
    ckpt = with_expert_layout(open_model(ref, torch.float32), "fused")
    for name, t in want.items():
        for direct_io in ("auto", "on", "off"):
            got = ckpt.read_pooled(name, lambda n: torch.empty(n, dtype=torch.uint8), direct_io)
            assert got.dtype == torch.float32 and torch.equal(got, t), (name, direct_io)


def with_config(folder: str, **settings) -> str:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **settings}, f)
    return folder


@pytest.mark.parametrize("stored", [EXPERTS - 1, EXPERTS, EXPERTS + 1])
def test_expert_count_checked_against_config(tmp_path, stored):
    # the last expert missing from every projection leaves no gap in the indices: config.json's count tells
    tensors = {n: t for n, t in mixtral_tensors().items() if not any(f".experts.{e}." in n
                                                                     for e in range(stored, EXPERTS))}
    tensors.update({n.replace(".experts.0.", f".experts.{EXPERTS}."): t.clone()
                    for n, t in tensors.items() if stored > EXPERTS and ".experts.0." in n})
    folder = with_config(write_model(tmp_path / "m", tensors), num_local_experts=EXPERTS)
    if stored == EXPERTS:
        ckpt = with_expert_layout(Checkpoint(folder), "fused")
        assert ckpt.tensors["model.layers.0.mlp.experts.down_proj"].shape[0] == EXPERTS
        return
    with pytest.raises(CheckpointError, match=rf"{folder}: .*'model.layers.0.mlp.experts.gate_up_proj'") as e:
        with_expert_layout(Checkpoint(folder), "fused")
    odd = min(stored, EXPERTS)  # the missing expert, or the one too many
    assert f".experts.{odd}.w1.weight" in str(e.value) and f"expert {odd}" in str(e.value)


def test_the_plan_digest_tells_lora_adapters_of_a_moe_model_apart(tmp_path):
    # ranks that read other adapters of one base (the same base path, shapes and dtypes) plan other merges
    from merge_engine.config import parse_config
    from merge_engine.distributed import digest
    from merge_engine.plan import build_plan
    from tests.lora_adapters import write_adapter
    base, other = write_model(tmp_path / "m", mixtral_tensors(0)), write_model(tmp_path / "o", mixtral_tensors(1))
    adapters = [str(tmp_path / f"a{i}") for i in (1, 2)]
    for i, folder in enumerate(adapters):
        write_adapter(folder, base, seed=i, targets=("w1", "q_proj"))

    def plan_digest(adapter):
        plan = build_plan(parse_config({"merge_method": "linear", "dtype": "float32", "models": [
            {"model": other, "parameters": {"weight": 0.5}},
            {"model": f"{base}+{adapter}", "parameters": {"weight": 0.5}}]}))
        return digest(plan.jobs, plan.entries(), 10**9, 0)
    assert plan_digest(adapters[0]) != plan_digest(adapters[1])


def test_an_adapter_of_per_expert_tensors_on_a_fused_base_says_so(tmp_path):
    # a PEFT adapter trained on the per-expert checkpoint, given a fused base (a mergekit or merge_engine output)
    from merge_engine.io.lora import open_model
    from tests.lora_adapters import write_adapter
    write_adapter(str(tmp_path / "a"), write_model(tmp_path / "m", mixtral_tensors()), targets=("w1",))
    fused_base = write_model(tmp_path / "f", fused(mixtral_tensors()))
    with pytest.raises(CheckpointError, match=r"experts.0.w1.weight', which .*/f does not have \(it names one "
                                              r"expert's tensor, and the model holds its experts fused"):
        open_model(f"{fused_base}+{tmp_path / 'a'}")


def test_the_layout_hint_names_the_other_layout_only():
    per_expert, stacked = list(mixtral_tensors()), list(fused(mixtral_tensors()))
    assert "holds its experts fused" in layout_hint("model.layers.0.block_sparse_moe.experts.3.w2.weight", stacked)
    assert "one tensor per expert" in layout_hint("model.layers.0.mlp.experts.down_proj", per_expert)
    assert layout_hint("model.layers.0.self_attn.q_proj.weight", stacked) == ""
    assert layout_hint("model.layers.0.block_sparse_moe.experts.9.w2.weight", per_expert) == ""
