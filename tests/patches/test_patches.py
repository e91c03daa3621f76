"""Extract, apply, remove and compose patches through files; a patch as a merge input; patches in memory."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_engine import MergeOptions, merge, parse_config
from merge_engine.demo import make_synthetic_llama
from merge_engine.errors import CheckpointError
from merge_engine.io.checkpoint import Checkpoint
from merge_engine.patches import (
    Selection,
    apply_patches,
    apply_patches_in_memory,
    extract_patch,
    remove_patches,
    remove_patches_in_memory,
)
from merge_engine.patches import arithmetic as ar
from merge_engine.patches.format import open_patch
from merge_engine.patches.select import layer_of
from tests.conftest import ulp
from tests.patches.conftest import SHAPE, read_all, same_bits


@pytest.fixture(scope="module")
def bf16(models, tmp_path_factory):
    """The bf16 models and a bf16 patch of each fine-tune."""
    m = dict(models(torch.bfloat16))
    root = tmp_path_factory.mktemp("bf16_patches")
    for tuned in ("tuned", "tuned2"):
        m[f"p_{tuned}"] = str(root / f"p_{tuned}")
        extract_patch(m["base"], m[tuned], m[f"p_{tuned}"])
    return m


@pytest.mark.parametrize("dtype,storage", [(torch.bfloat16, "bfloat16"), (torch.float32, "float32"),
                                           (torch.float32, "bfloat16")])
def test_float_patch_reproduces_the_fine_tune_and_the_base_bit_for_bit(models, tmp_path, dtype, storage):
    m = models(dtype)
    report = extract_patch(m["base"], m["tuned"], str(tmp_path / "p"), storage)
    assert len(report.rows) == len(read_all(m["base"])) and not report.unchanged
    apply_patches(m["base"], [str(tmp_path / "p")], str(tmp_path / "applied"))
    assert same_bits(read_all(str(tmp_path / "applied")), read_all(m["tuned"]))
    remove_patches(str(tmp_path / "applied"), [str(tmp_path / "p")], str(tmp_path / "removed"))
    assert same_bits(read_all(str(tmp_path / "removed")), read_all(m["base"]))
    assert os.path.exists(tmp_path / "applied" / "config.json")  # side files follow the weights


def test_auto_storage_is_the_weights_own_dtype_and_a_narrower_one_warns(models, tmp_path, caplog):
    m = models(torch.float32)
    assert extract_patch(m["base"], m["tuned"], str(tmp_path / "auto")).storage == "float32"
    assert "larger than the tensors it stores" not in caplog.text
    report = extract_patch(m["base"], m["tuned"], str(tmp_path / "narrow"), "bfloat16")
    assert report.patch_bytes > 1.25 * report.checkpoint_bytes and "larger than the tensors it stores" in caplog.text


def test_a_bf16_patch_of_a_small_fine_tune_needs_few_fixups(bf16, tmp_path):
    report = extract_patch(bf16["base"], bf16["tuned"], str(tmp_path / "p"))
    elements = sum(t.numel() for t in read_all(bf16["base"]).values())
    assert sum(r.fixups for r in report.rows) < 0.05 * elements
    assert report.patch_bytes < 1.3 * report.checkpoint_bytes


@pytest.mark.parametrize("storage", ["int8", "int4"])
def test_quantized_patch_is_within_its_row_bound(bf16, tmp_path, storage):
    """apply(base, q) - tuned: the row's quantization bound (arithmetic.py) plus one bf16 rounding of the sum."""
    report = extract_patch(bf16["base"], bf16["tuned"], str(tmp_path / "p"), storage)
    apply_patches(bf16["base"], [str(tmp_path / "p")], str(tmp_path / "applied"))
    base, tuned, applied = read_all(bf16["base"]), read_all(bf16["tuned"]), read_all(str(tmp_path / "applied"))
    qmax = ar.QUANTIZED[storage]
    for name in tuned:
        d = ar.as_rows(ar.difference(base[name], tuned[name])).double()
        step = d.abs().amax(1, keepdim=True) / qmax
        bound = step * (0.5 + 4 * qmax * 2.0**-24) + ulp(ar.as_rows(tuned[name]), torch.bfloat16) / 2 \
            + ulp(ar.as_rows(applied[name]), torch.bfloat16) / 2
        assert ((ar.as_rows(applied[name]).double() - ar.as_rows(tuned[name]).double()).abs() <= bound).all(), name
    # one byte (int8) or half a byte (int4) per element, plus an fp32 scale per row
    assert report.patch_bytes == sum(rows * cols + 4 * rows for rows, cols in
                                     (ar.quantized_shape(tuple(t.shape), storage) for t in tuned.values()))


