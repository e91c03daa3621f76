"""LoRA adapters applied while reading (BASE+ADAPTER): peft's merge arithmetic, per tensor kind and dtype,
and every malformed adapter refused before any tensor is read. (tests/test_parity_mergekit.py checks
the bits against mergekit + peft.)"""
import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from merge_engine import MergeOptions, merge, parse_config
from merge_engine.errors import CheckpointError, ConfigError, MergeEngineError
from merge_engine.io.lora import LoraCheckpoint, _all_finite, _pattern_problem, open_model
from tests.lora_adapters import model_tensors, write_adapter

FP64 = torch.float64


def update(tensors, module, scaling, transpose=False):
    """(B @ A) * s in fp64, the exact update."""
    a = tensors[f"base_model.model.{module}.lora_A.weight"].to(FP64)
    b = tensors[f"base_model.model.{module}.lora_B.weight"].to(FP64)
    p = b @ a
    return (p.T if transpose else p) * scaling


def read_all(ckpt, direct):
    return {n: ckpt.read_pooled(n, lambda k: torch.empty(k, dtype=torch.uint8), "on").clone() if direct else ckpt.read(n)
            for n in ckpt.tensors}


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_updates_embeddings_and_saved_modules(model_sets, tmp_path, dtype, direct):
    base = model_sets("llama" if dtype == torch.float32 else "llama_bf16_sharded")[0]
    if dtype == torch.float16:  # an fp16 copy of the bf16 base
        folder = tmp_path / "fp16"
        folder.mkdir()
        save_file({n: t.to(torch.float16) for n, t in model_tensors(base).items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text("{}")
        base = str(folder)
    adapter = write_adapter(str(tmp_path / "a"), base, embedding="model.embed_tokens", modules_to_save=("lm_head",),
                            r=4, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    ckpt = open_model(f"{base}+{tmp_path / 'a'}")
    got, plain = read_all(ckpt, direct), model_tensors(base)
    changed = {n for n in got if not torch.equal(got[n], plain[n])}
    assert changed == set(ckpt.targets) and len(changed) == 4 * 3 + 2  # q, v, down per layer; embedding; head
    assert torch.equal(got["lm_head.weight"], adapter["base_model.model.lm_head.weight"].to(dtype))
    # the update is formed in fp32 and added with one rounding (an embedding's is rounded first): the
    # error against the exact fp64 sum is at most a rounding of the result plus fp32 matmul error
    eps = torch.finfo(dtype).eps
    for name in changed - {"lm_head.weight"}:
        module = name.removesuffix(".weight")
        s = {"v_proj": 8 / 2, "down_proj": 3 / 4}.get(module.rsplit(".", 1)[-1], 8 / 4)
        if module.endswith("embed_tokens"):
            a = adapter["base_model.model.model.embed_tokens.lora_embedding_A"].to(FP64)
            b = adapter["base_model.model.model.embed_tokens.lora_embedding_B"].to(FP64)
            exact = plain[name].to(FP64) + (b @ a).T * 2
        else:
            exact = plain[name].to(FP64) + update(adapter, module, s)
        err = (got[name].to(FP64) - exact).abs()
        bound = exact.abs() * eps + 1e-6 + (exact - plain[name].to(FP64)).abs() * eps * (name.endswith("tokens.weight"))
        assert got[name].dtype == dtype and (err <= bound).all(), name


@pytest.mark.parametrize("key,merge_dtype", [("llama_bf16_sharded", torch.float32), ("llama", torch.bfloat16),
                                               ("llama_bf16_sharded", torch.float16)])
def test_a_merge_dtype_reads_as_the_base_converted_to_it(model_sets, tmp_path, key, merge_dtype):
    """--lora-merge-dtype: the same tensors as the adapter on a copy of the base saved in that dtype (which is
    what mergekit's transformers load gives peft), by every read path."""
    base = model_sets(key)[0]
    converted = tmp_path / "converted"
    converted.mkdir()
    save_file({n: t.to(merge_dtype) for n, t in model_tensors(base).items()}, str(converted / "model.safetensors"))
    (converted / "config.json").write_text("{}")
    write_adapter(str(tmp_path / "a"), base, embedding="model.embed_tokens", modules_to_save=("lm_head",), r=4, alpha=8)
    ckpt = LoraCheckpoint(base, str(tmp_path / "a"), merge_dtype=merge_dtype)
    expected = read_all(open_model(f"{converted}+{tmp_path / 'a'}"), False)
    stored = model_tensors(base)
    assert {i.dtype for i in ckpt.tensors.values()} == {merge_dtype}
    assert all(ckpt.stored(n).dtype == t.dtype != merge_dtype for n, t in stored.items())
    fresh = lambda k: torch.empty(k, dtype=torch.uint8)  # noqa: E731
    for got in (read_all(ckpt, False), read_all(ckpt, True), {n: ckpt.read(n, torch.empty_like(expected[n])) for n in expected}):
        assert [n for n in expected if got[n].dtype != merge_dtype or not torch.equal(got[n], expected[n])] == []
    unchanged = next(n for n in expected if n not in ckpt.targets)
    assert torch.equal(ckpt.read_base_pooled(unchanged, fresh, "auto"), stored[unchanged].to(merge_dtype))
    with pytest.raises(ValueError, match="must be a contiguous"):
        ckpt.read(unchanged, torch.empty(stored[unchanged].shape, dtype=stored[unchanged].dtype))


def test_a_direct_read_that_falls_back_applies_the_update_once(model_sets, tmp_path):
    base = model_sets("llama")[0]
    write_adapter(str(tmp_path / "a"), base)
    ckpt = open_model(f"{base}+{tmp_path / 'a'}")
    want = read_all(ckpt, direct=False)
    ckpt._direct_fds = {info.file: None for info in ckpt.tensors.values()}  # as on tmpfs: no O_DIRECT
    got = read_all(ckpt, direct=True)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_rslora_and_fan_in_fan_out(model_sets, tmp_path):
    base = model_sets("gpt2")[0]  # Conv1D weights are stored [in, out]
    adapter = write_adapter(str(tmp_path / "a"), base, targets=("c_attn", "c_proj"), r=4, alpha=6,
                            fan_in_fan_out=True, use_rslora=True)
    got, plain = read_all(open_model(f"{base}+{tmp_path / 'a'}"), False), model_tensors(base)
    name = "transformer.h.1.attn.c_attn.weight"
    want = plain[name].to(FP64) + update(adapter, name.removesuffix(".weight"), 6 / math.sqrt(4), transpose=True)
    torch.testing.assert_close(got[name].to(FP64), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch, stated", [("llama", True), ("gpt2", False)])
def test_fan_in_fan_out_follows_the_layer_type_as_peft_sets_it(model_sets, tmp_path, caplog, arch, stated):
    """peft clears fan_in_fan_out for nn.Linear layers and sets it for Conv1D ones (GPT-2), with a warning,
    whatever adapter_config.json says: the update is B @ A for Linear weights ([out, in]), transposed for Conv1D.
    Llama's q_proj is square (its shape cannot tell): the model's layer type decides."""
    base = model_sets(arch)[0]
    targets = ("c_attn",) if arch == "gpt2" else ("q_proj",)
    conv1d = arch == "gpt2"
    adapter = write_adapter(str(tmp_path / "a"), base, targets=targets, r=4, alpha=8, fan_in_fan_out=conv1d)
    corrupt(str(tmp_path / "a"), config={"fan_in_fan_out": stated})
    with caplog.at_level("WARNING", logger="merge_engine"):
        got = read_all(open_model(f"{base}+{tmp_path / 'a'}"), False)
    stored = "[in, out]" if conv1d else "[out, in]"
    assert f"fan_in_fan_out is {stated}, but" in caplog.text and f"are stored {stored}; peft takes each layer" in caplog.text
    name = next(n for n in got if n.endswith(f"{targets[0]}.weight"))
    want = model_tensors(base)[name].to(FP64) + update(adapter, name.removesuffix(".weight"), 2.0, transpose=conv1d)
    torch.testing.assert_close(got[name].to(FP64), want, rtol=1e-6, atol=1e-6)


def test_a_config_names_a_model_with_its_adapter(model_sets, tmp_path, folder_tensors):
    base, e1 = model_sets("llama")[:2]
    write_adapter(str(tmp_path / "a"), e1)
    cfg = {"merge_method": "linear", "models": [{"model": f"{e1}+{tmp_path / 'a'}", "parameters": {"weight": 1.0}}]}
    merge(parse_config(cfg), str(tmp_path / "out"), MergeOptions(quiet=True, device="cpu"))
    want = read_all(LoraCheckpoint(e1, str(tmp_path / "a")), False)
    got = folder_tensors(tmp_path / "out")
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)


def corrupt(folder, config=None, tensors=None):
    if config:
        path = os.path.join(folder, "adapter_config.json")
        with open(path) as f:
            data = json.load(f)
        data.update(config)
        with open(path, "w") as f:
            json.dump(data, f)
    if tensors is not None:
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))


@pytest.mark.parametrize("case,match", [
    ("dora", "uses DoRA"),
    ("alora", "uses aLoRA"),
    ("arrow", "uses Arrow routing"),
    ("not_lora", "only LORA adapters"),
    ("no_rank", "positive integer 'r'"),
    ("missing_tensor", "which .* does not have"),
    ("wrong_shape", "do not make 'model.layers.0.self_attn.q_proj.weight'"),
    ("half_pair", "has lora_A without lora_B"),
    ("bad_saved_module", "'base_model.model.lm_head.weight' has shape"),
    ("foreign_key", "is not under 'base_model.model.'"),
    ("magnitude", "LoRA tensor of a kind"),
])
def test_malformed_adapters_are_refused_naming_the_file(model_sets, tmp_path, case, match):
    base = model_sets("llama")[0]
    folder = str(tmp_path / "a")
    tensors = write_adapter(folder, base, modules_to_save=("lm_head",))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    if case in ("dora", "alora", "arrow", "not_lora", "no_rank"):  # (peft cannot merge aLoRA nor Arrow adapters)
        corrupt(folder, config={"dora": {"use_dora": True}, "alora": {"alora_invocation_tokens": [1, 2]},
                                "arrow": {"arrow_config": {"top_k": 3}}, "not_lora": {"peft_type": "IA3"},
                                "no_rank": {"r": 0}}[case])
    elif case == "missing_tensor":
        corrupt(folder, tensors={**tensors, "base_model.model.model.layers.9.mlp.down_proj.lora_A.weight":
                                 torch.zeros(4, 112), "base_model.model.model.layers.9.mlp.down_proj.lora_B.weight":
                                 torch.zeros(64, 4)})
    elif case == "wrong_shape":
        corrupt(folder, tensors={**tensors, f"{q}.lora_A.weight": torch.zeros(4, 65)})
    elif case == "half_pair":
        corrupt(folder, tensors={k: v for k, v in tensors.items() if k != f"{q}.lora_B.weight"})
    elif case == "bad_saved_module":
        corrupt(folder, tensors={**tensors, "base_model.model.lm_head.weight": torch.zeros(3, 3)})
    elif case == "foreign_key":
        corrupt(folder, tensors={**tensors, "lm_head.weight": torch.zeros(3, 3)})
    elif case == "magnitude":
        corrupt(folder, tensors={**tensors, f"{q}.lora_magnitude_vector": torch.zeros(64)})
    with pytest.raises(CheckpointError, match=match) as err:
        open_model(f"{base}+{folder}")
    assert folder in str(err.value)


def with_adapter_name(key, name="default"):
    return re.sub(r"\.(lora_[AB]|lora_embedding_[AB])(?=\.weight$|$)", rf".\1.{name}", key)


def test_tensors_named_for_the_default_adapter_are_read_as_peft_loads_them(model_sets, tmp_path):
    """Some tools save peft's in-model names (q_proj.lora_A.default.weight); peft, loading the file as its adapter
    'default' (as mergekit does), takes them as they are: the same weights as the usual names give."""
    base = model_sets("llama")[0]
    tensors = write_adapter(str(tmp_path / "plain"), base, embedding="model.embed_tokens", modules_to_save=("lm_head",))
    named = str(tmp_path / "named")
    write_adapter(named, base, embedding="model.embed_tokens", modules_to_save=("lm_head",))
    corrupt(named, tensors={with_adapter_name(k): v for k, v in tensors.items()})
    plain, got = read_all(open_model(f"{base}+{tmp_path / 'plain'}"), False), read_all(open_model(f"{base}+{named}"), False)
    assert got.keys() == plain.keys() and all(torch.equal(got[n], plain[n]) for n in plain)


@pytest.mark.parametrize("rename,match", [
    (lambda k: with_adapter_name(k, "mine"), r"'base_model\.model\..*\.lora_[AB]\.mine\.weight' is named for the "
                                              r"adapter 'mine': peft loads a file as its adapter 'default'"),
    (None, r"'.*q_proj\.lora_A(\.default)?\.weight' and '.*q_proj\.lora_A(\.default)?\.weight' are both lora_A of "
           r"'model\.layers\.0\.self_attn\.q_proj' \(with and without the adapter name 'default'\); keep one"),
])
def test_tensors_named_for_another_adapter_or_twice_are_refused(model_sets, tmp_path, rename, match):
    base = model_sets("llama")[0]
    folder = str(tmp_path / "a")
    tensors = write_adapter(folder, base)
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    corrupt(folder, tensors={rename(k): v for k, v in tensors.items()} if rename else
            {**tensors, with_adapter_name(q_a): tensors[q_a].clone()})
    with pytest.raises(CheckpointError, match=match) as err:
        open_model(f"{base}+{folder}")
    assert folder in str(err.value)


def test_reference_forms(model_sets, tmp_path):
    base = model_sets("llama")[0]
    folder = str(tmp_path / "a")
    write_adapter(folder, base)
    with pytest.raises(ConfigError, match="BASE\\+ADAPTER"):
        parse_config({"merge_method": "linear", "models": [{"model": f"{base}+{folder}+x"}]})
    with pytest.raises(ConfigError, match="BASE_FOLDER\\+ADAPTER_FOLDER"):  # the adapter alone, as a model
        merge(parse_config({"merge_method": "linear", "models": [{"model": folder, "parameters": {"weight": 1}}]}),
              str(tmp_path / "out"), MergeOptions(quiet=True))


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def refusal(base, folder) -> str:
    """The one-line CheckpointError opening BASE+folder gives; it names the adapter folder."""
    with pytest.raises(CheckpointError) as err:
        open_model(f"{base}+{folder}")
    message = str(err.value)
    assert folder in message and "\n" not in message
    return message


@pytest.mark.parametrize("setting,match", [
    ({"r": True}, "positive integer 'r', not True"),
    ({"lora_alpha": float("nan")}, "finite number 'lora_alpha', not nan"),
    ({"lora_alpha": float("inf")}, "finite number 'lora_alpha', not inf"),
    ({"lora_alpha": True}, "finite number 'lora_alpha', not True"),
    ({"lora_alpha": 10 ** 400}, "finite number 'lora_alpha'"),
    ({"rank_pattern": {"q_proj": float("nan")}}, "rank_pattern: the value for 'q_proj' must be a positive number"),
    ({"rank_pattern": {"q_proj": 10 ** 400}}, "rank_pattern: the value for 'q_proj' must be a positive number"),
    ({"rank_pattern": {"q_proj": 4.0}}, r"rank_pattern: the value for 'q_proj' must be a positive number \(an integer rank\)"),
    ({"alpha_pattern": {"v_proj": float("inf")}}, "alpha_pattern: the value for 'v_proj' must be a positive number"),
    ({"alpha_pattern": {"v_proj": float("-inf")}}, "alpha_pattern: the value for 'v_proj' must be a positive number"),
    ({"fan_in_fan_out": "false"}, "fan_in_fan_out must be true or false, not 'false'"),
    ({"rank_pattern": {"(?i)q_proj": 4}}, r"rank_pattern: '\(\?i\)q_proj' is not a valid regular expression here"),
    # a pattern Python's matcher backtracks on exponentially: refused at once, not matched for hours
    ({"alpha_pattern": {"(.|[a-z_.0-9])*Z": 4}}, "alpha_pattern: .* repeats a group that itself repeats or alternates"),
    ({"rank_pattern": {"(?=(a+)+)q": 4}}, "rank_pattern: .* repeats a group that itself repeats or alternates"),
    # repeats in sequence: ".*" * 10 + "X" took 26 s to not match one module name
    ({"alpha_pattern": {".*" * 10 + "X": 4}}, r"alpha_pattern: '(\.\*){10}X' has 10 repeats"),
    ({"rank_pattern": {"a+.*[0-9]{1,3}X": 4}}, r"rank_pattern: .* has 3 repeats .* at most 2 are taken"),
])
def test_lora_numbers_must_be_finite_and_ranks_integers(model_sets, tmp_path, setting, match):
    """json.loads takes NaN and Infinity (written here by json.dump) and bools are ints to Python: each is refused
    naming adapter_config.json and the setting."""
    base, folder = model_sets("llama")[0], str(tmp_path / "a")
    write_adapter(folder, base)
    corrupt(folder, config=setting)
    message = refusal(base, folder)
    assert "adapter_config.json: " in message and re.search(match, message)


@pytest.mark.parametrize("key,tensor,match", [
    (f"{Q}.lora_A.weight", torch.zeros(4, 64, 1), r"'{key}' has shape \[4, 64, 1\], not a matrix"),
    (f"{Q}.lora_A.weight", torch.zeros(4), r"'{key}' has shape \[4\], not a matrix"),
    (f"{Q}.lora_B.weight", torch.tensor(1.0), r"'{key}' has shape \[\], not a matrix"),
    (f"{Q}.lora_A.weight", torch.ones(4, 64, dtype=torch.int32), "'{key}' is int32, not a floating-point tensor"),
    (f"{Q}.lora_B.weight", torch.ones(64, 4, dtype=torch.uint8), "'{key}' is uint8, not a floating-point tensor"),
    ("base_model.model.lm_head.weight", torch.ones(256, 64, dtype=torch.bool), "'{key}' is bool, not a floating"),
    (f"{Q}.lora_A.weight", torch.ones(4, 64, dtype=torch.complex64), "tensor '{key}': unsupported dtype C64"),
])
def test_adapter_tensors_must_be_floating_point_matrices(model_sets, tmp_path, key, tensor, match):
    base, folder = model_sets("llama")[0], str(tmp_path / "a")
    tensors = write_adapter(folder, base, modules_to_save=("lm_head",))
    corrupt(folder, tensors={**tensors, key: tensor})
    message = refusal(base, folder)
    assert "adapter_model.safetensors: " in message and re.search(match.format(key=re.escape(key)), message)
    assert "without" not in message  # the refused tensor still pairs with its partner: one problem, not two


@pytest.mark.parametrize("config,tensor_rank,match", [
    ({"rank_pattern": {"q_proj": 8}}, 4, "rank_pattern 'q_proj' gives '{module}' rank 8"),
    ({"r": 8}, 4, "r gives '{module}' rank 8"),  # no rank_pattern entry: peft builds the layer with r
    ({}, 0, "r gives '{module}' rank 4"),  # empty A and B
])
def test_the_configured_rank_must_be_the_tensors_rank(model_sets, tmp_path, config, tensor_rank, match):
    """peft builds each layer with rank_pattern's rank for it, else r, and cannot load A and B of another rank
    (a size mismatch; mergekit fails): the scaling alpha / r would be wrong, so the adapter is refused."""
    base, folder = model_sets("llama")[0], str(tmp_path / "a")
    tensors = write_adapter(folder, base)
    corrupt(folder, config=config, tensors={**tensors, f"{Q}.lora_A.weight": torch.zeros(tensor_rank, 64),
                                            f"{Q}.lora_B.weight": torch.zeros(64, tensor_rank)})
    message = refusal(base, folder)
    module = Q.removeprefix("base_model.model.")
    assert f"'{Q}.lora_A.weight' has rank {tensor_rank} but adapter_config.json's " in message
    assert match.format(module=module) in message


@pytest.mark.parametrize("key", ["q_proj", "layers.*.q_proj", "^(?!.*lm_head).*", "q_proj|v_proj", ".*layers.*",
                                 "model.layers.(0|1).self_attn.q_proj", r"layers\.\d+\.mlp\.(gate|up)_proj"])
def test_the_patterns_peft_configs_use_are_taken(key):
    assert _pattern_problem({key: 2}, ranks=True) is None


def test_a_rank_pattern_that_matches_the_tensors_is_used(model_sets, tmp_path):
    base, folder = model_sets("llama")[0], str(tmp_path / "a")
    write_adapter(folder, base, r=4, rank_pattern={"q_proj": 2, "down_proj": 6})
    ckpt = open_model(f"{base}+{folder}")
    assert ckpt.targets["model.layers.1.self_attn.q_proj.weight"].scaling == 8 / 2
    assert ckpt.targets["model.layers.1.mlp.down_proj.weight"].scaling == 8 / 6


@pytest.mark.parametrize("key,value,dtype", [
    (f"{Q}.lora_A.weight", float("nan"), torch.float32),
    (f"{Q}.lora_B.weight", float("-inf"), torch.bfloat16),
    (f"{Q}.lora_A.weight", float("nan"), torch.float8_e4m3fn),  # torch has no isfinite for it
    ("base_model.model.lm_head.weight", float("inf"), torch.float32),
])
def test_non_finite_adapter_tensors_are_refused_when_read(model_sets, tmp_path, key, value, dtype):
    base, folder = model_sets("llama")[0], str(tmp_path / "a")
    tensors = write_adapter(folder, base, modules_to_save=("lm_head",), dtype=dtype)
    poisoned = tensors[key].float()
    poisoned.view(-1)[-1] = value
    corrupt(folder, tensors={**tensors, key: poisoned.to(dtype)})
    target = key.removeprefix("base_model.model.").replace(".lora_A", "").replace(".lora_B", "")
    reads = [lambda c: c.read(target)] + [lambda c: c.hold_adapter()] * (".lora_" in key)  # holds A, B only
    for read in reads:
        ckpt = open_model(f"{base}+{folder}")  # planning reads no tensor data
        with pytest.raises(CheckpointError, match=f"adapter_model.safetensors: tensor '{re.escape(key)}' holds NaN or Inf"):
            read(ckpt)
    clean = str(tmp_path / "clean")
    write_adapter(clean, base, modules_to_save=("lm_head",), dtype=dtype)
    LoraCheckpoint(base, clean).hold_adapter()


def test_an_update_that_overflows_is_blamed_on_the_adapter_not_the_base(model_sets, tmp_path):
    """lora_alpha 1e308 is finite, but no update it scales is: the merge's error names the adapter and its scale."""
    base, other, third = model_sets("llama")[:3]
    folder = str(tmp_path / "a")
    write_adapter(folder, other, r=2, alpha=1e308)
    cfg = {"merge_method": "ties", "base_model": base, "dtype": "bfloat16",
           "models": [{"model": f"{other}+{folder}", "parameters": {"weight": 0.5, "density": 0.3}},
                      {"model": third, "parameters": {"weight": 0.5, "density": 0.3}}]}
    with pytest.raises(MergeEngineError) as err:
        merge(parse_config(cfg), str(tmp_path / "out"), MergeOptions(device="cpu", quiet=True))
    assert re.search(rf"{re.escape(folder)}: its update to tensor '.*_proj.weight' of {re.escape(other)}, at scale "
                     r"5e\+307 \(from lora_alpha and r\), overflows float32: \d+ NaN or Inf", str(err.value))
    ckpt = open_model(f"{other}+{folder}")
    assert ckpt.non_finite("model.norm.weight", 3) == (f"{other}: tensor 'model.norm.weight' has 3 NaN or Inf "
                                                       "value(s) (a corrupt checkpoint?)")


def test_a_non_finite_value_is_found_in_any_chunk():
    t = torch.zeros(10)
    assert _all_finite(t, chunk=3)
    t[9] = float("nan")
    assert not _all_finite(t, chunk=3)


def test_an_adapter_file_truncated_after_opening_is_a_checkpoint_error(model_sets, tmp_path):
    """Tensor data is read with positional reads: a file cut short during a merge gives an error naming it and
    the tensor (a memory map would die of SIGBUS)."""
    base, folder = model_sets("llama")[0], str(tmp_path / "a")
    tensors = write_adapter(folder, base)
    path = os.path.join(folder, "adapter_model.safetensors")
    ckpt = open_model(f"{base}+{folder}")
    before = {n: ckpt.adapter_bytes(n) for n in ckpt.targets}
    assert before[Q.removeprefix("base_model.model.") + ".weight"] == (tensors[f"{Q}.lora_A.weight"].nbytes
                                                                         + tensors[f"{Q}.lora_B.weight"].nbytes)
    with open(path, "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
    target = Q.removeprefix("base_model.model.") + ".weight"
    ckpt.read(target)  # the adapter file is open from here on
    os.truncate(path, data_start + 4)
    with pytest.raises(CheckpointError, match=f"{re.escape(path)}: tensor '{re.escape(Q)}.lora_[AB].weight': file ended early"):
        ckpt.read(target)
    with pytest.raises(CheckpointError, match=f"{re.escape(path)}: tensor '.*': file ended early"):
        ckpt.hold_adapter()
    assert {n: ckpt.adapter_bytes(n) for n in ckpt.targets} == before  # from the header read at opening
    with pytest.raises(CheckpointError, match=f"{re.escape(path)}: tensor '.*': data range .* runs past the end"):
        open_model(f"{base}+{folder}")  # and opening it now refuses it by its header


def test_a_model_of_unknown_layer_type_takes_the_adapters_layout_where_the_shape_cannot_tell(model_sets, tmp_path):
    """A remote-code GPT-2 derivative (Jais) stores Conv1D weights [in, out]: a non-square one's shape says so, and
    a square one follows adapter_config.json's fan_in_fan_out, as peft (which sees the layer type) would."""
    import shutil
    base = str(shutil.copytree(model_sets("gpt2")[0], tmp_path / "jais"))
    config = json.load(open(os.path.join(base, "config.json")))
    json.dump({**config, "model_type": "jais"}, open(os.path.join(base, "config.json"), "w"))
    adapter = write_adapter(str(tmp_path / "a"), base, targets=("c_attn", "c_proj"), r=4, alpha=8, fan_in_fan_out=True)
    got, plain = read_all(open_model(f"{base}+{tmp_path / 'a'}"), False), model_tensors(base)
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight"):  # [64, 192], [64, 64]
        want = plain[name].to(FP64) + update(adapter, name.removesuffix(".weight"), 2.0, transpose=True)
        torch.testing.assert_close(got[name].to(FP64), want, rtol=1e-6, atol=1e-6)


LAYERS = range(4)


def adapted(kinds=("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"), layers=LAYERS) -> set[str]:
    return {f"model.layers.{i}.{kind}.weight" for i in layers for kind in kinds}


@pytest.mark.parametrize("config,changed", [
    ({"target_modules": ["q_proj", "down_proj"]}, adapted(("self_attn.q_proj", "mlp.down_proj"))),
    ({"target_modules": r".*\.(q|v)_proj"}, adapted(("self_attn.q_proj", "self_attn.v_proj"))),
    ({"target_modules": "model.layers.1.self_attn.q_proj"}, adapted(("self_attn.q_proj",), [1])),
    ({"exclude_modules": ["v_proj"]}, adapted(("self_attn.q_proj", "mlp.down_proj"))),
    ({"exclude_modules": r"model\.layers\.0\..*"}, adapted(layers=[1, 2, 3])),
    ({"layers_to_transform": [1, 3], "layers_pattern": "layers"}, adapted(layers=[1, 3])),
    ({"layers_to_transform": 2}, adapted(layers=[2])),
    ({"layers_to_transform": [0], "layers_pattern": ["blocks", "layers"]}, adapted(layers=[0])),
    ({"layers_to_transform": [0], "layers_pattern": "blocks"}, set()),
    # a module named in full is taken whatever layers_to_transform says (peft's order of checks)
    ({"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"], "layers_to_transform": [1]},
     adapted(("self_attn.q_proj",), [0]) | adapted(("self_attn.v_proj",), [1])),
    ({"modules_to_save": ["down_proj"]}, adapted(("self_attn.q_proj", "self_attn.v_proj"))),
])
def test_lora_tensors_of_modules_peft_does_not_adapt_are_ignored(model_sets, tmp_path, caplog, config, changed):
    """peft builds LoRA layers only for the modules adapter_config.json targets (target_modules as names or a
    regular expression, less exclude_modules and modules_to_save, in layers_to_transform) and loads no other
    adapter tensor: those modules keep their base weights, with a warning naming the tensors left out."""
    base, folder = model_sets("llama")[0], str(tmp_path / "a")
    adapter = write_adapter(folder, base, r=4, alpha=8)
    corrupt(folder, config=config)
    with caplog.at_level("WARNING", logger="merge_engine"):
        got = read_all(open_model(f"{base}+{folder}"), False)
    plain = model_tensors(base)
    assert {n for n in got if not torch.equal(got[n], plain[n])} == changed
    for name in changed:
        want = plain[name].to(FP64) + update(adapter, name.removesuffix(".weight"), 2.0)
        torch.testing.assert_close(got[name].to(FP64), want, rtol=1e-6, atol=1e-6)
    left_out = 2 * (len(adapted()) - len(changed))
    assert f"{left_out} LoRA tensor(s) (base_model.model.model.layers." in caplog.text and "peft ignores them" in caplog.text


def test_all_linear_adapts_every_linear_layer_but_the_output_head(model_sets, tmp_path):
    """target_modules "all-linear": peft adapts every Linear layer except the output embedding (lm_head), and
    no embedding."""
    base, folder = model_sets("llama")[0], str(tmp_path / "a")
    write_adapter(folder, base, targets=("q_proj", "lm_head"), embedding="model.embed_tokens")
    corrupt(folder, config={"target_modules": "all-linear"})
    ckpt = open_model(f"{base}+{folder}")
    assert set(ckpt.targets) == adapted(("self_attn.q_proj",))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_an_adapter_whose_initialisation_changes_the_base_is_refused(model_sets, tmp_path, init):
    """peft reruns PiSSA's, OLoRA's (...) initialisation on the base weights when it loads such an adapter,
    subtracting the initial factors (or quantising the weight) before the update is added."""
    base, folder = model_sets("llama")[0], str(tmp_path / "a")
    write_adapter(folder, base)
    corrupt(folder, config={"init_lora_weights": init})
    message = refusal(base, folder)
    assert f"init_lora_weights is {init!r}: peft redoes that initialisation on the base weights" in message
    assert "path_initial_model_for_weight_conversion" in message


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_initialisations_that_leave_the_base_as_it_is_are_taken(model_sets, tmp_path, init):
    base, folder = model_sets("llama")[0], str(tmp_path / "a")
    write_adapter(folder, base)
    corrupt(folder, config={"init_lora_weights": init})
    assert len(open_model(f"{base}+{folder}").targets) == len(adapted())


@pytest.mark.parametrize("config,match", [
    ({"target_modules": 3}, "target_modules must be a list of module names or a string"),
    ({"target_modules": ["q_proj", 1]}, "target_modules must be a list of module names or a string"),
    ({"modules_to_save": "lm_head"}, "modules_to_save must be a list of module names"),
    ({"layers_to_transform": "1"}, "layers_to_transform must be a layer number or a list of them"),
    ({"layers_to_transform": [0, 1.0]}, "layers_to_transform must be a layer number or a list of them"),
    ({"target_modules": "(q|v"}, "target_modules: '\\(q\\|v' is not a valid regular expression here"),
    ({"exclude_modules": "(a+)+"}, "exclude_modules: '\\(a\\+\\)\\+' repeats a group that itself repeats"),
    ({"target_modules": ".*a.*b.*c.*d"}, "target_modules: '.*' has 4 repeats"),
    ({"modules_to_save": ["(x*)*"]}, "modules_to_save: .* repeats a group"),
])
def test_targeting_settings_peft_could_not_read_are_refused(model_sets, tmp_path, config, match):
    base, folder = model_sets("llama")[0], str(tmp_path / "a")
    write_adapter(folder, base)
    corrupt(folder, config=config)
    assert re.search(match, refusal(base, folder))


def test_peft_documented_target_regular_expression_is_taken(model_sets, tmp_path):
    base, folder = model_sets("llama")[0], str(tmp_path / "a")
    write_adapter(folder, base)
    corrupt(folder, config={"target_modules": r".*layers.*(self_attn|mlp).*(q_proj|down_proj)$"})  # three repeats
    assert set(open_model(f"{base}+{folder}").targets) == adapted(("self_attn.q_proj", "mlp.down_proj"))


@pytest.mark.parametrize("saved_head", [False, True])
def test_an_update_to_a_head_tied_to_the_embeddings_changes_the_embeddings(model_sets, tmp_path, saved_head):
    """Qwen2's lm_head is its embedding matrix (no tensor of its own): peft adds lm_head's update to that one
    matrix, after loading the copy of it the adapter saves as lm_head.base_layer (peft's save_embedding_layers),
    and so mergekit's merged copy has the embeddings changed."""
    base, folder = model_sets("qwen2")[0], str(tmp_path / "a")
    tensors = write_adapter(folder, base, targets=("q_proj",), r=2, alpha=3)
    plain = model_tensors(base)
    embed = plain["model.embed_tokens.weight"]
    gen = torch.Generator().manual_seed(3)
    head = {"base_model.model.lm_head.lora_A.weight": 0.1 * torch.randn(2, embed.shape[1], generator=gen),
            "base_model.model.lm_head.lora_B.weight": 0.1 * torch.randn(embed.shape[0], 2, generator=gen)}
    saved = embed + 0.01 * torch.randn(embed.shape, generator=gen)
    head |= {"base_model.model.lm_head.base_layer.weight": saved} if saved_head else {}
    corrupt(folder, config={"target_modules": ["q_proj", "lm_head"]}, tensors={**tensors, **head})
    ckpt = open_model(f"{base}+{folder}")
    assert "lm_head.weight" not in ckpt.tensors
    want = (saved if saved_head else embed).to(FP64) + update(head, "lm_head", 3 / 2)
    torch.testing.assert_close(ckpt.read("model.embed_tokens.weight").to(FP64), want, rtol=1e-6, atol=1e-6)


def test_updates_to_both_a_tied_head_and_its_embeddings_are_refused(model_sets, tmp_path):
    base, folder = model_sets("qwen2")[0], str(tmp_path / "a")
    tensors = write_adapter(folder, base, targets=("q_proj",), embedding="model.embed_tokens")
    embed = model_tensors(base)["model.embed_tokens.weight"]
    corrupt(folder, config={"target_modules": ["q_proj", "embed_tokens", "lm_head"]}, tensors={
        **tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, embed.shape[1]),
        "base_model.model.lm_head.lora_B.weight": torch.zeros(embed.shape[0], 4)})
    assert "both change 'model.embed_tokens.weight' (an output head tied to the embeddings)" in refusal(base, folder)


