"""merge_state_dicts and merge_tensors (merge_engine/in_memory.py): identical to mergekit 0.1.5's Python API of the
same name on every deterministic method, identical to a config merge of the same tensors on every method (the random
ones included), and every malformed argument refused with what is wrong."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_engine import MergeOptions, PerGroupValues, merge, merge_state_dicts, merge_tensors, parse_config
from merge_engine.methods import REGISTRY

IDS = ["m0", "m1", "m2", "m3"]


def make_state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    """Four models of odd-sized tensors in three dtypes (one stored bf16 in m1 and fp32 elsewhere: promoted) and an
    integer buffer all four share."""
    out = {}
    for i, model in enumerate(IDS):
        g = torch.Generator().manual_seed(10 + i)
        base = torch.Generator().manual_seed(10)  # a shared base, so that task vectors are small, as in practice
        def near(*shape, dtype=torch.float32):
            return (torch.randn(*shape, generator=base) + 0.1 * torch.randn(*shape, generator=g)).to(dtype)
        out[model] = {"a.weight": near(7, 9, dtype=torch.bfloat16 if model == "m1" else torch.float32),
                      "b.bias": near(5, dtype=torch.bfloat16), "c.weight": near(3, 4, 2, dtype=torch.float16),
                      "position_ids": torch.arange(6)}
    return out


MODELS = make_state_dicts()
TENSORS = list(MODELS["m0"])
# name -> (method, models, base, parameters, dtype, out_dtype); {"per_group": [...]} is PerGroupValues
CASES = {
    "linear": ("linear", IDS[:3], None, {"weight": [1.0, 0.5, 0.25]}, None, None),
    "linear_per_group": ("linear", IDS[:3], None, {"weight": {"per_group": [
        [1.0, 2.0, 3.0], 0.5, {"m0": 1.0, "m1": 0.0, "m2": 2.0}, 1.0]}, "normalize": False}, None, None),
    "task_arithmetic": ("task_arithmetic", IDS[:3], "m0", {"weight": {"m1": 0.7, "m2": 0.3}, "lambda": 0.9}, None,
                        None),
    "ties": ("ties", IDS, "m0", {"weight": [0.6, 0.4, 0.8], "density": [0.5, 0.3, 0.7], "normalize": True}, None,
             None),
    "ties_bf16_to_fp16": ("ties", IDS[:3], "m0", {"weight": 0.5, "density": 0.6}, "bfloat16", "float16"),
    "breadcrumbs_ties": ("breadcrumbs_ties", IDS, "m0", {"weight": 0.5, "density": 0.8, "gamma": 0.05}, None, None),
    "slerp": ("slerp", IDS[:2], "m0", {"t": 0.3}, None, None),
    "nuslerp": ("nuslerp", IDS[1:3], None, {"weight": [0.4, 0.6]}, None, None),
    "multislerp": ("multislerp", IDS[:3], "m0", {"weight": [0.3, 0.7]}, None, None),
    "karcher": ("karcher", IDS[:3], None, {}, None, None),
    "model_stock": ("model_stock", IDS, "m0", {}, None, None),
    "sce": ("sce", IDS, "m0", {"select_topk": 0.5}, None, None),
    "nearswap": ("nearswap", IDS[:2], "m0", {"t": 0.5}, None, None),
    "arcee_fusion": ("arcee_fusion", IDS[:2], "m0", {}, None, None),
    "ram": ("ram", IDS[:3], "m0", {}, None, None),
    "ramplus_tl": ("ramplus_tl", IDS[:3], "m0", {"r": 0.2, "alpha": 0.3}, None, None),
    "breadcrumbs": ("breadcrumbs", IDS[:3], "m0", {"weight": [0.5, 0.7], "density": 0.7, "gamma": 0.1}, None, None),
    "passthrough": ("passthrough", IDS[1:2], None, {"scale": 2.0}, "float32", None),
}


def arguments(case: str) -> dict:
    method, models, base, parameters, dtype, out_dtype = CASES[case]
    params = {k: PerGroupValues(v["per_group"]) if isinstance(v, dict) and "per_group" in v else v
              for k, v in parameters.items()}
    return dict(models={m: MODELS[m] for m in models}, method=method, base=base, parameters=params,
                dtype=dtype and getattr(torch, dtype), out_dtype=out_dtype and getattr(torch, out_dtype))


@pytest.fixture(scope="module")
def mergekit_api(mergekit_yaml, tmp_path_factory):
    """Each case's merge by mergekit's merge_state_dicts (tests/mergekit_api_runner.py, in mergekit's Python):
    (outputs by case and tensor, errors by case)."""
    root = tmp_path_factory.mktemp("mergekit_api")
    save_file({f"{m}/{n}": t for m, sd in MODELS.items() for n, t in sd.items()}, str(root / "in.safetensors"))
    (root / "cases.json").write_text(json.dumps({"order": TENSORS, "cases": [
        {"name": name, "method": c[0], "models": c[1], "base": c[2], "parameters": c[3], "dtype": c[4],
         "out_dtype": c[5], "strict": True} for name, c in CASES.items()]}))
    python = os.path.join(os.path.dirname(mergekit_yaml), "python")
    runner = os.path.join(os.path.dirname(__file__), "mergekit_api_runner.py")
    subprocess.run([python, runner, *(str(root / f) for f in ("in.safetensors", "cases.json", "out.safetensors",
                                                               "errors.json"))],
                   check=True, capture_output=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    outputs: dict = {}
    for key, tensor in load_file(str(root / "out.safetensors")).items():
        case, name = key.split("/", 1)
        outputs.setdefault(case, {})[name] = tensor
    return outputs, json.loads((root / "errors.json").read_text())


@pytest.mark.mergekit
@pytest.mark.parametrize("case", sorted(CASES))
def test_identical_to_mergekits_merge_state_dicts(case, mergekit_api):
    outputs, errors = mergekit_api
    assert case not in errors, errors.get(case)
    ours = merge_state_dicts(**arguments(case))
    theirs = outputs[case]
    assert list(ours) == TENSORS and set(theirs) == set(TENSORS)
    different = [n for n in TENSORS if ours[n].dtype != theirs[n].dtype or not torch.equal(ours[n], theirs[n])]
    assert not different, f"{different}: ours {[ours[n].dtype for n in different]}, theirs " \
                          f"{[theirs[n].dtype for n in different]}"


# the random methods, and merge_engine's own (BMM without statistics: data_free)
OTHERS = {"dare_ties": {"weight": 0.5, "density": [0.6, 0.4]}, "dare_linear": {"weight": 0.5, "density": 0.5},
          "della": {"weight": [0.5, 0.7], "density": 0.6, "epsilon": 0.1}, "tsv": {}, "iso_c": {"alpha": 1.3},
          "bmm": {"data_free": True, "lambda": 0.5}}


def as_config(method: str, models: list[str], base: str | None, parameters: dict, folders: dict) -> dict:
    """The config that merges these models so: scalars as its parameters, sequences as each model's."""
    scopes = {p.name: p.scope.value for p in REGISTRY[method].params}
    entries = [{"model": str(folders[m]), "parameters": {}} for m in models]
    for name, value in parameters.items():
        if isinstance(value, list):
            takers = [e for e, m in zip(entries, models) if m != base or scopes[name] == "input"]
            for entry, v in zip(takers, value):
                entry["parameters"][name] = v
    config = {"merge_method": method, "models": entries,
              "parameters": {k: v for k, v in parameters.items() if not isinstance(v, list)}}
    return {**config, "base_model": str(folders[base])} if base else config


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(c for c in CASES if c != "linear_per_group" and c != "task_arithmetic")
                         + sorted(OTHERS))