def test_patches_compose_in_any_order_within_one_rounding(bf16, tmp_path):
    p1, p2 = bf16["p_tuned"], bf16["p_tuned2"]
    apply_patches(bf16["base"], [(p1, 0.5), (p2, 0.7)], str(tmp_path / "a"))
    apply_patches(bf16["base"], [(p2, 0.7), (p1, 0.5)], str(tmp_path / "b"))
    apply_patches(bf16["base"], [(p1, 0.5)], str(tmp_path / "step1"))
    apply_patches(str(tmp_path / "step1"), [(p2, 0.7)], str(tmp_path / "step2"), check_base=False)
    a, b, step1, two_steps = (read_all(str(tmp_path / n)) for n in ("a", "b", "step1", "step2"))
    base, t1, t2 = read_all(bf16["base"]), read_all(bf16["tuned"]), read_all(bf16["tuned2"])
    for name in a:
        x, y, z = a[name].double(), b[name].double(), two_steps[name].double()
        # the fp32 sums differ by a few fp32 ulps of their terms (which may cancel: the result can be ~0)
        terms = base[name].double().abs() + 0.5 * (t1[name].double() - base[name].double()).abs() \
            + 0.7 * (t2[name].double() - base[name].double()).abs()
        fp32 = 4 * 2.0**-24 * terms
        # one pass: then one rounding, <= 1 bf16 ulp between orders; two passes round twice (half an ulp of the
        # intermediate, then of the result): within 1.5 ulps of the largest magnitude
        assert ((x - y).abs() <= ulp(torch.maximum(x.abs(), y.abs()), torch.bfloat16) + fp32).all(), name
        big = torch.maximum(torch.maximum(x.abs(), z.abs()), step1[name].double().abs())
        assert ((x - z).abs() <= 1.5 * ulp(big, torch.bfloat16) + fp32).all(), name
    assert any(not torch.equal(a[n], base[n]) for n in a)


def test_rescaled_apply_then_remove_is_within_one_ulp(bf16, tmp_path):
    """bf16 addition is not invertible: apply at 0.5 then remove at 0.5 rounds twice, each time by at most half an
    ulp of the result, so the base comes back within one ulp."""
    p = bf16["p_tuned"]
    apply_patches(bf16["base"], [(p, 0.5)], str(tmp_path / "a"))
    remove_patches(str(tmp_path / "a"), [(p, 0.5)], str(tmp_path / "r"), check_base=False)
    base, back, half = read_all(bf16["base"]), read_all(str(tmp_path / "r")), read_all(str(tmp_path / "a"))
    for name in base:
        b, r = base[name].double(), back[name].double()
        assert ((b - r).abs() <= ulp(torch.maximum(b.abs(), half[name].double().abs()), torch.bfloat16)).all()