@pytest.mark.parametrize("saved", ["lm_head", "model.embed_tokens"])
def test_a_saved_copy_of_a_tied_head_or_its_embeddings_unties_them(model_sets, tmp_path, folder_tensors, saved):
    """modules_to_save gives the module a matrix of its own: peft's merged Qwen2 (whose head is its embedding matrix)
    has the saved copy in that module and the base's embeddings in the other, and its config unties them."""
    base, folder = model_sets("qwen2")[0], str(tmp_path / "a")
    tensors = write_adapter(folder, base, targets=("q_proj",), r=2, alpha=3)
    embed = model_tensors(base)["model.embed_tokens.weight"]
    copy = embed + 0.01 * torch.randn(embed.shape, generator=torch.Generator().manual_seed(3))
    corrupt(folder, config={"modules_to_save": [saved.rsplit(".", 1)[-1]]},
            tensors={**tensors, f"base_model.model.{saved}.weight": copy})
    cfg = {"merge_method": "linear", "models": [{"model": f"{base}+{folder}", "parameters": {"weight": 1.0}}]}
    merge(parse_config(cfg), str(tmp_path / "out"), MergeOptions(quiet=True, device="cpu"))
    got = folder_tensors(tmp_path / "out")
    other = "model.embed_tokens.weight" if saved == "lm_head" else "lm_head.weight"
    assert torch.equal(got[f"{saved}.weight"], copy) and torch.equal(got[other], embed)
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is False