def test_identical_to_a_config_merge_of_the_same_tensors(case, tmp_path, folder_tensors):
    """The same tensors saved as model folders and merged by a config: the same bits, the random methods' drops
    included (keyed by random_seed and the tensor's name in both), and merge_engine's own methods."""
    method, models, base, parameters, dtype, out_dtype = (case, IDS[:3], "m0", OTHERS[case], None, None) \
        if case in OTHERS else CASES[case]
    folders = {m: tmp_path / m for m in models}
    for m, folder in folders.items():
        folder.mkdir()
        save_file(MODELS[m], str(folder / "model.safetensors"))
    config = {**as_config(method, models, base, parameters, folders), "dtype": dtype, "out_dtype": out_dtype}
    merge(parse_config({k: v for k, v in config.items() if v is not None}), str(tmp_path / "out"),
          MergeOptions(quiet=True, copy_tokenizer=False, random_seed=7))
    ours = merge_state_dicts({m: MODELS[m] for m in models}, method, base=base, parameters=parameters,
                             dtype=dtype and getattr(torch, dtype), out_dtype=out_dtype and getattr(torch, out_dtype),
                             random_seed=7)
    written = folder_tensors(tmp_path / "out")
    assert set(written) == set(ours)
    assert [n for n in written if ours[n].dtype != written[n].dtype or not torch.equal(ours[n], written[n])] == []