def test_a_patch_for_another_base_is_refused_by_name(bf16, models, tmp_path):
    with pytest.raises(CheckpointError, match=r"p_tuned: tensor '.+' differs from the base"):
        apply_patches(bf16["other"], [bf16["p_tuned"]], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    apply_patches(bf16["other"], [bf16["p_tuned"]], str(tmp_path / "forced"), check_base=False)  # on request
    with pytest.raises(CheckpointError, match=r"was bfloat16 \[.+\] in the patch's base but is float32"):
        apply_patches(models(torch.float32)["base"], [bf16["p_tuned"]], str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match="does not give back the base"):
        remove_patches(bf16["tuned2"], [bf16["p_tuned"]], str(tmp_path / "out"))


def test_base_tensors_the_fine_tune_lacks_are_named_in_a_warning(bf16, tmp_path, caplog):
    """A base with a layer more than TUNED (the wrong base, say): applying the patch would keep that layer, so the
    result is not TUNED, which extraction says."""
    fewer = make_synthetic_llama(str(tmp_path / "fewer"), **dict(SHAPE, layers=SHAPE["layers"] - 1),
                                 dtype=torch.bfloat16, seed=1, base=bf16["base"], noise=1e-3)
    extract_patch(bf16["base"], fewer, str(tmp_path / "p"))
    last = SHAPE["layers"] - 1
    assert f"9 tensor(s) of the base {bf16['base']} are not in it (model.layers.{last}." in caplog.text
    caplog.clear()
    extract_patch(bf16["base"], bf16["tuned"], str(tmp_path / "q"))
    assert "are not in it" not in caplog.text


def test_changed_tensors_a_patch_cannot_store_are_named_not_dropped(tmp_path, caplog):
    """A scalar or an integer buffer the fine-tune changed cannot be stored: the report and a warning say so, rather
    than a patch that silently does not give TUNED back."""
    weight = torch.randn(4, 4)
    folders = {}
    for which, shift in (("base", 0), ("tuned", 1)):
        folders[which] = str(tmp_path / which)
        os.makedirs(folders[which])
        save_file({"model.layers.0.mlp.up_proj.weight": (weight + 0.01 * shift).bfloat16(),
                   "model.layers.0.logit_scale": torch.tensor(1.0 + shift).bfloat16(),
                   "model.layers.0.steps": torch.tensor([3, 4 + shift]),
                   "model.layers.1.steps": torch.tensor([5 + shift]),
                   "model.layers.0.kept": torch.tensor(2.0)}, os.path.join(folders[which], "model.safetensors"))
    report = extract_patch(folders["base"], folders["tuned"], str(tmp_path / "p"))
    assert [r.name for r in report.rows] == ["model.layers.0.mlp.up_proj.weight"]
    assert sorted(name for name, _ in report.left_out) == ["model.layers.0.logit_scale", "model.layers.0.steps",
                                                           "model.layers.1.steps"]
    assert "3 changed tensor(s) are not floating-point tensors" in caplog.text
    report = extract_patch(folders["base"], folders["tuned"], str(tmp_path / "q"), selection=Selection(first_layers=1))
    assert sorted(name for name, _ in report.left_out) == ["model.layers.0.logit_scale", "model.layers.0.steps"]


def test_unchanged_tensors_are_not_stored_and_identical_models_refused(bf16, tmp_path):
    half = str(tmp_path / "half")
    apply_patches(bf16["base"], [(bf16["p_tuned"], 1.0)], half)
    partial = str(tmp_path / "layer0")  # a fine-tune that changed layer 0 only
    report = extract_patch(bf16["base"], bf16["tuned"], str(tmp_path / "p0"), selection=Selection(first_layers=1))
    assert {layer_of(r.name) for r in report.rows} == {0}
    apply_patches(bf16["base"], [str(tmp_path / "p0")], partial)
    again = extract_patch(bf16["base"], partial, str(tmp_path / "again"))
    assert {r.name for r in again.rows} == {r.name for r in report.rows}
    assert set(again.unchanged) == set(read_all(bf16["base"])) - {r.name for r in report.rows}
    with pytest.raises(CheckpointError, match="equals the base"):
        extract_patch(bf16["base"], bf16["base"], str(tmp_path / "none"))
    assert not os.path.exists(tmp_path / "none")


def test_top_norm_keeps_the_fewest_layers_carrying_the_share(bf16, tmp_path):
    base, tuned = read_all(bf16["base"]), read_all(bf16["tuned"])
    norms = {}
    for name in base:
        if layer_of(name) is not None:
            norms[layer_of(name)] = norms.get(layer_of(name), 0) + float((tuned[name].double() - base[name].double())
                                                                         .square().sum())
    ranked = sorted(norms, key=norms.get, reverse=True)
    share = (norms[ranked[0]] + norms[ranked[1]] / 2) / sum(norms.values())  # needs exactly the top two layers
    report = extract_patch(bf16["base"], bf16["tuned"], str(tmp_path / "p"), selection=Selection(top_norm=share))
    assert {layer_of(r.name) for r in report.rows} == set(ranked[:2])
    report = extract_patch(bf16["base"], bf16["tuned"], str(tmp_path / "q"),
                           selection=Selection(exclude=("norm",), top_norm=share, outside_layers=True))
    assert {r.name for r in report.rows} == {n for n in base if layer_of(n) in (*ranked[:2], None) and "norm" not in n}


def test_a_patch_as_merge_input_equals_the_merge_of_the_rebuilt_checkpoint(bf16, tmp_path):
    rebuilt = {}
    for tuned in ("tuned", "tuned2"):
        rebuilt[tuned] = str(tmp_path / f"rebuilt_{tuned}")
        apply_patches(bf16["base"], [bf16[f"p_{tuned}"]], rebuilt[tuned])

    def ties(refs):
        return parse_config({"merge_method": "ties", "base_model": bf16["base"], "dtype": "bfloat16",
                             "parameters": {"normalize": True},
                             "models": [{"model": r, "parameters": {"weight": 0.6, "density": 0.5}} for r in refs]})

    merge(ties([f"{bf16['base']}+{bf16[f'p_{t}']}" for t in rebuilt]), str(tmp_path / "from_patches"),
          MergeOptions(device="cpu", quiet=True))
    merge(ties(list(rebuilt.values())), str(tmp_path / "from_folders"), MergeOptions(device="cpu", quiet=True))
    assert same_bits(read_all(str(tmp_path / "from_patches")), read_all(str(tmp_path / "from_folders")))


def test_patches_in_memory_match_the_files(bf16, tmp_path):
    state = read_all(bf16["base"])
    p1, p2 = bf16["p_tuned"], bf16["p_tuned2"]
    assert apply_patches_in_memory(state, [(p1, 0.5), (p2, 1.0)]) == len(state)
    apply_patches(bf16["base"], [(p1, 0.5), (p2, 1.0)], str(tmp_path / "files"))
    assert same_bits(state, read_all(str(tmp_path / "files")))
    with pytest.raises(CheckpointError, match="differs from the base"):  # refused before any tensor changes
        apply_patches_in_memory(state, [p1])
    assert same_bits(state, read_all(str(tmp_path / "files")))
    exact = read_all(bf16["base"])
    apply_patches_in_memory(exact, [p1])
    assert same_bits(exact, read_all(bf16["tuned"]))
    remove_patches_in_memory(exact, [p1])
    assert same_bits(exact, read_all(bf16["base"]))


def test_patches_on_a_live_transformers_model(bf16):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(bf16["base"], torch_dtype=torch.bfloat16)
    apply_patches_in_memory(model, [bf16["p_tuned"]])
    tuned = read_all(bf16["tuned"])
    state = model.state_dict()
    assert all(torch.equal(state[n].view(torch.int16), tuned[n].view(torch.int16)) for n in tuned)


def untied_pair(folder, embed: torch.Tensor, head: torch.Tensor) -> str:
    """A folder holding an embedding and an output head of their own (untied)."""
    os.makedirs(folder)
    save_file({"model.embed_tokens.weight": embed.clone(), "lm_head.weight": head.clone()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


@pytest.mark.parametrize("head_change", [0.01, -0.02])
def test_tied_tensors_in_memory_take_a_patch_only_if_it_changes_them_alike(tmp_path, head_change):
    """A tied model's embeddings and head are one storage: a patch from an untied model that changes them
    differently is refused (writing both would keep the head's change only); one that changes them alike applies."""
    weights = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    base = untied_pair(tmp_path / "base", weights, weights)
    tuned = untied_pair(tmp_path / "tuned", weights + 0.01, weights + head_change)
    extract_patch(base, tuned, str(tmp_path / "patch"))
    shared = weights.clone()
    live = {"model.embed_tokens.weight": shared, "lm_head.weight": shared}  # as a tied module's state_dict has them
    if head_change != 0.01:
        with pytest.raises(CheckpointError, match="'model.embed_tokens.weight' and 'lm_head.weight' are tied"):
            apply_patches_in_memory(live, [str(tmp_path / "patch")])
        assert torch.equal(shared, weights)
    else:
        apply_patches_in_memory(live, [str(tmp_path / "patch")])
        assert torch.equal(shared, read_all(tuned)["lm_head.weight"])


@pytest.mark.parametrize("damage,match", [
    (lambda c: c.update(format="x"), "not a merge_engine patch config"),
    (lambda c: c.update(version=2), "version 2"),
    (lambda c: c.update(storage="int3"), "storage 'int3'"),
    (lambda c: next(iter(c["tensors"].values())).update(shape=[2, "x"]), "shape must be"),
    (lambda c: next(iter(c["tensors"].values())).update(fixups=-1), "fixups must be a count"),
    (lambda c: next(iter(c["tensors"].values())).update(dtype=["bfloat16"]), r"dtype \['bfloat16'\] is not one of"),
    (lambda c: next(iter(c["tensors"].values())).update(base_fingerprint="zz"), "32 hex digits"),
    (lambda c: next(t for t in c["tensors"].values() if not t["fixups"]).update(fixups=3), "lack '.+::fix_index'"),
    (lambda c: c["tensors"].pop(next(iter(c["tensors"]))), "which patch_config.json does not describe"),
    (lambda c: c.update(storage="lora"), "says storage 'lora' but the folder has no adapter_config.json"),
])
def test_damaged_patch_folders_are_refused_before_reading_weights(bf16, tmp_path, damage, match):
    import shutil
    patch = shutil.copytree(bf16["p_tuned"], tmp_path / "p")
    config = json.loads((patch / "patch_config.json").read_text())
    damage(config)
    (patch / "patch_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        apply_patches(bf16["base"], [str(patch)], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_a_patch_folder_given_as_a_model_is_named_a_patch(bf16, tmp_path):
    """A patch folder reads like a model's weights (with a model.safetensors.index.json of its shards too): where a
    model is expected, it is refused as the patch it is, not for the tensor names it holds."""
    patch = str(tmp_path / "sharded")
    extract_patch(bf16["base"], bf16["tuned"], patch, shard_size=4096)
    weight_map = {key: shard for shard in sorted(os.listdir(patch)) if shard.endswith(".safetensors")
                  for key in safe_open(os.path.join(patch, shard), "pt").keys()}
    assert len(set(weight_map.values())) > 1
    with open(os.path.join(patch, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    apply_patches(bf16["base"], [patch], str(tmp_path / "applied"))
    assert same_bits(read_all(str(tmp_path / "applied")), read_all(bf16["tuned"]))
    as_patch = "merge_engine patch folder \\(patch_config.json\\), not a model"
    with pytest.raises(CheckpointError, match=as_patch):
        apply_patches(patch, [bf16["p_tuned"]], str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match=as_patch):
        extract_patch(patch, bf16["tuned"], str(tmp_path / "out"))


def test_a_model_folder_given_as_a_patch_is_named_a_model(bf16, tmp_path):
    from merge_engine.io.lora import open_model
    as_model = f"{bf16['tuned']}: a model folder \\(config.json\\), where a patch is expected"
    with pytest.raises(CheckpointError, match=as_model):
        apply_patches(bf16["base"], [bf16["tuned"]], str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match=as_model):
        open_model(f"{bf16['base']}+{bf16['tuned']}")
    assert not os.path.exists(tmp_path / "out")


def test_a_patch_for_other_shapes_is_refused(tmp_path, bf16):
    from merge_engine.demo import make_synthetic_llama
    wider = make_synthetic_llama(str(tmp_path / "wider"), **dict(SHAPE, hidden=40), seed=0)
    with pytest.raises(CheckpointError, match=r"tensor '.+' was bfloat16 \[.+\] in the patch's base but is"):
        apply_patches(wider, [bf16["p_tuned"]], str(tmp_path / "out"))


def damaged_copy(patch, tmp_path, change):
    """A copy of the patch folder with one stored tensor changed (its header left as it was)."""
    import shutil

    from safetensors.torch import load_file, save_file
    copy = shutil.copytree(patch, tmp_path / "damaged")
    for shard in sorted(copy.glob("*.safetensors")):
        tensors = load_file(str(shard))
        if change(tensors):
            save_file(tensors, str(shard), metadata={"format": "pt"})
            return str(copy)
    raise AssertionError("nothing to damage")


def test_damaged_patch_data_is_refused_not_applied(bf16, tmp_path):
    def flip_a_delta_bit(tensors):
        name = next((n for n in tensors if n.endswith("::delta")), None)
        if name:
            tensors[name].view(torch.int16).view(-1)[0] ^= 0x4000
        return name

    def repeat_a_fixup(tensors):
        name = next((n for n in tensors if n.endswith("::fix_index") and tensors[n].numel() > 1), None)
        if name:
            tensors[name][1] = tensors[name][0]
        return name
    for change, match in ((flip_a_delta_bit, "does not give the model it was made from"),
                          (repeat_a_fixup, "holds an index twice")):
        damaged = damaged_copy(bf16["p_tuned"], tmp_path / change.__name__, change)
        with pytest.raises(CheckpointError, match=match):
            apply_patches(bf16["base"], [damaged], str(tmp_path / change.__name__ / "out"))
        assert not os.path.exists(tmp_path / change.__name__ / "out")


def test_a_quantized_patch_holding_nan_is_refused(bf16, tmp_path):
    patch = str(tmp_path / "p_int8")
    extract_patch(bf16["base"], bf16["tuned"], patch, storage="int8")

    def nan_scale(tensors):
        name = next((n for n in tensors if n.endswith("::scale")), None)
        if name:
            tensors[name].view(-1)[0] = float("nan")
        return name
    damaged = damaged_copy(patch, tmp_path, nan_scale)
    with pytest.raises(CheckpointError, match=r"::scale' holds NaN or Inf values \(a damaged patch\)"):
        apply_patches(bf16["base"], [damaged], str(tmp_path / "out"))


def test_a_fixup_holding_nan_is_refused_even_without_the_base_check(bf16, tmp_path):
    """--any-base skips the fingerprints that would catch it: a NaN fixup must still not be written into the model."""
    def nan_fixup(tensors):
        name = next((n for n in tensors if n.endswith("::fix_tuned")), None)
        if name:
            tensors[name].view(-1)[:] = float("nan")
        return name
    damaged = damaged_copy(bf16["p_tuned"], tmp_path, nan_fixup)
    with pytest.raises(CheckpointError, match=r"::fix_tuned' holds NaN or Inf values \(a damaged patch\)"):
        apply_patches(bf16["base"], [damaged], str(tmp_path / "out"), check_base=False)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("storage, damage", [("int8", "negative scale"), ("int8", "q -128"), ("int4", "nibble -8")])
def test_quantized_values_extract_never_writes_are_refused(bf16, tmp_path, storage, damage):
    """A row's scale is max|d| / qmax >= 0 and q lies in [-qmax, qmax]: anything else is a damaged file."""
    patch = str(tmp_path / "p")
    extract_patch(bf16["base"], bf16["tuned"], patch, storage=storage)

    def damage_it(tensors):
        part = "::scale" if damage == "negative scale" else "::q"
        name = next((n for n in tensors if n.endswith(part)), None)
        if name:
            flat = tensors[name].view(-1)
            flat[0] = {"negative scale": -1.0, "q -128": -128, "nibble -8": 0x80}[damage]
        return name
    damaged = damaged_copy(patch, tmp_path / "d", damage_it)
    with pytest.raises(CheckpointError, match=r"holds a negative scale or a value outside \[-\d+, \d+\] \(a damaged"):
        apply_patches(bf16["base"], [damaged], str(tmp_path / "out"))


def test_removing_a_patch_that_is_not_in_the_model_is_refused(bf16, tmp_path):
    with pytest.raises(CheckpointError, match="is the base this patch was made for: the patch is not in it"):
        remove_patches(bf16["base"], [bf16["p_tuned"]], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_a_patch_applied_at_a_scale_too_small_to_change_a_tensor_is_removed(bf16, tmp_path):
    """At scale 1e-3 some tensors round back to the base's bits: they are not evidence that the patch is missing, so
    removing it at the scale it was applied with is not refused, and leaves those tensors as they are."""
    p = bf16["p_tuned"]
    apply_patches(bf16["base"], [(p, 1e-3)], str(tmp_path / "a"))
    base, applied = read_all(bf16["base"]), read_all(str(tmp_path / "a"))
    untouched = [n for n in base if torch.equal(ar.bits(base[n]), ar.bits(applied[n]))]
    assert untouched and len(untouched) < len(base)
    remove_patches(str(tmp_path / "a"), [(p, 1e-3)], str(tmp_path / "r"))
    back = read_all(str(tmp_path / "r"))
    assert all(torch.equal(ar.bits(back[n]), ar.bits(base[n])) for n in untouched)


def test_first_layers_beyond_the_model_keeps_every_layer_without_counting_to_it(bf16, tmp_path):
    every = extract_patch(bf16["base"], bf16["tuned"], str(tmp_path / "all"), selection=Selection(first_layers=SHAPE["layers"]))
    beyond = extract_patch(bf16["base"], bf16["tuned"], str(tmp_path / "beyond"), selection=Selection(first_layers=10**12))
    assert {r.name for r in beyond.rows} == {r.name for r in every.rows}


def test_a_layer_selector_keeping_nothing_is_named_not_taken_for_no_change(bf16, tmp_path):
    """Name filters matching only tensors outside the kept layers: nothing is selected, which is not "equals the
    base" (nothing was compared)."""
    last = SHAPE["layers"] - 1
    for include in ("lm_head", f"layers.{last}."):
        with pytest.raises(CheckpointError, match="none of the .* tensor.s. the name filters match is in the layers"):
            extract_patch(bf16["base"], bf16["tuned"], str(tmp_path / "p"),
                          selection=Selection(include=(include,), first_layers=1))
    assert not os.path.exists(tmp_path / "p")


def test_fixups_apply_only_where_the_weight_is_the_patchs_base(bf16, tmp_path):
    """A float patch at scale 1 stores exact TUNED values (fixups) where BASE + its difference misses them. On
    another weight (--any-base) those elements get the difference like every other: two patches applied in
    two commands stay within 1.5 ulps of one command (the fixups wrote p2's TUNED over p1's change), and on
    an unrelated model every element is the model plus the stored difference."""
    p1, p2 = bf16["p_tuned"], bf16["p_tuned2"]
    apply_patches(bf16["base"], [p1], str(tmp_path / "step1"))
    apply_patches(str(tmp_path / "step1"), [p2], str(tmp_path / "step2"), check_base=False)
    apply_patches(bf16["base"], [p1, p2], str(tmp_path / "both"))
    both, step1, two = (read_all(str(tmp_path / n)) for n in ("both", "step1", "step2"))
    base, t1, t2 = (read_all(bf16[n]) for n in ("base", "tuned", "tuned2"))
    for name in both:
        x, z = both[name].double(), two[name].double()
        d1, d2 = (t[name].double() - base[name].double() for t in (t1, t2))
        terms = base[name].double().abs() + d1.abs() + d2.abs()
        big = torch.maximum(torch.maximum(x.abs(), z.abs()), step1[name].double().abs())
        # one command adds the two stored (bf16-rounded) differences, two commands reach TUNED exactly first: half
        # an ulp of each difference between them where it cancels against the base, besides the results' roundings
        stored = (ulp(d1.abs(), torch.bfloat16) + ulp(d2.abs(), torch.bfloat16)) / 2
        assert ((x - z).abs() <= 1.5 * ulp(big, torch.bfloat16) + stored + 4 * 2.0**-24 * terms).all(), name
    apply_patches(bf16["other"], [p1], str(tmp_path / "forced"), check_base=False)
    other, forced = read_all(bf16["other"]), read_all(str(tmp_path / "forced"))
    patch = open_patch(p1, Checkpoint(bf16["other"]))
    for name in patch.tensors:
        assert torch.equal(forced[name], ar.add_scaled(other[name], [(patch.delta(name), 1.0)])), name
    patch.close()


def test_a_patch_that_overflows_the_weights_is_refused_by_name(bf16, models, tmp_path):
    """A difference or scale too large for the weights' dtype would write Inf or NaN: refused, naming the
    patch and tensor; a scale past float32's range (the differences are scaled in it) is refused up front."""
    fp16 = models(torch.float16)
    extract_patch(fp16["base"], fp16["tuned"], str(tmp_path / "p16"))
    with pytest.raises(CheckpointError, match=r"p16 \(scale 1e\+08\): tensor '.+' patched holds \d+ NaN or Inf"):
        apply_patches(fp16["base"], [(str(tmp_path / "p16"), 1e8)], str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"p_tuned: scale 1e\+300 must be a finite number of at most 3.4e\+38"):
        apply_patches(bf16["base"], [(bf16["p_tuned"], 1e300)], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def write_model(folder, tensors: dict, like: str) -> str:
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(like, "config.json")) as f, open(os.path.join(folder, "config.json"), "w") as g:
        g.write(f.read())
    return str(folder)


def test_extract_stores_a_sign_flip_of_zero_and_refuses_nan(bf16, tmp_path):
    """Bit for bit means the sign of a zero too (it was taken as no change); a NaN in both models at one element
    makes a difference a patch cannot store (apply would refuse the patch as damaged): refused by name."""
    base = read_all(bf16["base"])
    name = "model.norm.weight"
    base[name][0], tuned = 0.0, {n: t.clone() for n, t in base.items()}
    tuned[name][0] = -0.0
    b, t = write_model(tmp_path / "b", base, bf16["base"]), write_model(tmp_path / "t", tuned, bf16["base"])
    extract_patch(b, t, str(tmp_path / "p"))
    apply_patches(b, [str(tmp_path / "p")], str(tmp_path / "out"))
    assert same_bits(read_all(str(tmp_path / "out")), tuned)
    for model in (base, tuned):
        model[name][1] = float("nan")
    b, t = write_model(tmp_path / "bn", base, bf16["base"]), write_model(tmp_path / "tn", tuned, bf16["base"])
    with pytest.raises(CheckpointError, match=f"tensor '{name}': the fine-tune's difference from the base holds 1 NaN"):
        extract_patch(b, t, str(tmp_path / "pn"))
    assert not os.path.exists(tmp_path / "pn")


def test_a_difference_past_the_storage_range_is_refused_at_extraction(bf16, tmp_path):
    """bf16 weights changed by 1e5 do not fit a float16 patch: extraction refuses by name, rather than write a
    patch holding Inf that apply refuses as damaged; bfloat16 storage holds it exactly."""
    base = read_all(bf16["base"])
    name = "model.norm.weight"
    tuned = {n: t.clone() for n, t in base.items()}
    tuned[name][0] += 1e5
    b, t = write_model(tmp_path / "b", base, bf16["base"]), write_model(tmp_path / "t", tuned, bf16["base"])
    with pytest.raises(CheckpointError, match=f"tensor '{name}': .* past float16's range"):
        extract_patch(b, t, str(tmp_path / "p16"), storage="float16")
    assert not os.path.exists(tmp_path / "p16")
    extract_patch(b, t, str(tmp_path / "p"), storage="bfloat16")
    apply_patches(b, [str(tmp_path / "p")], str(tmp_path / "out"))
    assert same_bits(read_all(str(tmp_path / "out")), tuned)


def test_a_fused_moe_merge_against_its_per_expert_base_is_refused_with_the_layout_named(tmp_path):
    # a merge writes MoE experts fused by default: extracting it against a per-expert base names the layouts
    from tests.io.test_experts import mixtral_tensors, write_model
    base = write_model(tmp_path / "base", mixtral_tensors(0))
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": base, "parameters": {"weight": 0.5}},
                         {"model": write_model(tmp_path / "other", mixtral_tensors(1)), "parameters": {"weight": 0.5}}]}
    merge(parse_config(config), str(tmp_path / "merged"), MergeOptions(quiet=True))
    with pytest.raises(CheckpointError, match="experts.*--expert-layout checkpoint"):
        extract_patch(base, str(tmp_path / "merged"), str(tmp_path / "patch"))