def test_a_mica_update_is_rounded_to_the_weights_dtype_before_the_add(model_sets, tmp_path):
    """peft merges a MiCA adapter (init_lora_weights "mica") as weight += update.to(weight's dtype): in bf16 the
    update is rounded, then the sum, where a plain LoRA's fp32 sum is rounded once."""
    base = model_sets("llama_bf16_sharded")[0]
    adapter = write_adapter(str(tmp_path / "a"), base, r=4, alpha=8, init_lora_weights="mica")
    ckpt, plain = open_model(f"{base}+{tmp_path / 'a'}"), model_tensors(base)
    assert len(ckpt.targets) == 4 * 3
    for name in ckpt.targets:
        module = f"base_model.model.{name.removesuffix('.weight')}"
        update = adapter[f"{module}.lora_B.weight"] @ adapter[f"{module}.lora_A.weight"] * 2
        assert torch.equal(ckpt.read(name), plain[name] + update.to(torch.bfloat16)), name


def test_a_pickled_adapter_reads_as_its_safetensors_copy(model_sets, tmp_path):
    """adapter_model.bin (peft's older format), read where there is no adapter_model.safetensors, as peft does."""
    base = model_sets("llama_bf16_sharded")[0]
    weights = write_adapter(str(tmp_path / "a"), base, embedding="model.embed_tokens", modules_to_save=("lm_head",))
    want = read_all(open_model(f"{base}+{tmp_path / 'a'}"), True)
    os.remove(tmp_path / "a" / "adapter_model.safetensors")
    torch.save(weights, tmp_path / "a" / "adapter_model.bin")
    pickled = open_model(f"{base}+{tmp_path / 'a'}")
    assert pickled._file.endswith("adapter_model.bin")
    got = read_all(pickled, True)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    os.remove(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors or adapter_model.bin"):
        open_model(f"{base}+{tmp_path / 'a'}")