def test_merge_tensors_is_one_group_of_merge_state_dicts():
    tensors = [MODELS[m]["a.weight"] for m in IDS[:3]]
    one = merge_tensors(tensors, "ties", ids=IDS[:3], base_index=0, name="a.weight",
                        parameters={"weight": {"m1": 0.6, "m2": 0.4}, "density": 0.5})
    whole = merge_state_dicts({m: MODELS[m] for m in IDS[:3]}, "ties", base="m0",
                              parameters={"weight": {"m1": 0.6, "m2": 0.4}, "density": 0.5})
    assert torch.equal(one, whole["a.weight"])


def test_random_drops_are_keyed_by_seed_and_tensor_name():
    tensors = [MODELS[m]["a.weight"] for m in IDS[:3]]
    def dare(name, seed=0):
        return merge_tensors(tensors, "dare_linear", base_index=0, name=name, random_seed=seed,
                             parameters={"weight": 1.0, "density": 0.5})
    assert torch.equal(dare("x"), dare("x")) and not torch.equal(dare("x"), dare("y"))
    assert not torch.equal(dare("x"), dare("x", seed=1))


def test_the_inputs_are_left_as_they_are_and_the_result_is_no_view_of_them():
    original = {n: t.clone() for n, t in MODELS["m1"].items()}
    out = merge_state_dicts([MODELS["m1"]], "passthrough")
    out["a.weight"].add_(1)
    out["position_ids"].add_(1)
    assert all(torch.equal(MODELS["m1"][n], t) for n, t in original.items())


def test_modules_merge_through_their_state_dicts_without_autograd():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    out = merge_state_dicts([a, b], "linear", parameters={"weight": [1.0, 3.0]})
    assert set(out) == {"weight", "bias"} and not out["weight"].requires_grad
    assert torch.allclose(out["weight"], (a.weight + 3 * b.weight).detach() / 4)


def test_strict_false_merges_the_names_every_model_has_in_the_first_ones_order():
    models = [{"x": torch.ones(2), "y": torch.ones(3), "z": torch.ones(1)}, {"z": torch.zeros(1), "x": torch.zeros(2)}]
    with pytest.raises(ValueError, match=r"different tensor names .*lacking: \{1: \['y'\]\}"):
        merge_state_dicts(models, "linear", parameters={"weight": 1.0})
    out = merge_state_dicts(models, "linear", parameters={"weight": 1.0}, strict=False)
    assert list(out) == ["x", "z"] and torch.equal(out["x"], torch.full((2,), 0.5))


BAD = [  # (arguments of merge_state_dicts, the error, its message)
    (dict(models=[MODELS["m0"]], method="tie"), ValueError, r"unknown merge method 'tie'"),
    (dict(models=[MODELS["m0"]], method="fisher", parameters={"weight": 1.0}), ValueError,
     r"merge method 'fisher' reads per-model statistics \(fisher\) from folders"),
    (dict(models=[MODELS["m0"], MODELS["m1"]], method="linear", parameters={"weight": 1.0, "densty": 0.5}),
     TypeError, r"unknown parameter\(s\) for merge method 'linear': densty \(it takes: weight, normalize"),
    (dict(models=[MODELS["m0"], MODELS["m1"]], method="linear"), TypeError, "missing required parameter 'weight'"),
    (dict(models=[MODELS["m0"], MODELS["m1"]], method="linear", parameters={"weight": [1.0]}), ValueError,
     r"parameter 'weight' needs one value per input \(2\), got 1"),
    (dict(models={"a": MODELS["m0"], "b": MODELS["m1"]}, method="ties", base="a", parameters={"weight": [1.0, 2.0]}),
     ValueError, r"parameter 'weight' needs one value per non-base input \(1\), got 2"),
    (dict(models={"a": MODELS["m0"], "b": MODELS["m1"]}, method="linear", parameters={"weight": {"a": 1.0}}),
     ValueError, r"parameter 'weight' has no value for input\(s\) \['b'\]"),
    (dict(models=[MODELS["m0"], MODELS["m1"]], method="linear", parameters={"weight": PerGroupValues([1.0])}),
     ValueError, r"PerGroupValues holds 1 values for 4 tensor group\(s\)"),
    (dict(models=[MODELS["m0"], MODELS["m1"]], method="linear", parameters={"weight": [1.0, -1.0]}), ValueError,
     r"tensor 'a.weight': merge method 'linear': .*sum"),
    (dict(models=[MODELS["m0"], MODELS["m1"]], method="ties", base=2, parameters={"weight": 1.0}), ValueError,
     r"base 2 is not one of the models' ids \[0, 1\]"),
    (dict(models=[MODELS["m0"], MODELS["m1"], MODELS["m2"]], method="slerp", base=0, parameters={"t": 0.5}),
     ValueError, r"merge method 'slerp' needs exactly 2 inputs, got 3"),
    (dict(models=[MODELS["m0"], MODELS["m1"]], method="linear", parameters={"weight": "heavy"}), ValueError,
     r"tensor 'a.weight': 'weight' must be float, got 'heavy'"),
    (dict(models=[MODELS["m0"], {**MODELS["m1"], "b.bias": torch.ones(6)}], method="linear",
          parameters={"weight": 1.0}), ValueError, r"tensor 'b.bias': the inputs' shapes differ: \[\(5,\), \(6,\)\]"),
    (dict(models=[MODELS["m0"], {**MODELS["m1"], "position_ids": torch.arange(1, 7)}], method="linear",
          parameters={"weight": 1.0}), ValueError, r"tensor 'position_ids' is not floating point and differs between "
                                                   "models 0 and 1"),
    (dict(models=[MODELS["m0"], MODELS["m1"]], method="linear", parameters={"weight": 1.0}, out_dtype=torch.int8),
     ValueError, "out_dtype must be a floating-point torch.dtype"),
    (dict(models=[{"a": torch.ones(2).to(torch.float8_e4m3fn)}] * 2, method="linear", parameters={"weight": 1.0}),
     ValueError, r"torch.float8_e4m3fn inputs need a dtype to merge in"),
    (dict(models=[MODELS["m0"], {"a.weight": [1.0]}], method="linear", parameters={"weight": 1.0}), TypeError,
     r"model 1: a state dict maps names \(strings\) to tensors; 'a.weight' does not"),
    (dict(models=[], method="linear"), ValueError, "needs at least one model"),
    (dict(models=[MODELS["m0"], MODELS["m1"]], method="bmm", base=0,  # (the default anchor merged, without a word)
          parameters={"data_free": True, "weight": 1.0, "anchor": PerGroupValues(["linear"] * 4)}), ValueError,
     r"parameter 'anchor' chooses how merge method 'bmm' merges: give it one value, not PerGroupValues"),
    (dict(models=[{"n": torch.arange(3)}, {"n": torch.arange(3, device="meta")}], method="linear",
          parameters={"weight": 1.0}), ValueError, r"tensor 'n': the models' tensors are on different devices: "
                                                   r"\['cpu', 'meta'\]"),
    (dict(models=[MODELS["m0"], MODELS["m1"]], method="linear", parameters={"weight": 1.0}, random_seed="7"),
     TypeError, r"random_seed must be an integer, got '7'"),
    (dict(models=[MODELS["m0"], MODELS["m1"]], method="linear", parameters={"weight": 1.0}, random_seed=2**63),
     ValueError, r"random_seed must be an integer in \[-2\*\*63, 2\*\*63\), got 9223372036854775808"),
]


@pytest.mark.parametrize("arguments, error, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_arguments_are_refused_naming_what_is_wrong(arguments, error, message):
    with pytest.raises(error, match=message):
        merge_state_dicts(**arguments)


def test_merge_tensors_checks_its_own_arguments():
    x = MODELS["m0"]["a.weight"]
    with pytest.raises(ValueError, match=r"input ids must be distinct and not None, got \['a', 'a'\]"):
        merge_tensors([x, x], "linear", ids=["a", "a"], parameters={"weight": {"a": 1.0}})
    with pytest.raises(TypeError, match=r"input ids must be hashable \(they key the per-input parameters\), got "
                                        r"\[\['a'\], \['b'\]\]"):
        merge_tensors([x, x], "linear", ids=[["a"], ["b"]], parameters={"weight": 1.0})
    with pytest.raises(TypeError, match=r"name must be a tensor name \(a string\) or None, got 5"):
        merge_tensors([x, x], "ties", base_index=0, name=5, parameters={"weight": 1.0, "density": 0.5})
    with pytest.raises(ValueError, match="ids and tensors must have the same length, got 1 and 2"):
        merge_tensors([x, x], "linear", ids=["a"], parameters={"weight": 1.0})
    with pytest.raises(ValueError, match="base_index is out of range for 2 tensors, got 2"):
        merge_tensors([x, x], "task_arithmetic", base_index=2, parameters={"weight": 1.0})
    with pytest.raises(ValueError, match="merge method 'task_arithmetic' requires a base_model"):
        merge_tensors([x, x], "task_arithmetic", parameters={"weight": 1.0})
    with pytest.raises(ValueError, match=r"the tensors: only floating-point tensors merge, got torch.int64"):
        merge_tensors([torch.arange(3), torch.arange(3)], "linear", parameters={"weight": 1.0})
    with pytest.raises(ValueError, match=r"merging tensor 'x.weight' failed: expert 0 has 1 NaN or Inf value"):
        merge_tensors([torch.ones(2), torch.tensor([1.0, float("nan")])], "ties", base_index=0, name="x.weight",
                      parameters={"weight": 1.0, "density": 0.5})


def test_strided_inputs_merge_as_their_contiguous_copies():
    x, y = (MODELS[m]["a.weight"].float() for m in IDS[:2])
    def ties(*tensors):
        return merge_tensors(list(tensors), "ties", base_index=0, parameters={"weight": 1.0, "density": 0.5})
    assert torch.equal(ties(x.t(), y.t()), ties(x.t().contiguous(), y.t().contiguous()))


def test_integers_of_other_kinds_are_taken_as_integers():
    """numpy's and torch's integers for base_index and random_seed (np.int64(0) was 'out of range')."""
    import numpy as np
    tensors = [MODELS[m]["a.weight"] for m in IDS[:3]]
    def dare(**kw):
        return merge_tensors(tensors, "dare_linear", name="a", parameters={"weight": 1.0, "density": 0.5}, **kw)
    assert torch.equal(dare(base_index=np.int64(0), random_seed=torch.tensor(3)), dare(base_index=0, random_seed=3))
    with pytest.raises(TypeError, match="base_index must be an integer, got True"):
        dare(base_index=True)
